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
    assert proc.stdout.count('"accuracy"') == 1
