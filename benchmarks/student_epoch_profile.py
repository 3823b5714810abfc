"""Where a student training step spends its time on CPU, and what channels_last + inference_mode buy.

    python benchmarks/student_epoch_profile.py                   # Fashion-MNIST, WRN-16-2 teacher, 2 x WRN-10-1 (width 10)
    python benchmarks/student_epoch_profile.py --threads 2 --images 4096

One training pass of K students distilled from a frozen teacher, split into its parts, each
timed over the same batches: loading the batches (the seeded BatchLoader: shuffle, crop, flip,
normalise), the teacher's forward pass (logits and final feature map), and the students'
forward, loss, backward and SGD step. Two layouts side by side, alternating passes (the best of
--repeat counts, so machine-load drift favours neither):

- before: NCHW tensors, the teacher under torch.no_grad();
- after:  channels_last models and batches, the teacher under torch.inference_mode()
          (what train_students does on CPU, except for models oneDNN mishandles there);
- compiled (with --compile): after, with the teacher's forward through torch.compile (its
          first pass includes the compiling, printed apart; the best pass counts).

It prints each part's time and share of the step, and the whole step's images/s before and
after with their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from nonn.students.data import load_dataset
from nonn.students.ensemble import build_ensemble, parse_arch_list
from nonn.students.loader import make_loader
from nonn.students.layout import to_layout
from nonn.students.models import create_model
from student_setup import add_setup_args, interleaved_groups, students_step


def run_pass(layout: str, teacher, students_template, groups, data, args, compiled=None) -> dict[str, float]:
    """One pass over --images images; seconds spent loading, in the teacher, in the students.

    `compiled`: the torch.compile'd teacher forward (x -> logits, feature map) of the "compiled" layout.
    """
    channels_last = layout != "before"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    teacher = teacher.to(memory_format=fmt).eval()
    torch.manual_seed(0)
    ensemble = students_template().to(memory_format=fmt)
    optimizer = torch.optim.SGD(ensemble.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    order = torch.tensor([i for g in groups for i in g])
    frozen = torch.inference_mode if channels_last else torch.no_grad
    loader = make_loader(data, "train", batch_size=args.batch_size, train=True, seed=0, limit=args.images)
    times = {"load": 0.0, "teacher": 0.0, "students": 0.0}
    seen = 0
    batches = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            break
        x = to_layout(x, torch.device("cpu"), fmt)  # exact strides: a 1-channel batch fits both layouts
        t1 = time.perf_counter()
        with frozen():
            if compiled is not None:
                t_logits, t_map = compiled(x)
            else:
                t_map = teacher.forward_features(x)
                t_logits = teacher.forward_head(t_map)
        t2 = time.perf_counter()
        students_step(ensemble, optimizer, x, y, t_logits, t_map, order)
        t3 = time.perf_counter()
        times["load"] += t1 - t0
        times["teacher"] += t2 - t1
        times["students"] += t3 - t2
        seen += len(y)
    times["images"] = seen
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(parser, repeat=3, repeat_help="alternating passes per layout; the best counts", threads=1)
    parser.add_argument("--compile", action="store_true", help="also time the teacher's forward through torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, args.data_dir)
    torch.manual_seed(0)
    teacher = create_model(args.teacher_arch, data.num_classes, data.input_shape[0])
    c = teacher.num_features
    groups = interleaved_groups(c, args.students)
    with torch.no_grad():
        out_hw = tuple(teacher.eval().forward_features(torch.zeros(1, *data.input_shape)).shape[2:])

    def students_template():
        return build_ensemble(parse_arch_list(args.arch, args.students), groups, data.num_classes, data.input_shape[0], out_hw)

    layouts = ("before", "after", "compiled") if args.compile else ("before", "after")
    compiled = None
    if args.compile:
        cl_teacher = teacher.to(memory_format=torch.channels_last).eval()

        def teacher_forward(x):
            t_map = cl_teacher.forward_features(x)
            return cl_teacher.forward_head(t_map), t_map

        compiled = torch.compile(teacher_forward)
    best: dict[str, dict[str, float]] = {}
    first_teacher_s: dict[str, float] = {}
    for rep in range(args.repeat):
        for layout in layouts if rep % 2 == 0 else layouts[::-1]:
            t = run_pass(layout, teacher, students_template, groups, data, args, compiled if layout == "compiled" else None)
            step = t["load"] + t["teacher"] + t["students"]
            first_teacher_s.setdefault(layout, t["teacher"])
            print(f"pass {rep + 1} {layout:>8}: {t['images'] / step:7.1f} images/s "
                  f"(load {t['load']:.2f} s, teacher {t['teacher']:.2f} s, students {t['students']:.2f} s)", flush=True)
            if layout not in best or step < best[layout]["step"]:
                best[layout] = {**t, "step": step}
    print(f"\n{args.threads} thread(s), {args.images} images, batch {args.batch_size}, teacher {args.teacher_arch}, "
          f"{args.students} x {args.arch} (best pass of {args.repeat})")
    print(f"{'layout':>8} {'images/s':>9} {'load':>13} {'teacher':>13} {'students':>13}")
    for layout in layouts:
        t = best[layout]
        parts = "".join(f" {t[k]:6.2f} s {100 * t[k] / t['step']:3.0f}%" for k in ("load", "teacher", "students"))
        print(f"{layout:>8} {t['images'] / t['step']:9.1f}{parts}")
    print(f"after / before: {best['before']['step'] / best['after']['step']:.2f}x the images/s")
    if args.compile:
        print(f"compiled / after: {best['after']['step'] / best['compiled']['step']:.2f}x the images/s "
              f"(teacher {best['after']['teacher'] / best['compiled']['teacher']:.2f}x); compiling cost about "
              f"{first_teacher_s['compiled'] - best['compiled']['teacher']:.0f} s in the first pass")


if __name__ == "__main__":
    main()
