"""Training precision: the choice per device, fp16 loss scaling from the first step, CPU runs
that never touch CUDA. AMP runs here use CPU autocast (bf16, fp16 with a CPU GradScaler)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from nonn.cli.common import PRECISIONS as CLI_PRECISIONS
from nonn.students.ensemble import build_ensemble, parse_arch_list
from nonn.students.precision import PRECISIONS, LossScaler, choose_precision
from nonn.students.teacher import TeacherConfig, train_teacher
from nonn.students.train import StudentsConfig, load_students, train_students

from students_testing import make_npz, make_partition, make_teacher

# Compute capabilities of a machine with an A100 as cuda:0 and a T4 as cuda:1.
CAPABILITIES = {0: (8, 0), 1: (7, 5), 2: (6, 1)}


def fake_capability(device: torch.device) -> tuple[int, int]:
    return CAPABILITIES[device.index]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    data = make_npz(root / "bars.npz")
    teacher = make_teacher(root / "teacher.pt", data)
    return {"data": data, "teacher": teacher, "partition": make_partition(root / "partition.json", teacher)}


def test_auto_precision_follows_the_compute_capability_of_the_device_used(caplog):
    cuda = lambda i: torch.device("cuda", i)  # noqa: E731
    assert choose_precision("auto", cuda(0), fake_capability) == "bf16"  # Ampere: native bf16
    assert choose_precision("auto", cuda(1), fake_capability) == "fp16"  # Turing: bf16 only emulated
    assert choose_precision("auto", cuda(2), fake_capability) == "fp32"  # Pascal: no tensor cores
    assert choose_precision("auto", torch.device("cpu"), fake_capability) == "fp32"
    # An explicit choice is kept; bf16 where it is emulated says so.
    for precision in ("fp32", "bf16", "fp16"):
        assert choose_precision(precision, cuda(0), fake_capability) == precision
        assert choose_precision(precision, torch.device("cpu"), fake_capability) == precision
    with caplog.at_level(logging.WARNING, logger="nonn.students.precision"):
        assert choose_precision("bf16", cuda(1), fake_capability) == "bf16"
    assert "emulated" in caplog.text and "7.5" in caplog.text
    with pytest.raises(ValueError, match="precision 'fp8': expected one of auto, fp32, bf16, fp16"):
        choose_precision("fp8", cuda(0), fake_capability)
    assert CLI_PRECISIONS == PRECISIONS


def test_the_capability_asked_is_the_chosen_device_s_not_the_current_one(monkeypatch):
    asked = []

    def capability(device=None):
        asked.append(device)
        return CAPABILITIES[0 if device is None else torch.device(device).index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # as torch answers on a T4
    assert choose_precision("auto", torch.device("cuda", 1)) == "fp16"
    assert asked == [torch.device("cuda", 1)]


def test_initial_loss_scale_fits_the_loss():
    assert LossScaler.initial_scale(2.0) == 2.0**14
    assert LossScaler.initial_scale(988.0) == 2.0**5  # activation transfer at beta 1e4
    assert LossScaler.initial_scale(0.01) == 2.0**16  # never above GradScaler's default
    assert LossScaler.initial_scale(1e9) == 1.0
    assert LossScaler.initial_scale(float("nan")) == 2.0**16


def test_fp16_with_activation_transfer_steps_from_the_first_batch(files, tmp_path):
    out = tmp_path / "fp16.pt"
    config = StudentsConfig(
        partition=str(files["partition"]), out=str(out), teacher=str(files["teacher"]), dataset=str(files["data"]),
        arch="cnn-small:width=4", epochs=1, batch_size=16, train_limit=16, beta=1e4, at="pooled", device="cpu",
        precision="fp16", progress=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()": no step was made
        result = train_students(config)
    (entry,) = result["history"]
    assert entry["precision"] == "fp16" and entry["at_loss"] > 100  # a loss the default scale 2**16 overflows on
    assert entry["skipped_steps"] == 0 and entry["loss_scale"] * entry["loss"] < 2**15
    # The one batch made a step: the weights moved from where the seed put them.
    torch.manual_seed(config.seed)
    loaded = load_students(out)
    initial = build_ensemble(parse_arch_list(config.arch, 2), loaded.groups, 3, 1, tuple(loaded.ensemble.students[0].out_hw))
    moved = [not torch.equal(a, b) for a, b in zip(initial.parameters(), loaded.ensemble.parameters())]
    assert all(moved)
    # The scaler's state is saved and a resumed run goes on from it.
    assert torch.load(out, weights_only=True)["scaler"]["scale"] == entry["loss_scale"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_teacher_trains_under_cpu_autocast(tmp_path, files, precision):
    config = TeacherConfig(dataset=str(files["data"]), arch="cnn-small", arch_kwargs={"width": 4}, epochs=2, batch_size=16,
                           lr=0.05, device="cpu", precision=precision, out=str(tmp_path / "t.pt"), progress=False)
    checkpoint = train_teacher(config)
    assert checkpoint["history"][-1]["train_loss"] < checkpoint["history"][0]["train_loss"]
    assert (checkpoint["scaler"] is not None) == (precision == "fp16")


def test_cpu_run_never_initialises_cuda(files, tmp_path, monkeypatch):
    # As on a GPU machine: CUDA is there, but a --device cpu run must leave it alone.
    def touched(*args, **kwargs):
        raise AssertionError("a --device cpu run initialised CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name in ("_lazy_init", "init", "get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, touched)
    config = StudentsConfig(
        partition=str(files["partition"]), out=str(tmp_path / "cpu.pt"), teacher=str(files["teacher"]),
        dataset=str(files["data"]), arch="cnn-small:width=4", epochs=2, batch_size=16, beta=10.0, schedule="step",
        device="cpu", progress=False,
    )
    train_students(config)
    config.resume, config.epochs = True, 3
    assert train_students(config)["history"][-1]["epoch"] == 3
