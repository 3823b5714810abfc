"""Durability: training killed (SIGKILL) at a random point and resumed; artifacts killed mid-write.

A kill is a real SIGKILL of a `nonn` subprocess: no exception handler, no cleanup. The resumed
run must end with exactly the weights of an uninterrupted run (tiny data, CPU, fixed seed), and a
write killed half-way must leave the previous artifact as it was.
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


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("durability")
    data = make_npz(root / "bars.npz", n_train=768, n_test=48)
    teacher = make_teacher(root / "teacher.pt", data, steps=5)
    partition = make_partition(root / "partition.json", teacher)
    return {"root": root, "data": data, "teacher": teacher, "partition": partition}


def kill_rng() -> tuple[random.Random, int]:
    """A fresh random kill point each run; the seed is in every failure message to replay it."""
    seed = int(os.environ.get("NONN_KILL_SEED", time.time_ns() % 1_000_000))
    return random.Random(seed), seed


def run_and_kill(argv: list[str], checkpoint: Path, delay_s: float, timeout_s: float = 120) -> int:
    """Start `nonn argv`; once its first checkpoint exists wait `delay_s`, then SIGKILL it.

    Returns the process's exit status (-9 when the kill landed, 0 if it finished first).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "nonn", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + timeout_s
        while not checkpoint.exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        time.sleep(delay_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


def kill_training(argv: list[str], out: Path, epoch_s: float, epochs: int) -> tuple[int, int]:
    """SIGKILL `nonn argv --out out` at a random point after its first checkpoint; returns (epoch reached, seed).

    The point is drawn from the remaining epochs' time (from the uninterrupted run's per-epoch
    seconds); should a slow machine let the run finish first, it is drawn again from half the span.
    """
    rng, seed = kill_rng()
    span = (epochs - 1.5) * epoch_s
    for _ in range(3):
        out.unlink(missing_ok=True)
        status = run_and_kill([*argv, "--out", str(out)], out, rng.uniform(0, span))
        if status == -signal.SIGKILL:
            reached = torch.load(out, weights_only=True)["epoch"]
            assert 1 <= reached < epochs, f"NONN_KILL_SEED={seed}"
            return reached, seed
        assert status == 0, f"the run failed on its own (status {status})"
        span /= 2
    raise AssertionError(f"every run finished before its kill (NONN_KILL_SEED={seed})")


def assert_same_tensors(a: dict, b: dict, what: str, seed: int) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs after resume (NONN_KILL_SEED={seed})"


def straight_and_resumed_after_kill(argv: list[str], tmp_path) -> tuple[dict, dict, int, int]:
    """Run 4-epoch `argv` straight through, then again killed at a random point and resumed.

    Returns both checkpoints, the epoch the killed run had reached and the kill seed.
    """
    assert main([*argv, "--out", str(tmp_path / "straight.pt")]) == 0
    epoch_s = float(np.median([h["seconds"] for h in torch.load(tmp_path / "straight.pt", weights_only=True)["history"]]))
    killed = tmp_path / "killed.pt"
    # Anywhere in the epochs after the first checkpoint: mid-epoch, mid-evaluation or mid-write.
    reached, seed = kill_training(argv, killed, epoch_s, epochs=4)
    assert main([*argv, "--out", str(killed), "--resume"]) == 0
    a, b = torch.load(tmp_path / "straight.pt", weights_only=True), torch.load(killed, weights_only=True)
    assert b["epoch"] == 4
    return a, b, reached, seed


@pytest.mark.slow
def test_teacher_killed_at_a_random_point_resumes_to_the_same_weights(files, tmp_path):
    argv = ["train-teacher", "--dataset", str(files["data"]), "--arch", "cnn-small", "--width", "4", "--epochs", "4",
            "--batch-size", "16", "--lr", "0.05", "--seed", "3", "--device", "cpu", "--threads", "1", "--no-progress"]  # fmt: skip
    a, b, reached, seed = straight_and_resumed_after_kill(argv, tmp_path)
    assert_same_tensors(a["state_dict"], b["state_dict"], f"teacher killed after epoch {reached}", seed)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


@pytest.mark.slow
def test_students_killed_at_a_random_point_resume_to_the_same_weights(files, tmp_path):
    argv = ["train-students", "--teacher", str(files["teacher"]), "--partition", str(files["partition"]),
            "--dataset", str(files["data"]), "--arch", "cnn-small:width=4", "--epochs", "4", "--batch-size", "16",
            "--lr", "0.05", "--beta", "10", "--student-dropout", "0.3", "--seed", "1", "--device", "cpu",
            "--threads", "1", "--no-progress"]  # fmt: skip
    a, b, reached, seed = straight_and_resumed_after_kill(argv, tmp_path)
    for k, (sa, sb) in enumerate(zip(a["students"], b["students"])):
        assert_same_tensors(sa["state_dict"], sb["state_dict"], f"student {k}, killed after epoch {reached}", seed)
    assert_same_tensors(a["head"], b["head"], "head", seed)


# A `nonn` command whose write pauses at a chosen call (marker file written), so the test can
# SIGKILL it while the new artifact is half-made.
_PAUSED_RUN = textwrap.dedent(
    """
    import importlib, sys, time
    module_name, attribute, marker = sys.argv[1:4]
    module = importlib.import_module(module_name)
    real = getattr(module, attribute)

    def paused(*args, **kwargs):
        result = real(*args, **kwargs)
        open(marker, "w").close()
        time.sleep(120)
        return result

    setattr(module, attribute, paused)
    from nonn.cli import main
    sys.exit(main(sys.argv[4:]))
    """
)


def kill_during(module: str, attribute: str, argv: list[str], marker: Path) -> None:
    """Run `nonn argv` with `module.attribute` pausing after its first call; SIGKILL it there."""
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED_RUN, module, attribute, str(marker), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the write never started"
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
    assert main([*base, "--students", "2"]) == 0
    before = out.read_bytes()
    # Killed after the new partition's bytes are on disk in a temporary file, before the rename.
    kill_during("os", "fsync", [*base, "--students", "4"], tmp_path / "marker")
    assert out.read_bytes() == before
    assert Partition.load(out).num_students == 2
    assert visible_files(tmp_path) == ["fan.npy", "marker", "partition.json"]
    # The next run is not confused by what the killed one left behind.
    assert main([*base, "--students", "4"]) == 0
    assert Partition.load(out).num_students == 4


@pytest.mark.slow
def test_export_killed_while_writing_leaves_the_previous_bundle(files, tmp_path):
    from nonn.runtime.bundle import Bundle, verify_bundle

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
    kill_during("nonn.students.export", "sha256_file", ["export", "--students", str(students), "--out", str(out)], tmp_path / "marker")
    assert (out / "manifest.json").read_bytes() == manifest
    assert {p.name: sha256_file(p) for p in out.rglob("*") if p.is_file()} == hashes
    assert verify_bundle(out) == []
    assert Bundle.load(out).num_students == 3
    assert visible_files(tmp_path) == ["bundle", "marker", "students.pt", "students.pt.metrics.jsonl"]
