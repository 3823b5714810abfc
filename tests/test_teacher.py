"""Teacher training, exact resume, checkpoints and bring-your-own teachers (tiny data, CPU)."""

import json
import textwrap

import numpy as np
import pytest
import torch

from nonn.artifacts import ArtifactError
from nonn.cli import main
from nonn.students.checkpoint import load_checkpoint, save_checkpoint
from nonn.students.data import load_dataset
from nonn.students.loader import make_loader
from nonn.students.models import create_model
from nonn.students.teacher import TeacherConfig, evaluate, train_teacher
from nonn.students.teacher_loading import TEACHER_FORMAT, load_teacher


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def toy_npz(tmp_path):
    """A learnable 3-class problem: the class sets which quadrant of a 8x8 image is bright."""
    rng = np.random.default_rng(0)
    y = np.arange(96) % 3
    x = rng.random((96, 8, 8)).astype(np.float32) * 0.3
    for i, cls in enumerate(y):
        r, c = divmod(int(cls), 2)
        x[i, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] += 0.7
    path = tmp_path / "toy.npz"
    np.savez(path, x=x, y=y)
    return str(path)


def config_for(toy_npz, out, **kw):
    base = dict(dataset=toy_npz, arch="cnn-small", arch_kwargs={"width": 4, "dropout": 0.1}, epochs=2, batch_size=16,
                lr=0.05, seed=3, device="cpu", out=str(out), progress=False)
    return TeacherConfig(**{**base, **kw})


def test_training_learns_and_writes_checkpoint_and_log(tmp_path, toy_npz):
    log_path = tmp_path / "teacher.jsonl"
    ckpt = train_teacher(config_for(toy_npz, tmp_path / "t.pt", epochs=4, log=str(log_path)))
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert set(records[0]) == {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds", "images_per_s", "precision"}
    assert records[0]["precision"] == "fp32" and records[0]["images_per_s"] > 0
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["test_acc"] > 0.6  # chance is 1/3
    assert records[0]["lr"] == pytest.approx(0.05) and records[-1]["lr"] < records[0]["lr"]  # cosine

    saved = load_checkpoint(tmp_path / "t.pt", TEACHER_FORMAT)
    assert saved["epoch"] == 4 and saved["history"] == records and saved["metrics"]["test_acc"] == records[-1]["test_acc"]
    assert saved["arch"] == {"name": "cnn-small", "num_classes": 3, "in_channels": 1, "kwargs": {"width": 4, "dropout": 0.1}}
    assert saved["dataset"]["input_shape"] == [1, 8, 8]

    teacher = load_teacher(tmp_path / "t.pt")
    assert teacher.feature_layer == "act" and teacher.arch == saved["arch"] and len(teacher.fingerprint) == 64
    assert not teacher.model.training
    ds = load_dataset(toy_npz)
    result = evaluate(teacher.model, make_loader(ds, "test", 32, train=False))
    assert result["acc"] == pytest.approx(records[-1]["test_acc"])
    assert ckpt["metrics"]["params"] == sum(p.numel() for p in teacher.model.parameters())


def test_resume_after_a_kill_gives_the_same_weights(tmp_path, toy_npz):
    straight = train_teacher(config_for(toy_npz, tmp_path / "straight.pt"))
    killed = config_for(toy_npz, tmp_path / "killed.pt")
    _train_one_epoch_then_stop(killed)
    resumed = train_teacher(config_for(toy_npz, tmp_path / "killed.pt", resume=True, log=str(tmp_path / "r.jsonl")))
    assert resumed["epoch"] == 2
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert [r["test_loss"] for r in resumed["history"]] == [r["test_loss"] for r in straight["history"]]
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2
    # Resuming a finished run changes nothing.
    again = train_teacher(config_for(toy_npz, tmp_path / "killed.pt", resume=True))
    assert again["epoch"] == 2 and torch.equal(again["state_dict"]["fc.weight"], resumed["state_dict"]["fc.weight"])


def _train_one_epoch_then_stop(config):
    """Run train_teacher but raise after the first checkpoint is written, like a killed process."""
    import nonn.students.teacher as teacher_module

    real_save = teacher_module.save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(obj, path):
        real_save(obj, path)
        raise Killed

    teacher_module.save_checkpoint = save_then_die
    try:
        with pytest.raises(Killed):
            train_teacher(config)
    finally:
        teacher_module.save_checkpoint = real_save
    assert load_checkpoint(config.out, TEACHER_FORMAT)["epoch"] == 1


def test_resume_refuses_other_settings_and_existing_out(tmp_path, toy_npz):
    out = tmp_path / "t.pt"
    train_teacher(config_for(toy_npz, out, epochs=1))
    with pytest.raises(ValueError, match=r"cannot resume .*lr: checkpoint 0.05, now 0.1"):
        train_teacher(config_for(toy_npz, out, epochs=1, lr=0.1, resume=True))
    with pytest.raises(FileExistsError, match="--resume"):
        train_teacher(config_for(toy_npz, out, epochs=1))
    with pytest.raises(ValueError, match="schedule must be one of"):
        train_teacher(config_for(toy_npz, tmp_path / "x.pt", schedule="linear"))


def test_resume_of_a_checkpoint_older_than_a_setting_takes_that_settings_default(tmp_path, toy_npz):
    # A checkpoint written before --normalize existed has no "normalize" in its config: it was
    # trained with the dataset's statistics (today's default), so it resumes under the default
    # and is refused under any other choice.
    out = tmp_path / "t.pt"
    _train_one_epoch_then_stop(config_for(toy_npz, out, epochs=2))
    checkpoint = torch.load(out, map_location="cpu", weights_only=False)
    del checkpoint["config"]["normalize"]
    torch.save(checkpoint, out)
    with pytest.raises(ValueError, match=r"cannot resume .*normalize: checkpoint 'dataset', now 'none'"):
        train_teacher(config_for(toy_npz, out, epochs=2, resume=True, normalize="none"))
    assert train_teacher(config_for(toy_npz, out, epochs=2, resume=True))["epoch"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_request_without_cuda_is_a_clear_error(tmp_path, toy_npz):
    with pytest.raises(ValueError, match="CUDA is not available"):
        train_teacher(config_for(toy_npz, tmp_path / "x.pt", device="cuda"))


def test_checkpoint_errors_name_the_file(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint({"format": "nonn.example/1", "w": torch.ones(3)}, good)
    assert torch.equal(load_checkpoint(good, "nonn.example/1")["w"], torch.ones(3))
    with pytest.raises(ArtifactError, match=r"good.pt: format is 'nonn.example/1', expected 'nonn.teacher/1'"):
        load_checkpoint(good, TEACHER_FORMAT)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ArtifactError, match="truncated.pt: not a readable torch file"):
        load_checkpoint(truncated, "nonn.example/1")
    code = tmp_path / "code.pt"
    torch.save({"format": "nonn.example/1", "obj": _Gadget()}, code)
    with pytest.raises(ArtifactError, match="code.pt: refused to load"):
        load_checkpoint(code, "nonn.example/1")
    with pytest.raises(ArtifactError, match="missing.pt: file not found"):
        load_checkpoint(tmp_path / "missing.pt", "nonn.example/1")
    # A failed save leaves the previous file intact.
    with pytest.raises(Exception):
        save_checkpoint({"format": "nonn.example/1", "bad": lambda: 0}, good)
    assert torch.equal(load_checkpoint(good, "nonn.example/1")["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


class _Gadget:
    pass


def test_bring_your_own_teacher_from_a_factory(tmp_path, monkeypatch):
    package = tmp_path / "myteachers"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def tiny():
            torch.manual_seed(1)
            return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    from myteachers.nets import tiny  # noqa: E402 - the module written above

    reference = tiny()
    with torch.no_grad():
        reference[0].weight.fill_(0.5)
    weights = tmp_path / "weights.pt"
    torch.save({"module." + k: v for k, v in reference.state_dict().items()}, weights)  # as saved from DDP

    teacher = load_teacher(factory="myteachers.nets:tiny", weights=weights)
    assert teacher.arch is None and teacher.factory == "myteachers.nets:tiny" and teacher.feature_layer is None
    assert torch.equal(teacher.model[0].weight, torch.full((4, 1, 3, 3), 0.5))
    x = torch.rand(2, 1, 6, 6)
    torch.testing.assert_close(teacher.model(x), reference.eval()(x))

    file_factory = load_teacher(factory=f"{package / 'nets.py'}:tiny", weights=weights)
    assert file_factory.fingerprint == teacher.fingerprint

    torch.save(create_model("cnn-small", num_classes=2, in_channels=1, width=4).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ArtifactError, match="weights do not fit the model: missing"):
        load_teacher(factory="myteachers.nets:tiny", weights=tmp_path / "other.pt")
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        load_teacher(factory="myteachers.nets:nope")
    with pytest.raises(ValueError, match="package.module:function"):
        load_teacher(factory="myteachers.nets")


def test_cli_train_and_eval_teacher(tmp_path, toy_npz, capsys):
    out = tmp_path / "cli.pt"
    args = ["train-teacher", "--dataset", toy_npz, "--arch", "cnn-small", "--width", "4", "--epochs", "1",
            "--batch-size", "32", "--device", "cpu", "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(args) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert main(args) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["eval-teacher", "--teacher", str(out), "--dataset", toy_npz, "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_acc"] == pytest.approx(load_checkpoint(out, TEACHER_FORMAT)["metrics"]["test_acc"])
    assert main(["train-teacher", "--dataset", toy_npz, "--arch", "wrn-11-1", "--out", str(tmp_path / "b.pt")]) == 2
    assert "depth must be 6n + 4" in capsys.readouterr().err
