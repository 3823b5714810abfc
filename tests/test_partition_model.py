"""Activations through a forward hook on a named layer of any nn.Module (bring your own)."""

import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from nonn.partition import Partition, build_fan, collect_activations, partition_model


class TinyNet(nn.Module):
    """A user's model: nothing nonn-specific, the feature map comes out of `block.act`."""

    def __init__(self, channels: int = 12):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.block = nn.Sequential()
        self.block.add_module("conv", nn.Conv2d(6, channels, 3, padding=1))
        self.block.add_module("act", nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, 3)

    def forward(self, x):
        return self.fc(self.pool(self.block(torch.relu(self.stem(x)))).flatten(1))


class SharedReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))))


def batches(n=40, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def test_hook_gives_spatial_means_of_the_named_layer():
    torch.manual_seed(0)
    model = TinyNet().train()
    data = batches()
    acts = collect_activations(model, "block.act", data, progress=False)
    assert acts.shape == (40, 12) and acts.dtype == np.float32
    assert model.training, "train mode must be restored"
    model.eval()
    with torch.no_grad():
        x = torch.cat([b[0] for b in data])
        want = model.block(torch.relu(model.stem(x))).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(acts, want, rtol=1e-5, atol=1e-6)
    assert not model.block.act._forward_hooks, "hook must be removed"


def test_unknown_layer_lists_valid_names():
    with pytest.raises(ValueError, match="not a module") as info:
        collect_activations(TinyNet(), "block.relu", batches(), progress=False)
    message = str(info.value)
    for name in ("stem", "block.conv", "block.act", "fc"):
        assert name in message


def test_layer_called_twice_is_rejected():
    with pytest.raises(ValueError, match="2 times"):
        collect_activations(SharedReLU(), "relu", batches(), progress=False)


def test_empty_loader_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        collect_activations(TinyNet(), "block.act", [], progress=False)


def test_non_tensor_layer_output_is_an_error():
    class TupleOut(nn.Module):
        def forward(self, x):
            return x, x

    model = nn.Sequential(nn.Conv2d(1, 2, 3), TupleOut())
    with pytest.raises(ValueError, match="not a tensor"):
        collect_activations(model, "1", batches(), progress=False)


def test_partition_model_end_to_end():
    torch.manual_seed(1)
    result = partition_model(TinyNet(channels=16), "block.act", batches(n=64), 3, top_k=6, percentile=70, progress=False)
    part = result.partition
    assert isinstance(part, Partition) and part.layer == "block.act" and part.num_filters == 16
    assert sorted(f for g in part.groups for f in g) == list(range(16))
    assert part.params["top_k"] == 6 and part.params["images"] == 64
    np.testing.assert_array_equal(result.fan, build_fan(result.activations, top_k=6))


@pytest.fixture
def byo_factory(tmp_path, monkeypatch):
    """A factory module on sys.path, as `--teacher-factory pkg.mod:fn` expects."""
    (tmp_path / "my_teacher_zoo.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def make():
                return nn.Sequential(
                    nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                    nn.Conv2d(8, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 3),
                )
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    importlib.invalidate_caches()
    return "my_teacher_zoo:make"


def test_cli_partition_bring_your_own_teacher(tmp_path, byo_factory, capsys):
    pytest.importorskip("nonn.students.teacher")
    from nonn.cli import main
    from nonn.students.teacher_loading import load_factory

    torch.manual_seed(0)
    torch.save(load_factory(byo_factory)().state_dict(), tmp_path / "w.pt")
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "tiny.npz",
        x=rng.random((48, 8, 8, 1)).astype(np.float32), y=rng.integers(0, 3, 48),
        x_test=rng.random((12, 8, 8, 1)).astype(np.float32), y_test=rng.integers(0, 3, 12),
    )
    out = tmp_path / "run" / "partition.json"
    # An untrained teacher on random labels: --normalize auto would refuse it as near chance.
    common = ["partition", "--teacher-factory", byo_factory, "--weights", str(tmp_path / "w.pt"), "--normalize", "dataset",
              "--dataset", str(tmp_path / "tiny.npz"), "--device", "cpu", "--no-progress", "-K", "2",
              "--top-k", "4", "--percentile", "50", "--out", str(out)]
    assert main(common + ["--layer", "4", "--activations-out", str(tmp_path / "acts.npy")]) == 0
    part = Partition.load(out)
    assert part.layer == "4" and part.num_filters == 10 and part.teacher["factory"] == byo_factory
    assert len(part.teacher["fingerprint"]) == 64 and part.params["images"] == 48
    fan = np.load(out.parent / "fan.npy")
    acts = np.load(tmp_path / "acts.npy")
    assert fan.shape == (10, 10) and acts.shape == (48, 10)
    np.testing.assert_array_equal(fan, build_fan(acts, top_k=4))
    capsys.readouterr()
    # No feature_layer on a plain Sequential: --layer is required, and a wrong one lists names.
    assert main(common) == 2
    assert "--layer is required" in capsys.readouterr().err
    assert main(common + ["--layer", "head"]) == 2
    err = capsys.readouterr().err
    assert "'head'" in err and "valid names" in err and "4" in err
    assert main(common + ["--layer", "4", "-K", "11"]) == 2
    assert "larger than the 10 filters" in capsys.readouterr().err
    assert main(common + ["--layer", "4", "--split", "test", "--limit", "5", "--out", str(tmp_path / "t.json")]) == 0
    assert Partition.load(tmp_path / "t.json").params["images"] == 5
