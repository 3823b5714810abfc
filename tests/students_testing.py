"""Tiny fixtures for the students tests: a synthetic data set, a small teacher, a partition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nonn.artifacts import sha256_file
from nonn.partition import Partition
from nonn.students.checkpoint import save_checkpoint
from nonn.students.data import load_dataset
from nonn.students.models import create_model

TEACHER_ARCH = {"name": "cnn-small", "num_classes": 3, "in_channels": 1, "kwargs": {"width": 4}}
NUM_FILTERS = 8  # cnn-small width 4 ends in 2 * 4 channels


def make_npz(path: Path, n_train: int = 96, n_test: int = 48, seed: int = 0) -> Path:
    """Three classes of 8x8 images: a bright bar (horizontal, vertical, diagonal) on noise."""
    rng = np.random.default_rng(seed)

    def images(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 3
        x = rng.uniform(0, 0.3, size=(n, 8, 8)).astype(np.float32)
        for i, label in enumerate(y):
            pos = rng.integers(1, 7)
            if label == 0:
                x[i, pos, :] = 1.0
            elif label == 1:
                x[i, :, pos] = 1.0
            else:
                np.fill_diagonal(x[i], 1.0)
        return x, y.astype(np.int64)

    x, y = images(n_train)
    x_test, y_test = images(n_test)
    np.savez(path, x=x, y=y, x_test=x_test, y_test=y_test)
    return path


def make_teacher(path: Path, data_path: Path, steps: int = 30, arch: dict | None = None) -> Path:
    """A small teacher trained for a few steps on the synthetic set, saved as nonn.teacher/1."""
    arch = arch or TEACHER_ARCH
    torch.manual_seed(0)
    model = create_model(**arch)
    data = load_dataset(str(data_path))
    x = torch.from_numpy(data.normalize(data.train_x))
    y = torch.from_numpy(data.train_y)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    save_checkpoint(
        {"format": "nonn.teacher/1", "arch": model.arch, "state_dict": model.state_dict(), "dataset": data.meta(),
         "feature_layer": model.feature_layer, "epoch": 1},
        path,
    )
    return path


def make_partition(path: Path, teacher_path: Path, groups=((0, 2, 5), (1, 3, 4, 6, 7)), num_filters: int = NUM_FILTERS,
                   arch: dict | None = None) -> Path:
    Partition(
        num_filters=num_filters,
        groups=[list(g) for g in groups],
        strategy="balanced",
        layer="act",
        teacher={"fingerprint": sha256_file(teacher_path), "arch": arch or TEACHER_ARCH},
    ).save(path)
    return path
