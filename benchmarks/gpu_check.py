"""GPU check of the training path: teacher and students, one short epoch each, in bf16 and fp16.

Runs the `nonn` commands as a user would, each in its own process, and prints what ran, the
precision it trained in, images/s, skipped fp16 steps and the exit status:

1. train-teacher (wrn-16-2) in bf16, then in fp16 (loss scaling);
2. partition the bf16 teacher's filters into K = 2 groups;
3. train-students (2 x wrn-16-1) in bf16, then in fp16;
4. with 2 or more GPUs visible: train-students under torchrun on 2 GPUs (nccl), and again
   with --sync-bn.

Fashion-MNIST is used when its files are found, otherwise a synthetic 28x28 set written to
the output folder (speed and precision do not depend on the pixels). The whole check takes a
few minutes on one GPU; `--device cpu` runs the same steps on CPU autocast with 128 images
(several minutes: CPU autocast is slow), to check the script itself on a machine without a GPU.

    python benchmarks/gpu_check.py                    # on a machine with a GPU
    python benchmarks/gpu_check.py --device cpu       # the same steps on CPU, small
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_set(path: Path, train: int, test: int) -> Path:
    """Ten classes of 28x28 noise with a class-dependent bright square: learnable, any size."""
    rng = np.random.default_rng(0)

    def images(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, n)
        x = rng.uniform(0, 0.4, size=(n, 28, 28)).astype(np.float32)
        for i, label in enumerate(y):
            r, c = divmod(int(label), 4)
            x[i, 2 + 6 * r : 8 + 6 * r, 2 + 6 * c : 8 + 6 * c] += 0.6
        return x, y.astype(np.int64)

    x, y = images(train)
    x_test, y_test = images(test)
    np.savez(path, x=x, y=y, x_test=x_test, y_test=y_test)
    return path


class Check:
    """Runs the steps, collects one result row each, never stops at a failed step."""

    def __init__(self, out: Path, device: str, timeout_s: float) -> None:
        self.out, self.device, self.timeout_s = out, device, timeout_s
        self.rows: list[dict] = []

    def run(self, name: str, argv: list[str], metrics: Path | None = None, launcher: list[str] | None = None) -> bool:
        cmd = [*(launcher or [sys.executable, "-m"]), "nonn", *argv]
        print(f"\n== {name}\n$ {' '.join(cmd)}", flush=True)
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s)
            status, tail = proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-6:]
        except subprocess.TimeoutExpired:
            status, tail = "timeout", [f"still running after {self.timeout_s:.0f} s: stopped"]
        seconds = time.perf_counter() - started
        print("\n".join(tail), flush=True)
        row = {"step": name, "status": status, "seconds": round(seconds, 1)}
        if status == 0 and metrics is not None and metrics.exists():
            last = json.loads(metrics.read_text().splitlines()[-1])
            row.update({k: last.get(k) for k in ("precision", "images_per_s", "skipped_steps", "loss_scale", "world_size")})
            row["loss"] = last.get("loss", last.get("train_loss"))
        self.rows.append(row)
        return status == 0

    def report(self) -> int:
        print("\n== summary")
        header = f"{'step':44s} {'status':>7s} {'precision':>9s} {'images/s':>9s} {'skipped':>7s} {'loss':>9s} {'wall s':>7s}"
        print(header)
        for r in self.rows:
            ips = "-" if r.get("images_per_s") is None else f"{r['images_per_s']:.0f}"
            skipped = "-" if r.get("skipped_steps") is None else str(r["skipped_steps"])
            loss = "-" if r.get("loss") is None else f"{r['loss']:.4f}"
            print(f"{r['step']:44s} {str(r['status']):>7s} {r.get('precision') or '-':>9s} {ips:>9s} {skipped:>7s} {loss:>9s} "
                  f"{r['seconds']:7.1f}")
        failed = [r["step"] for r in self.rows if r["status"] != 0]
        print(f"\n{len(self.rows) - len(failed)} of {len(self.rows)} steps passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
        return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a small run of the same steps)")
    parser.add_argument("--images", type=int, default=None, help="training images per epoch (default: 20000 on GPU, 128 on CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 256 on GPU, 64 on CPU")
    parser.add_argument("--out", default=None, help="folder for the checkpoints (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds allowed per step (default: 240)")
    args = parser.parse_args()

    import torch

    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        print(f"gpu_check: error: --device {args.device} but torch {torch.__version__} sees no CUDA device here; "
              "run it on a machine with a GPU, or with --device cpu to check the script itself", file=sys.stderr)
        return 2
    images = args.images or (20000 if on_gpu else 128)
    batch = str(args.batch_size or (256 if on_gpu else 64))
    gpus = torch.cuda.device_count() if on_gpu else 0
    if on_gpu:
        names = ", ".join(f"{torch.cuda.get_device_name(i)} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability(i)))})"
                          for i in range(gpus))
        print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {gpus} GPU(s): {names}")
    else:
        print(f"torch {torch.__version__} on CPU (CPU autocast for bf16 and fp16)")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        fashion = Path("/usr/share/datasets/fashion-mnist")
        if fashion.is_dir() and any(fashion.iterdir()):
            data = ["--dataset", "fashion-mnist"]
        else:
            data = ["--dataset", str(synthetic_set(out / "synthetic.npz", images, max(images // 8, 256)))]
        print(f"data: {data[1]}, {images} training images per epoch, batch {batch}")
        check = Check(out, args.device, args.timeout)
        common = [*data, "--limit", str(images), "--batch-size", batch, "--device", args.device, "--no-progress"]
        for precision in ("bf16", "fp16"):
            check.run(f"train-teacher wrn-16-2 {precision}",
                      ["train-teacher", *common, "--arch", "wrn-16-2", "--epochs", "1", "--precision", precision,
                       "--out", str(out / f"teacher-{precision}.pt"), "--metrics", str(out / f"teacher-{precision}.jsonl"), "--overwrite"],
                      out / f"teacher-{precision}.jsonl")
        teacher = out / "teacher-bf16.pt"
        if not check.run("partition K=2", ["partition", "--teacher", str(teacher), *data, "--limit", str(min(images, 5000)),
                                           "--device", args.device, "-K", "2", "--out", str(out / "partition.json"),
                                           "--no-progress"]):
            return check.report()
        students = ["train-students", "--teacher", str(teacher), "--partition", str(out / "partition.json"), *common,
                    "--arch", "wrn-16-1", "--epochs", "1", "--eval-limit", str(min(images, 2000)), "--overwrite"]
        for precision in ("bf16", "fp16"):
            path = out / f"students-{precision}.pt"
            check.run(f"train-students 2 x wrn-16-1 {precision}", [*students, "--precision", precision, "--out", str(path)],
                      Path(str(path) + ".metrics.jsonl"))
        if gpus >= 2:
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
            for extra in ([], ["--sync-bn"]):
                path = out / f"students-ddp{'-syncbn' if extra else ''}.pt"
                check.run(f"train-students torchrun 2 GPUs{' --sync-bn' if extra else ''}",
                          [*students, *extra, "--out", str(path)], Path(str(path) + ".metrics.jsonl"), launcher=torchrun)
        else:
            print(f"\n(2-rank DDP left out: {gpus} GPU(s) visible)")
        return check.report()


if __name__ == "__main__":
    sys.exit(main())
