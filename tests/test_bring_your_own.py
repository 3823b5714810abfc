"""A user's own teacher and images, end to end: a torchvision-style ResNet trained by plain
PyTorch on 96x96 RGB images as stored, an image folder, partition (the input contract found by
--normalize auto), students, a raw-uint8 bundle, bundle verify, and a simulated fleet with a
device killed; torchvision's own resnet18 too where torchvision imports."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from nonn.cli import main
from nonn.partition import Partition
from nonn.runtime.bundle import Bundle

from byo_testing import read_image_folder, toy_resnet, train_as_stored, write_image_folder

HERE = Path(__file__).resolve().parent
SIZE = 96

TINY_PROFILE = {
    "format": "nonn.devices/1",
    "profiles": {
        "tiny": {
            "memory_mb": 2048, "gflops": 1.0, "power_w": {"idle": 1.0, "active": 2.0},
            "link": {"bandwidth_mbps": 1000, "latency_ms": 1.0, "loss": 0.0}, "threads": 1,
            "sources": {"all": "made up for the tests"},
        }
    },
}  # fmt: skip


def torchvision_resnet18() -> torch.nn.Module:
    """torchvision's own resnet18 for 3 classes (the factory the README shows)."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3)


def _torchvision_missing() -> str | None:
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # ImportError, or a build that fails to load next to this torch
        return f"torchvision does not import here ({type(exc).__name__}: {exc})"
    return None


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("byo") / "images"
    write_image_folder(root, 48, SIZE, split="train")
    write_image_folder(root, 12, SIZE, split="val", seed=1)
    return root


FACTORIES = [
    pytest.param("toy_resnet", id="resnet-written-in-the-test"),
    pytest.param("torchvision_resnet18", id="torchvision-resnet18",
                 marks=pytest.mark.skipif(_torchvision_missing() is not None, reason=_torchvision_missing() or "")),
]


@pytest.mark.slow
@pytest.mark.parametrize("factory", FACTORIES)
def test_own_teacher_and_image_folder_to_a_simulated_fleet(images, factory, tmp_path, caplog, capsys):
    build = toy_resnet if factory == "toy_resnet" else torchvision_resnet18
    factory_spec = f"{HERE / 'byo_testing.py'}:{factory}" if factory == "toy_resnet" else f"{Path(__file__)}:{factory}"
    x, y = read_image_folder(images / "train")
    torch.save(train_as_stored(build(), x, y, steps=30, batch=16).state_dict(), tmp_path / "teacher.pt")
    teacher = ["--teacher-factory", factory_spec, "--weights", str(tmp_path / "teacher.pt")]
    quiet = ["--device", "cpu", "--no-progress"]

    # partition: the teacher's input contract is found (it was trained on images as stored)
    with caplog.at_level(logging.INFO, logger="nonn"):
        assert main(["partition", *teacher, "--layer", "layer4", "--dataset", str(images), "-K", "2", "--top-k", "8",
                     "--percentile", "50", "--out", str(tmp_path / "partition.json"), *quiet]) == 0
    chosen = [line for line in caplog.text.splitlines() if line.endswith("<- chosen")]
    assert len(chosen) == 1 and chosen[0].split()[0] == "none", caplog.text
    part = Partition.load(tmp_path / "partition.json")
    assert part.contract.normalize == "none" and part.contract.input_shape == (3, SIZE, SIZE)

    # students: the data set and contract come from the partition; batches of 64 96x96 images
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nonn"):
        assert main(["train-students", *teacher, "--partition", str(tmp_path / "partition.json"),
                     "--arch", "wrn-10-1:width=4", "--epochs", "1", "--batch-size", "64", "--data-workers", "1",
                     "--out", str(tmp_path / "students.pt"), *quiet]) == 0
    assert "as recorded in " + str(tmp_path / "partition.json") in caplog.text

    # export: the students take raw uint8 pixels; the manifest says so
    assert main(["export", "--students", str(tmp_path / "students.pt"), "--out", str(tmp_path / "bundle"),
                 "--parity-images", "8", "--eval-images", "12"]) == 0
    bundle = Bundle.load(tmp_path / "bundle")
    assert bundle.input_contract.datatype == "UINT8" and bundle.input_contract.normalize == "none"
    assert all(s.input.datatype == "UINT8" and list(s.input.shape) == [-1, 3, SIZE, SIZE] for s in bundle.students)
    assert main(["bundle", "verify", str(tmp_path / "bundle")]) == 0
    capsys.readouterr()

    # infer: the held-out folder as it is on disk (labels from the class folders), through real device servers
    from runtime_testing import device_servers

    with device_servers(bundle) as servers:
        devices = ",".join(server.address for server in servers)
        assert main(["infer", "--bundle", str(tmp_path / "bundle"), "--devices", devices, "--input", str(images / "val"),
                     "--batch-size", "5", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["images"] == 12 and result["accuracy"] is not None
        # float pixels outside [0, 1] (0..255 stored as floats) are refused by the input contract
        np.save(tmp_path / "floats.npy", read_image_folder(images / "val")[0].numpy()[:4] * 255)
        assert main(["infer", "--bundle", str(tmp_path / "bundle"), "--devices", devices, "--input",
                     str(tmp_path / "floats.npy")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("nonn: error: float images must hold pixels in [0, 1], found ") and "send them as uint8" in err

    # simulate: the test split from the bundle's record, 64-image requests, device 1 killed
    (tmp_path / "profiles.json").write_text(json.dumps(TINY_PROFILE))
    assert main(["simulate", "--bundle", str(tmp_path / "bundle"), "--fleet", "tiny:2", "--profiles",
                 str(tmp_path / "profiles.json"), "--requests", "4", "--batch-size", "64", "--concurrency", "1",
                 "--kill", "1@0.2", "--until-faults-end", "--recovery", "0.5", "--deadline", "30", "--network", "none",
                 "--no-progress",
                 "--json", str(tmp_path / "sim.json")]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "sim.json").read_text())
    assert report["lost"] == 0 and report["degraded"] > 0, {k: report[k] for k in ("requests", "lost", "degraded", "errors") if k in report}
    # uint8 pixels, not float32: about one byte per pixel from a device that answered every request
    # (a device's figure is per answered inference of the fleet, so one skipped for some sends less)
    sent = {d["index"]: (d["bytes_per_inference"]["request"], d["contributed"]) for d in report["devices"]}
    assert sent[0][1] == 1.0 and SIZE * SIZE * 3 <= sent[0][0] < 2 * SIZE * SIZE * 3, sent
    assert all(b < 2 * SIZE * SIZE * 3 for b, _ in sent.values()), sent


def test_a_teacher_with_another_class_order_is_refused_in_one_line(images, tmp_path, capsys):
    x, y = read_image_folder(images / "train")
    model = train_as_stored(toy_resnet(), x, y, steps=30, batch=16)
    state = model.state_dict()
    state["fc.weight"], state["fc.bias"] = state["fc.weight"][[2, 0, 1]], state["fc.bias"][[2, 0, 1]]
    torch.save(state, tmp_path / "shuffled.pt")
    code = main(["partition", "--teacher-factory", f"{HERE / 'byo_testing.py'}:toy_resnet", "--weights",
                 str(tmp_path / "shuffled.pt"), "--layer", "layer4", "--dataset", str(images), "-K", "2",
                 "--out", str(tmp_path / "p.json"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"nonn: error: teacher {tmp_path / 'shuffled.pt'} is near chance on 48 training images of images")
    assert "class order (bar, column, diagonal)" in err[0]
    assert not (tmp_path / "p.json").exists()
