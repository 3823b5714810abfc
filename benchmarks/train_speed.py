"""Images/s of joint student training (train_students) against a minimal hand-written loop.

Both sides do the same work per batch: the same seeded BatchLoader (shuffle, crop, flip,
normalise), the frozen teacher's forward under inference_mode (logits + final feature map),
the K students and the head, KD + pooled activation transfer, backward and an SGD step, with
models and batches in channels_last. train_students adds what a real run needs (forward hook,
running metrics, DDP-ready wrapper, layout and precision choice); this measures what that
costs. Each side's time covers the training pass only and is read after the device has
finished its queued work (train_students reports its per-epoch images/s without the
evaluation); the two sides alternate --repeat times and the best pass of each is compared.

    python benchmarks/train_speed.py                      # CPU, 2048 Fashion-MNIST images
    python benchmarks/train_speed.py --device cuda --images 20000 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from nonn.partition import Partition
from nonn.students.checkpoint import save_checkpoint
from nonn.students.data import load_dataset
from nonn.students.ensemble import build_ensemble, parse_arch_list
from nonn.students.loader import make_loader
from nonn.students.models import create_model
from nonn.students.precision import synchronize
from nonn.students.train import StudentsConfig, resolve_device, train_students
from student_setup import add_setup_args, interleaved_groups, students_step


def hand_written_pass(teacher, ensemble, optimizer, loader, partition_order, device, alpha, temperature, beta) -> float:
    """One training pass written out plainly; returns images/s."""
    ensemble.train()
    seen = 0
    synchronize(device)
    start = time.perf_counter()
    for x, y in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with torch.inference_mode():
            t_map = teacher.forward_features(x)
            t_logits = teacher.forward_head(t_map)
        students_step(ensemble, optimizer, x, y, t_logits, t_map, partition_order, alpha, temperature, beta)
        seen += len(y)
    synchronize(device)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(parser, repeat=4, repeat_help="alternating passes per side; the best counts", threads=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = load_dataset(args.dataset, args.data_dir)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        teacher = create_model(args.teacher_arch, data.num_classes, data.input_shape[0])
        save_checkpoint({"format": "nonn.teacher/1", "arch": teacher.arch, "state_dict": teacher.state_dict(),
                         "dataset": data.meta(), "feature_layer": teacher.feature_layer}, tmp / "teacher.pt")
        c = teacher.num_features
        groups = interleaved_groups(c, args.students)
        Partition(num_filters=c, groups=groups, strategy="balanced", layer=teacher.feature_layer).save(tmp / "partition.json")
        teacher = teacher.to(device, memory_format=torch.channels_last).eval()
        with torch.no_grad():
            out_hw = tuple(teacher.forward_features(torch.zeros(1, *data.input_shape, device=device)).shape[2:])
        partition_order = torch.tensor([i for g in groups for i in g], device=device)

        def run_joint(rep: int) -> float:
            config = StudentsConfig(
                partition=str(tmp / "partition.json"), out=str(tmp / f"students-{rep}.pt"), teacher=str(tmp / "teacher.pt"),
                dataset=args.dataset, data_dir=args.data_dir, arch=args.arch, epochs=1, batch_size=args.batch_size,
                train_limit=args.images, eval_limit=256, device=str(device), precision="fp32", progress=False,
            )
            return train_students(config)["history"][-1]["images_per_s"]

        def run_hand() -> float:
            torch.manual_seed(0)
            ensemble = build_ensemble(parse_arch_list(args.arch, args.students), groups, data.num_classes,
                                      data.input_shape[0], out_hw).to(device, memory_format=torch.channels_last)
            optimizer = torch.optim.SGD(ensemble.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
            loader = make_loader(data, "train", batch_size=args.batch_size, train=True, seed=0, limit=args.images)
            return hand_written_pass(teacher, ensemble, optimizer, loader, partition_order, device, 0.9, 4.0, 1e4)

        joint, hand = [], []
        for rep in range(args.repeat):
            # Alternate which side goes first, so drift in machine load favours neither.
            if rep % 2 == 0:
                joint.append(run_joint(rep))
                hand.append(run_hand())
            else:
                hand.append(run_hand())
                joint.append(run_joint(rep))
            print(f"pass {rep + 1}: train_students {joint[-1]:.1f} images/s, hand-written loop {hand[-1]:.1f} images/s")

    best_joint, best_hand = max(joint), max(hand)
    result = {
        "device": str(device), "threads": args.threads, "images": args.images, "batch_size": args.batch_size,
        "teacher": args.teacher_arch, "students": args.students, "arch": args.arch,
        "train_students_images_per_s": round(best_joint, 1), "hand_written_images_per_s": round(best_hand, 1),
        "ratio": round(best_joint / best_hand, 3),
        "ratio_per_pass": [round(j / h, 3) for j, h in zip(joint, hand)],
    }
    print(json.dumps(result, indent=2))
    print(f"train_students runs at {100 * best_joint / best_hand:.1f}% of the hand-written loop's speed (goal: >= 90%)")


if __name__ == "__main__":
    main()
