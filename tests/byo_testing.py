"""A teacher and images nonn did not make: a torchvision-style ResNet and PNG image folders.

The ResNet follows torchvision's module names and structure (conv1, bn1, relu, maxpool,
layer1..layer4 of BasicBlocks with BatchNorm, avgpool, fc), so `--layer layer4` means what it
means for torchvision's resnet18. It is trained here the way a user trains one: plain PyTorch,
on images as stored (floats in [0, 1], no normalisation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision.models.ResNet's layout; `small_input` swaps the 7x7/2 stem and max-pool for a
    3x3/1 stem (the usual adaptation to small images)."""

    def __init__(self, widths: Sequence[int] = (8, 16, 32, 32), num_classes: int = 3, in_channels: int = 3,
                 small_input: bool = False) -> None:
        super().__init__()
        w0 = widths[0]
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, w0, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, w0, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(w0, widths[0])
        self.layer2 = BasicBlock(widths[0], widths[1], 2)
        self.layer3 = BasicBlock(widths[1], widths[2], 2)
        self.layer4 = BasicBlock(widths[2], widths[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def toy_resnet() -> ResNet:
    """The factory `--teacher-factory tests/byo_testing.py:toy_resnet` names."""
    torch.manual_seed(0)
    return ResNet()


def gray_resnet() -> ResNet:
    torch.manual_seed(0)
    return ResNet(in_channels=1, small_input=True)


def bar_images(n: int, size: int, channels: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes of uint8 (n, size, size[, channels]) images: a bright horizontal bar, a
    vertical bar or a diagonal, each on dark noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 90, size=(n, size, size, channels), dtype=np.uint8)
    width = max(1, size // 16)
    for i, label in enumerate(y):
        p = int(rng.integers(width, size - width))
        if label == 0:
            x[i, p - width : p + width, :] = 250
        elif label == 1:
            x[i, :, p - width : p + width] = 250
        else:
            for d in range(-width, width + 1):
                idx = np.arange(max(0, -d), min(size, size - d))
                x[i, idx, idx + d] = 250
    return (x[..., 0] if channels == 1 else x), y


def write_image_folder(root: Path, n: int, size: int, channels: int = 3, split: str | None = None, seed: int = 0,
                       classes: Sequence[str] = ("bar", "column", "diagonal")) -> Path:
    """PNG files root/[split/]<class>/<i>.png of `bar_images`."""
    x, y = bar_images(n, size, channels, seed)
    base = root / split if split else root
    for i, (image, label) in enumerate(zip(x, y)):
        folder = base / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root


def read_image_folder(root: Path, classes: Sequence[str] = ("bar", "column", "diagonal")) -> tuple[torch.Tensor, torch.Tensor]:
    """The folder as a user would read it: floats in [0, 1] (N, C, H, W), labels by sorted class name."""
    xs, ys = [], []
    for label, name in enumerate(sorted(classes)):
        for path in sorted((root / name).glob("*.png")):
            pixels = np.asarray(Image.open(path), dtype=np.float32) / 255.0
            xs.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
            ys.append(label)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


def train_as_stored(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 40, batch: int = 32, lr: float = 0.05) -> nn.Module:
    """Plain PyTorch training on images as stored (no normalisation), as a user would.

    One torch thread: several times faster than two when the other core is busy."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch,))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()
