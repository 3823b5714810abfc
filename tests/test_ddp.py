"""Students training under torchrun: two CPU processes with gloo, on tiny data."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from students_testing import make_npz, make_partition, make_teacher


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_torchrun_two_cpu_processes(tmp_path):
    data = make_npz(tmp_path / "bars.npz")
    teacher = make_teacher(tmp_path / "teacher.pt", data)
    partition = make_partition(tmp_path / "partition.json", teacher)
    out = tmp_path / "run" / "students.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "nonn", "train-students", "--teacher", str(teacher), "--partition", str(partition),
        "--dataset", str(data), "--arch", "cnn-small:width=4", "--epochs", "2", "--batch-size", "16",
        "--beta", "10", "--student-dropout", "0.2", "--device", "cpu", "--threads", "1",
        "--out", str(out), "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["complete"]
    for entry in ckpt["history"]:
        # Both ranks trained on their half of every global batch: together, the whole set.
        assert entry["world_size"] == 2
        assert entry["train_images"] == 96
    # Only rank 0 wrote: one checkpoint, one metrics log, no stray temporary files.
    assert sorted(p.name for p in out.parent.iterdir()) == ["students.pt", "students.pt.metrics.jsonl"]
    assert proc.stdout.count("train-students: wrote") == 1


# A teacher brought by the user whose logits turn NaN on rank 1 only, at the last training step
# of epoch 1 (its forward call 7: one probe, then six batches of 16 of the 96 images). The NaN
# reaches rank 0's weights through DDP's gradient all-reduce only after rank 0 has summed its
# last loss, so rank 0's own sums are still finite: the case that left rank 0 waiting forever.
POISONED_TEACHER = '''
import os

import torch
from torch import nn


class PoisonedTeacher(nn.Module):
    feature_layer = "act"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        logits = self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))
        if os.environ["RANK"] == "1" and self.calls == 7:
            logits = logits * float("nan")
        return logits


def make():
    return PoisonedTeacher()
'''


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_nan_on_one_rank_stops_every_rank_with_a_clear_error(tmp_path):
    """Ranks started as any launcher starts them (no torchrun agent to kill the survivors)."""
    data = make_npz(tmp_path / "bars.npz")
    factory = tmp_path / "poisoned.py"
    factory.write_text(POISONED_TEACHER)
    partition = make_partition(tmp_path / "partition.json", factory, groups=((0, 1, 2, 3), (4, 5, 6, 7)))
    argv = [
        sys.executable, "-m", "nonn", "train-students", "--teacher-factory", f"{factory}:make", "--layer", "act",
        "--partition", str(partition), "--dataset", str(data), "--arch", "cnn-small:width=4", "--epochs", "2",
        "--batch-size", "16", "--beta", "10", "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "s.pt"),
        "--no-progress", "--normalize", "dataset",  # an untrained teacher: auto would refuse it as near chance
        "--force",  # the partition names the factory file, not this teacher's weights
    ]
    base = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(argv, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    try:
        # Generous: both ranks end within seconds; a rank left waiting in a collective never does.
        outputs = [rank.communicate(timeout=150) for rank in ranks]
    except subprocess.TimeoutExpired:
        pytest.fail("a rank was still running 150 s after the NaN: it hung waiting for the other")
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.wait()
    for r, (rank, (stdout, stderr)) in enumerate(zip(ranks, outputs)):
        assert rank.returncode == 1, f"rank {r}: exit {rank.returncode}\n{stderr[-3000:]}"
        assert "nonn: error: training diverged in epoch 1 on at least one of 2 ranks" in stderr, f"rank {r}:\n{stderr[-3000:]}"
        assert "Traceback" not in stderr, f"rank {r}:\n{stderr[-3000:]}"
    assert not (tmp_path / "s.pt").exists()
