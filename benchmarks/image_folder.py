"""Image folders: decoding throughput with DataLoader workers, and peak memory while partitioning.

Writes (or reuses) a folder of N PNG images in the ImageFolder layout, then

1. reads the training split in batches, with 0, 1, 2, ... decoding worker processes, alone and
   with a small ResNet forward pass per batch (what `nonn partition` does), and prints images/s
   and the ratio to decoding in the main process;
2. runs `nonn partition` on the folder and on the same images as an in-memory .npz, sampling
   the resident memory of the whole process tree (workers included), and prints both peaks
   beside the size of the decoded images.

    python benchmarks/image_folder.py --images 3000 --size 96 --batch-size 64 --workers 0,1,2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from torch import nn

HERE = Path(__file__).resolve()


def teacher() -> nn.Module:
    """A small torchvision-style network (conv stem, four stages, pooled linear head); random weights."""
    torch.manual_seed(0)

    def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    model = nn.Sequential()
    model.add_module("conv1", stage(3, 16, 2))
    for i, (cin, cout) in enumerate([(16, 16), (16, 32), (32, 64), (64, 64)], start=1):
        model.add_module(f"layer{i}", stage(cin, cout, 1 if i == 1 else 2))
    model.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    model.add_module("fc", nn.Linear(64, 3))
    return model.eval()


def write_folder(root: Path, images: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(images):
        label = i % 3
        x = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        x[:, :, label] //= 2
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x).save(folder / f"{i:05d}.png")


def throughput(data, batch_size: int, workers: int, model: nn.Module | None) -> float:
    from nonn.students.loader import make_loader

    loader = make_loader(data, "train", batch_size=batch_size, train=True, contract=data.contract("none"), workers=workers)
    started = time.perf_counter()
    seen = 0
    with torch.no_grad():
        for x, y in loader:
            if model is not None:
                model(x)
            seen += len(y)
    return seen / (time.perf_counter() - started)


def peak_rss_mb(command: list[str]) -> tuple[float, int]:
    """Run `command`; sample the RSS of it and all its descendants every 20 ms; return (peak MB, exit code)."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                total = sum(p.memory_info().rss for p in tree if p.is_running())
                peak[0] = max(peak[0], total)
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode:
        print(err.decode(errors="replace")[-2000:], file=sys.stderr)
    return peak[0] / 2**20, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="0,1,2", help="comma list of worker counts to time")
    parser.add_argument("--folder", default=None, help="reuse this folder (written there when empty)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from nonn.students.data import load_dataset

    folder = Path(args.folder or tempfile.mkdtemp(prefix="nonn-folder-"))
    if not any(folder.glob("class_*/*.png")):
        started = time.perf_counter()
        write_folder(folder, args.images, args.size)
        print(f"wrote {args.images} {args.size}x{args.size} RGB PNGs to {folder} in {time.perf_counter() - started:.1f} s")
    data = load_dataset(str(folder))
    n = data.split_size("train")
    decoded_mb = n * 3 * args.size * args.size * 4 / 2**20
    print(f"{data}; training split decoded as float32: {decoded_mb:.0f} MB, one batch: "
          f"{args.batch_size * 3 * args.size * args.size * 4 / 2**20:.1f} MB; {os.cpu_count()} CPUs")

    if not args.skip_throughput:
        model = teacher()
        print(f"{'workers':>8} {'decode img/s':>13} {'ratio':>6} {'decode+forward img/s':>21} {'ratio':>6}")
        base = None
        for w in [int(v) for v in args.workers.split(",")]:
            decode = throughput(data, args.batch_size, w, None)
            both = throughput(data, args.batch_size, w, model)
            base = base or (decode, both)
            print(f"{w:>8} {decode:>13.0f} {decode / base[0]:>6.2f} {both:>21.0f} {both / base[1]:>6.2f}")

    npz = folder.parent / f"{folder.name}.npz"
    if not npz.exists():
        x = data.read("train", np.arange(n))
        np.savez(npz, x=x, y=data.labels("train"), x_test=data.read("test", np.arange(data.split_size("test"))),
                 y_test=data.labels("test"))
    common = [sys.executable, "-m", "nonn", "partition", "--teacher-factory", f"{HERE}:teacher", "--layer", "layer4",
              "--normalize", "none", "-K", "2", "--top-k", "16", "--batch-size", str(args.batch_size), "--no-progress",
              "--device", "cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        folder_peak, rc1 = peak_rss_mb(common + ["--dataset", str(folder), "--out", f"{tmp}/a.json", "--data-workers", "1"])
        folder_peak0, rc0 = peak_rss_mb(common + ["--dataset", str(folder), "--out", f"{tmp}/c.json", "--data-workers", "0"])
        memory_peak, rc2 = peak_rss_mb(common + ["--dataset", str(npz), "--out", f"{tmp}/b.json"])
    print(f"peak RSS of `nonn partition` over {n} images (process tree, sampled every 20 ms):")
    print(f"  image folder, 0 workers:  {folder_peak0:7.0f} MB")
    print(f"  image folder, 1 worker:   {folder_peak:7.0f} MB")
    print(f"  same images as .npz:      {memory_peak:7.0f} MB (held in memory as float32: {decoded_mb:.0f} MB)")
    print(f"  ratio npz / folder (0 workers): {memory_peak / folder_peak0:.2f}")
    return rc0 or rc1 or rc2


if __name__ == "__main__":
    sys.exit(main())
