"""Durability: training killed (SIGKILL) at a random point and resumed; artifacts killed mid-write.

A kill is a real SIGKILL of a `nonn` subprocess: no exception handler, no cleanup. The resumed
run must end with exactly the weights of an uninterrupted run (tiny data, CPU, fixed seed), and a
write killed half-way must leave the previous artifact as it was. Kill points are counted in
work done (the N-th optimizer step, the N-th file sync), never in seconds, so that a busy
machine cannot move them.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nonn.artifacts import sha256_file
from nonn.cli import main

from students_testing import make_npz, make_partition, make_teacher

pytestmark = pytest.mark.timeout(180)

TRAIN_IMAGES, BATCH = 768, 16
STEPS_PER_EPOCH = TRAIN_IMAGES // BATCH


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("durability")
    data = make_npz(root / "bars.npz", n_train=TRAIN_IMAGES, n_test=48)
    teacher = make_teacher(root / "teacher.pt", data, steps=5)
    partition = make_partition(root / "partition.json", teacher)
    return {"root": root, "data": data, "teacher": teacher, "partition": partition}


def kill_rng() -> tuple[random.Random, int]:
    """A fresh random kill point each run; the seed is in every failure message to replay it."""
    seed = int(os.environ.get("NONN_KILL_SEED", time.time_ns() % 1_000_000))
    return random.Random(seed), seed


def kill_training(argv: list[str], out: Path, steps_per_epoch: int, writes_per_epoch: int, epochs: int) -> tuple[int, int]:
    """SIGKILL `nonn argv --out out` at a random point of its work after the first checkpoint.

    The point is counted in work, not time, so machine load cannot move it: right after a
    random optimizer step of epochs 2.., or right after a random file write of epochs 2..
    reached its fsync but before its rename (a checkpoint or log half-made). Returns the epoch
    of the checkpoint the kill left behind, and the kill seed.
    """
    rng, seed = kill_rng()
    if rng.random() < 0.5:
        what, call = "torch.optim.SGD.step", rng.randint(steps_per_epoch + 1, steps_per_epoch * epochs)
        expected = (call - 1) // steps_per_epoch
    else:  # up to the last epoch's checkpoint: a kill after it would find the run over
        what, call = "os.fsync", rng.randint(writes_per_epoch + 1, writes_per_epoch * (epochs - 1) + 1)
        # The epoch's first write is its checkpoint: paused there, the previous epoch's is in place.
        expected = (call - 1) // writes_per_epoch + ((call - 1) % writes_per_epoch > 0)
    out.unlink(missing_ok=True)
    module, attribute = what.rsplit(".", 1) if what == "os.fsync" else ("torch.optim", "SGD.step")
    kill_during(module, attribute, [*argv, "--out", str(out)], out.parent / f"{out.name}.paused", call)
    reached = torch.load(out, weights_only=True)["epoch"]
    assert reached == expected, f"killed after call {call} of {what}: checkpoint of epoch {reached}, expected {expected} (NONN_KILL_SEED={seed})"
    return reached, seed


def assert_same_tensors(a: dict, b: dict, what: str, seed: int) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs after resume (NONN_KILL_SEED={seed})"


def straight_and_resumed_after_kill(argv: list[str], tmp_path, writes_per_epoch: int) -> tuple[dict, dict, int, int]:
    """Run 4-epoch `argv` straight through, then again killed at a random point and resumed.

    Returns both checkpoints, the epoch the killed run had reached and the kill seed.
    """
    assert main([*argv, "--out", str(tmp_path / "straight.pt")]) == 0
    killed = tmp_path / "killed.pt"
    reached, seed = kill_training(argv, killed, STEPS_PER_EPOCH, writes_per_epoch, epochs=4)
    assert main([*argv, "--out", str(killed), "--resume"]) == 0
    a, b = torch.load(tmp_path / "straight.pt", weights_only=True), torch.load(killed, weights_only=True)
    assert b["epoch"] == 4
    return a, b, reached, seed


@pytest.mark.slow
def test_teacher_killed_at_a_random_point_resumes_to_the_same_weights(files, tmp_path):
    argv = ["train-teacher", "--dataset", str(files["data"]), "--arch", "cnn-small", "--width", "4", "--epochs", "4",
            "--batch-size", str(BATCH), "--lr", "0.05", "--seed", "3", "--device", "cpu", "--threads", "1", "--no-progress"]  # fmt: skip
    a, b, reached, seed = straight_and_resumed_after_kill(argv, tmp_path, writes_per_epoch=1)  # the checkpoint
    assert_same_tensors(a["state_dict"], b["state_dict"], f"teacher killed after epoch {reached}", seed)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


@pytest.mark.slow
def test_students_killed_at_a_random_point_resume_to_the_same_weights(files, tmp_path):
    argv = ["train-students", "--teacher", str(files["teacher"]), "--partition", str(files["partition"]),
            "--dataset", str(files["data"]), "--arch", "cnn-small:width=4", "--epochs", "4", "--batch-size", str(BATCH),
            "--lr", "0.05", "--beta", "10", "--student-dropout", "0.3", "--seed", "1", "--device", "cpu",
            "--threads", "1", "--no-progress"]  # fmt: skip
    a, b, reached, seed = straight_and_resumed_after_kill(argv, tmp_path, writes_per_epoch=2)  # checkpoint, metrics log
    for k, (sa, sb) in enumerate(zip(a["students"], b["students"])):
        assert_same_tensors(sa["state_dict"], sb["state_dict"], f"student {k}, killed after epoch {reached}", seed)
    assert_same_tensors(a["head"], b["head"], "head", seed)


# A `nonn` command that pauses right after the N-th call of a chosen function (a marker file
# written), so the test can SIGKILL it at that point of its work: mid-training, or while a new
# artifact is half-made.
_PAUSED_RUN = textwrap.dedent(
    """
    import functools, importlib, sys, time
    module_name, attribute, marker, call = sys.argv[1:5]
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    real = getattr(owner, name)
    calls = 0

    @functools.wraps(real)
    def paused(*args, **kwargs):
        global calls
        result = real(*args, **kwargs)
        calls += 1
        if calls == int(call):
            open(marker, "w").close()
            time.sleep(600)
        return result

    setattr(owner, name, paused)
    from nonn.cli import main
    sys.exit(main(sys.argv[5:]))
    """
)


def kill_during(module: str, attribute: str, argv: list[str], marker: Path, call: int = 1) -> None:
    """Run `nonn argv` with `module.attribute` pausing after its `call`-th call; SIGKILL it there."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED_RUN, module, attribute, str(marker), str(call), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)  # fmt: skip
    try:
        while not marker.exists():
            assert proc.poll() is None, f"the run ended before call {call} of {module}.{attribute}: {proc.stderr.read().decode()}"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def visible_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def test_partition_killed_while_writing_leaves_the_previous_one(tmp_path):
    from nonn.partition import Partition

    rng = np.random.default_rng(0)
    fan = rng.random((16, 16))
    fan = np.triu(fan, 1) + np.triu(fan, 1).T
    np.save(tmp_path / "fan.npy", fan)
    out = tmp_path / "partition.json"
    base = ["partition", "--fan", str(tmp_path / "fan.npy"), "--out", str(out), "--percentile", "50"]
    assert main([*base, "-K", "2"]) == 0
    before = out.read_bytes()
    # Killed after the new partition's bytes are on disk in a temporary file, before the rename.
    kill_during("os", "fsync", [*base, "-K", "4"], tmp_path / "marker")
    assert out.read_bytes() == before
    assert Partition.load(out).num_students == 2
    assert visible_files(tmp_path) == ["fan.npy", "marker", "partition.json"]
    # The next run is not confused by what the killed one left behind.
    assert main([*base, "-K", "4"]) == 0
    assert Partition.load(out).num_students == 4


@pytest.mark.slow
def test_export_killed_while_writing_leaves_the_previous_bundle(files, tmp_path):
    from nonn.runtime.bundle import Bundle
    from nonn.runtime.bundle_check import verify_bundle

    from fleet_testing import make_bundle

    students = tmp_path / "students.pt"
    assert main(["train-students", "--teacher", str(files["teacher"]), "--partition", str(files["partition"]),
                 "--dataset", str(files["data"]), "--arch", "cnn-small:width=4", "--epochs", "1", "--batch-size", "64",
                 "--limit", "64", "--eval-limit", "16", "--beta", "10", "--device", "cpu", "--threads", "1",
                 "--no-progress", "--out", str(students)]) == 0  # fmt: skip
    out = tmp_path / "bundle"
    make_bundle(out, feature_sizes=(3, 2, 3))  # the deployed bundle (three students)
    manifest = (out / "manifest.json").read_bytes()
    hashes = {p.name: sha256_file(p) for p in out.rglob("*") if p.is_file()}
    # Killed after the first model of the new bundle was written and hashed.
    kill_during("nonn.students.export", "sha256_file", ["export", "--students", str(students), "--out", str(out), "--overwrite"], tmp_path / "marker")
    assert (out / "manifest.json").read_bytes() == manifest
    assert {p.name: sha256_file(p) for p in out.rglob("*") if p.is_file()} == hashes
    assert verify_bundle(out) == []
    assert Bundle.load(out).num_students == 3
    assert visible_files(tmp_path) == ["bundle", "marker", "students.pt", "students.pt.metrics.jsonl"]
