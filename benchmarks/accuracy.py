"""NoNN on Fashion-MNIST: K = 2 and K = 4 students against their teacher and three baselines.

One command trains (or reuses, --teacher) a teacher, partitions its final-layer filters for
K = 2 and K = 4 (balanced strategy), trains NoNN with and without student dropout, and the
three ablations with the same data, epochs and recipe:

- single-kd:        one student of the same per-device size, trained with KD only;
- random-partition: K students on a random partition of the filters (same group sizes);
- no-at:            K students without activation transfer.

It writes <out>/accuracy.json and <out>/accuracy.md: accuracy, parameters per device, the
teacher/student parameter ratio, accuracy with one device lost (worst and mean over devices).
Runs already finished in <out> are reused (the checkpoints resume), so an interrupted
benchmark continues where it stopped.

    python benchmarks/accuracy.py --quick                           # CPU, minutes (subset, few epochs)
    python benchmarks/accuracy.py --teacher runs/fmnist/teacher.pt --quick
    python benchmarks/accuracy.py --teacher runs/fmnist/teacher.pt --device cuda   # full setting

The student backbone, unless --arch is given, is the largest thin Wide ResNet from the model
registry whose whole student (backbone + bridge) has at most 1/20 of the teacher's parameters.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from nonn.artifacts import atomic_write_json, atomic_write_text
from nonn.students.ensemble import build_ensemble
from nonn.students.train import StudentsConfig, train_students

log = logging.getLogger("benchmarks.accuracy")

# Thin students from the model registry, tried from the largest down.
CANDIDATE_ARCHS = [("wrn-16-1", {"width": w}) for w in (16, 12, 10, 8, 6, 4)] + [
    ("wrn-10-1", {"width": w}) for w in (16, 12, 10, 8, 6, 4)
]
SIZE_BOUND = 20  # each student at most 1/20 of the teacher's parameters


@dataclass(frozen=True)
class Setting:
    """How long to train: --quick for a CPU, full for a GPU."""

    teacher_arch: str
    teacher_epochs: int
    teacher_limit: int | None
    epochs: int
    train_limit: int | None
    eval_limit: int | None
    batch_size: int
    lr: float
    partition_images: int


QUICK = Setting("wrn-16-2", 3, 12000, 3, 12000, None, 128, 0.05, 3000)
FULL = Setting("wrn-16-4", 40, None, 60, None, None, 128, 0.05, 6000)


def arch_text(name: str, kwargs: dict[str, Any]) -> str:
    return name + "".join(f":{k}={v}" for k, v in kwargs.items())


def pick_student_arch(teacher_params: int, num_students: int, num_filters: int, num_classes: int, in_channels: int,
                      out_hw: tuple[int, int]) -> str:
    """The largest candidate whose student, with a bridge to num_filters/K channels, fits the bound."""
    size = -(-num_filters // num_students)
    best = None
    for name, kwargs in CANDIDATE_ARCHS:
        ens = build_ensemble([(name, kwargs)], [list(range(size))], num_classes, in_channels, out_hw)
        params = ens.params_per_student()[0]
        if params * SIZE_BOUND <= teacher_params and (best is None or params > best[0]):
            best = (params, arch_text(name, kwargs))
    if best is None:
        raise ValueError(f"no candidate student fits 1/{SIZE_BOUND} of a {teacher_params}-parameter teacher; pass --arch")
    return best[1]


def ensure_teacher(args: argparse.Namespace, setting: Setting, out: Path) -> Path:
    if args.teacher:
        return Path(args.teacher)
    from nonn.students.teacher import TeacherConfig, train_teacher

    path = out / "teacher.pt"
    config = TeacherConfig(
        dataset=args.dataset, data_dir=args.data_dir, arch=setting.teacher_arch, epochs=setting.teacher_epochs,
        limit=setting.teacher_limit, device=args.device, out=str(path), resume=True, log=str(out / "teacher.jsonl"),
        progress=not args.no_progress,
    )
    log.info("training a %s teacher for %d epochs on %s images", setting.teacher_arch, setting.teacher_epochs,
             setting.teacher_limit or "all")
    train_teacher(config)
    return path


def make_partitions(teacher_path: Path, data: Any, ks: list[int], setting: Setting, out: Path, device: str,
                    progress: bool) -> dict[int, Path]:
    """Partition the teacher's final layer once per K (balanced), from one set of activations."""
    from nonn.partition import Partition
    from nonn.partition.activations import collect_activations
    from nonn.partition.api import partition_fan
    from nonn.partition.fan import build_fan
    from nonn.students.loader import make_loader
    from nonn.students.teacher import load_teacher

    paths = {k: out / f"partition-k{k}.json" for k in ks}
    if all(p.exists() for p in paths.values()):
        return paths
    teacher = load_teacher(teacher_path)
    loader = make_loader(data, "train", batch_size=256, train=False, limit=setting.partition_images)
    activations = collect_activations(teacher.model.to(device), teacher.feature_layer, loader, device=device, progress=progress)
    fan = build_fan(activations, top_k=min(50, activations.shape[1]))
    for k, path in paths.items():
        part: Partition = partition_fan(
            fan, k, strategy="balanced", layer=teacher.feature_layer,
            teacher={"fingerprint": teacher.fingerprint, "arch": teacher.arch},
            extra_params={"images": int(activations.shape[0]), "top_k": min(50, activations.shape[1])},
        )
        part.save(path)
        log.info("K=%d: groups of %s, modularity %s", k, part.group_sizes, part.modularity)
    return paths


def teacher_accuracy(teacher_path: Path, data: Any, setting: Setting, device: str) -> tuple[float, int]:
    from nonn.students.evaluate import model_accuracy
    from nonn.students.loader import make_loader
    from nonn.students.teacher import load_teacher

    teacher = load_teacher(teacher_path)
    dev = torch.device(device)
    loader = make_loader(data, "test", batch_size=256, train=False, limit=setting.eval_limit)
    return model_accuracy(teacher.model.to(dev), loader, dev), teacher.params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU setting: a training subset and few epochs")
    parser.add_argument("--teacher", default=None, help="reuse this teacher checkpoint instead of training one")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--arch", default=None, help="student backbone (default: the largest thin WRN within 1/20 of the teacher)")
    parser.add_argument("--epochs", type=int, default=None, help="override the setting's student epochs")
    parser.add_argument("--limit", type=int, default=None, help="override the setting's training-image limit")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="override the setting's teacher epochs")
    parser.add_argument("--teacher-limit", type=int, default=None, help="override the setting's teacher training images")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on only the first N test images")
    parser.add_argument("--at", choices=("pooled", "spatial"), default="pooled", help="activation-transfer form for NoNN")
    parser.add_argument("--beta", type=float, default=None, help="activation-transfer weight (default per form)")
    parser.add_argument("--student-dropout", type=float, default=0.2, help="p for the runs with student dropout")
    parser.add_argument("--only", default=None, help="comma list of run names to do (default: all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="runs/bench-accuracy", help="directory for checkpoints and results")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    from nonn.students.train import resolve_device

    args.device = str(resolve_device(args.device))
    setting = QUICK if args.quick else FULL
    if args.epochs:
        setting = replace(setting, epochs=args.epochs)
    if args.limit:
        setting = replace(setting, train_limit=args.limit)
    if args.teacher_epochs:
        setting = replace(setting, teacher_epochs=args.teacher_epochs)
    if args.teacher_limit:
        setting = replace(setting, teacher_limit=args.teacher_limit)
    if args.eval_limit:
        setting = replace(setting, eval_limit=args.eval_limit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from nonn.students.data import load_dataset

    data = load_dataset(args.dataset, args.data_dir)
    started = time.perf_counter()
    teacher_path = ensure_teacher(args, setting, out)
    t_acc, t_params = teacher_accuracy(teacher_path, data, setting, args.device)
    log.info("teacher %s: %d parameters, accuracy %.4f", teacher_path, t_params, t_acc)
    partitions = make_partitions(teacher_path, data, [2, 4], setting, out, args.device, not args.no_progress)

    from nonn.partition import Partition
    from nonn.students.teacher import load_teacher

    teacher = load_teacher(teacher_path)
    with torch.no_grad():
        fmap = {}
        handle = teacher.model.get_submodule(teacher.feature_layer).register_forward_hook(lambda m, i, o: fmap.setdefault("x", o))
        teacher.model(torch.zeros(1, *data.input_shape))
        handle.remove()
    num_filters, out_hw = fmap["x"].shape[1], tuple(fmap["x"].shape[2:])
    archs = {
        k: args.arch or pick_student_arch(t_params, k, num_filters, data.num_classes, data.input_shape[0], out_hw) for k in (2, 4)
    }
    runs = [
        ("nonn-k2", 2, {}),
        ("nonn-k2-dropout", 2, {"student_dropout": args.student_dropout}),
        ("nonn-k4", 4, {}),
        ("nonn-k4-dropout", 4, {"student_dropout": args.student_dropout}),
        ("single-kd", 2, {"baseline": "single-kd"}),
        ("random-partition-k2", 2, {"baseline": "random-partition"}),
        ("no-at-k2", 2, {"baseline": "no-at"}),
    ]
    if args.only:
        wanted = set(args.only.split(","))
        runs = [r for r in runs if r[0] in wanted]
    results: list[dict[str, Any]] = []
    for name, k, overrides in runs:
        path = out / f"{name}.pt"
        config = StudentsConfig(
            partition=str(partitions[k]), out=str(path), teacher=str(teacher_path), dataset=args.dataset,
            data_dir=args.data_dir, arch=archs[k], epochs=setting.epochs, batch_size=setting.batch_size, lr=setting.lr,
            at=args.at, beta=args.beta, train_limit=setting.train_limit, eval_limit=setting.eval_limit,
            device=args.device, resume=path.exists(), progress=not args.no_progress, **overrides,
        )
        t0 = time.perf_counter()
        log.info("run %s: K=%d arch %s %s", name, k, archs[k], overrides or "")
        result = train_students(config)
        seconds = time.perf_counter() - t0
        params = result["params_per_student"]
        row = {
            "run": name,
            "students": len(params),
            "arch": archs[k],
            "student_dropout": overrides.get("student_dropout", 0.0),
            "accuracy": result["accuracy"],
            "delta_vs_teacher_points": 100 * (result["accuracy"] - t_acc),
            "params_per_device": max(params),
            "teacher_student_ratio": t_params / max(params),
            "worst_one_lost": result["worst_accuracy_one_lost"],
            "mean_one_lost": (sum(result["accuracy_without"].values()) / len(result["accuracy_without"]))
            if result["accuracy_without"] else None,
            "group_sizes": result["feature_sizes"],
            # Training time summed over the epochs' own timings, so a run finished earlier (and
            # only reused here) still reports what its training took.
            "seconds": round(sum(epoch.get("seconds", 0.0) for epoch in result["history"]), 1),
            "seconds_this_call": round(seconds, 1),
        }
        results.append(row)
        log.info("run %s: accuracy %.4f (teacher %.4f), worst one lost %s", name, row["accuracy"], t_acc, row["worst_one_lost"])

    summary = {
        "dataset": args.dataset,
        "setting": "quick" if args.quick else "full",
        "settings": setting.__dict__,
        "activation_transfer": args.at,
        "teacher": {"path": str(teacher_path), "params": t_params, "accuracy": t_acc,
                    "arch": teacher.arch, "partitions": {str(k): Partition.load(p).group_sizes for k, p in partitions.items()}},
        "runs": results,
        "goals": goals(results, t_acc),
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "device": args.device,
    }
    atomic_write_json(out / "accuracy.json", summary)
    table = markdown(summary)
    atomic_write_text(out / "accuracy.md", table)
    print(table)


def goals(rows: list[dict[str, Any]], t_acc: float) -> dict[str, Any]:
    """The issue's goals, measured: None where a run needed for one is missing."""
    by = {r["run"]: r for r in rows}
    out: dict[str, Any] = {}
    for k in (2, 4):
        r = by.get(f"nonn-k{k}")
        if r:
            out[f"k{k}_within_1_point"] = r["delta_vs_teacher_points"] >= -1.0
            out[f"k{k}_each_student_at_most_1_20"] = r["teacher_student_ratio"] >= SIZE_BOUND
        rd = by.get(f"nonn-k{k}-dropout")
        if rd and rd["worst_one_lost"] is not None:
            out[f"k{k}_dropout_one_lost_costs_at_most_3_points"] = 100 * (rd["accuracy"] - rd["worst_one_lost"]) <= 3.0
    if "nonn-k2" in by:
        for base in ("single-kd", "random-partition-k2"):
            if base in by:
                out[f"k2_above_{base}"] = by["nonn-k2"]["accuracy"] > by[base]["accuracy"]
    return out


def markdown(summary: dict[str, Any]) -> str:
    t = summary["teacher"]
    lines = [
        f"NoNN on {summary['dataset']} ({summary['setting']} setting: {summary['settings']['epochs']} student epochs, "
        f"{summary['settings']['train_limit'] or 'all'} training images, activation transfer {summary['activation_transfer']})",
        "",
        f"Teacher: {t['arch']['name'] if t['arch'] else t['path']}, {t['params']:,} parameters, accuracy {100 * t['accuracy']:.2f}%",
        "",
        "| run | K | student | dropout | accuracy % | vs teacher (points) | params / device | teacher/student | worst one lost % | mean one lost % | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["runs"]:
        worst = f"{100 * r['worst_one_lost']:.2f}" if r["worst_one_lost"] is not None else "n/a"
        mean = f"{100 * r['mean_one_lost']:.2f}" if r["mean_one_lost"] is not None else "n/a"
        lines.append(
            f"| {r['run']} | {r['students']} | {r['arch']} | {r['student_dropout']} | {100 * r['accuracy']:.2f} | "
            f"{r['delta_vs_teacher_points']:+.2f} | {r['params_per_device']:,} | {r['teacher_student_ratio']:.1f}x | "
            f"{worst} | {mean} | {r['seconds']} |"
        )
    lines += ["", "Goals: " + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in summary["goals"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
