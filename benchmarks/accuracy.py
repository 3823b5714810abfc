"""NoNN against its teacher and baselines, over several seeds, with the spread stated.

One command trains (or reuses, --teacher) a teacher, partitions its final-layer filters for
K = 2 and K = 4 (balanced strategy), then trains every row below once per seed with the same
data, epochs and recipe. Seeds change the students' initialisation, batch order and
augmentation; the teacher and the FAN partition stay the same (the random-partition rows draw
a new random partition per seed, since that row is about the partition).

Rows (--rows picks some):
- nonn-k2, nonn-k4:             NoNN, K students on the FAN partition, KD + activation transfer;
- random-partition-k2, -k4:     the same, on a random partition with the same group sizes;
- single-kd:                    one student of the K = 2 per-device size, trained with KD only;
- no-at-k2:                     NoNN K = 2 without activation transfer;
- fair-capacity-k2, -k4:        ONE student with about the parameters of all K students together,
                                imitating all the filters (KD + activation transfer): does
                                splitting the model across devices cost accuracy?

It writes <out>/accuracy.json and <out>/accuracy.md: per row the mean, standard deviation and
per-seed values of test accuracy and of accuracy with one device lost; paired comparisons
(same seed) of NoNN against each baseline with a paired t-test; and the goals, stated with
their spread ("not distinguishable" where a gap lies inside it). Finished runs in <out> are
reused and unfinished ones resume, so an interrupted benchmark continues where it stopped.

    python benchmarks/accuracy.py --quick --seeds 3 --jobs 2          # CPU, about an hour
    python benchmarks/accuracy.py --teacher runs/teacher.pt --limit 60000 --epochs 8 --seeds 3 \\
        --rows nonn-k4,random-partition-k4,fair-capacity-k4 --student-dropout 0.1 --jobs 2

The student backbone, unless --arch is given, is the largest thin Wide ResNet from the model
registry whose whole student (backbone + bridge) has at most 1/20 of the teacher's parameters.
--jobs N trains N runs at once, each in its own process with one CPU thread.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from nonn.artifacts import atomic_write_json, atomic_write_text
from nonn.students.checkpoint import load_checkpoint
from nonn.students.ensemble import build_ensemble
from nonn.students.precision import PRECISIONS
from nonn.students.train import FORMAT as STUDENTS_FORMAT, StudentsConfig, train_students

log = logging.getLogger("benchmarks.accuracy")

# Thin students from the model registry, tried from the largest down.
CANDIDATE_ARCHS = [("wrn-16-1", {"width": w}) for w in (16, 12, 10, 8, 6, 4)] + [
    ("wrn-10-1", {"width": w}) for w in (16, 12, 10, 8, 6, 4)
]
# Single students for the fair-capacity rows: a finer grid, the closest in parameters wins.
CAPACITY_ARCHS = [(name, {"width": w}) for name in ("wrn-10-1", "wrn-16-1") for w in range(4, 65, 2)]
SIZE_BOUND = 20  # each student at most 1/20 of the teacher's parameters
SIGNIFICANCE = 0.05  # paired t-test level for "distinguishable"


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


@dataclass(frozen=True)
class Row:
    """One line of the table: a kind of run at a K."""

    name: str
    k: int
    kind: str  # nonn, random-partition, single-kd, no-at, fair-capacity

    @property
    def multi_student(self) -> bool:
        return self.kind in ("nonn", "random-partition", "no-at")


ROWS = [
    Row("nonn-k2", 2, "nonn"),
    Row("nonn-k4", 4, "nonn"),
    Row("random-partition-k2", 2, "random-partition"),
    Row("random-partition-k4", 4, "random-partition"),
    Row("single-kd", 2, "single-kd"),
    Row("no-at-k2", 2, "no-at"),
    Row("fair-capacity-k2", 2, "fair-capacity"),
    Row("fair-capacity-k4", 4, "fair-capacity"),
]
# Which baselines each NoNN row is compared with, seed by seed.
COMPARISONS = [
    ("nonn-k2", "random-partition-k2"),
    ("nonn-k4", "random-partition-k4"),
    ("nonn-k2", "single-kd"),
    ("nonn-k2", "no-at-k2"),
    ("nonn-k2", "fair-capacity-k2"),
    ("nonn-k4", "fair-capacity-k4"),
]


def arch_text(name: str, kwargs: dict[str, Any]) -> str:
    return name + "".join(f":{k}={v}" for k, v in kwargs.items())


def student_params(name: str, kwargs: dict[str, Any], filters: int, num_classes: int, in_channels: int,
                   out_hw: tuple[int, int]) -> int:
    """Parameters of one student (backbone + bridge to `filters` channels)."""
    ens = build_ensemble([(name, kwargs)], [list(range(filters))], num_classes, in_channels, out_hw)
    return ens.params_per_student()[0]


def pick_student_arch(teacher_params: int, num_students: int, num_filters: int, num_classes: int, in_channels: int,
                      out_hw: tuple[int, int]) -> str:
    """The largest candidate whose student, with a bridge to num_filters/K channels, fits the bound."""
    size = -(-num_filters // num_students)
    best = None
    for name, kwargs in CANDIDATE_ARCHS:
        params = student_params(name, kwargs, size, num_classes, in_channels, out_hw)
        if params * SIZE_BOUND <= teacher_params and (best is None or params > best[0]):
            best = (params, arch_text(name, kwargs))
    if best is None:
        raise ValueError(f"no candidate student fits 1/{SIZE_BOUND} of a {teacher_params}-parameter teacher; pass --arch")
    return best[1]


def pick_capacity_arch(target_params: int, num_filters: int, num_classes: int, in_channels: int,
                       out_hw: tuple[int, int]) -> str:
    """The single student (bridged to all filters) whose parameter count is closest to the target."""
    scored = [
        (abs(student_params(name, kwargs, num_filters, num_classes, in_channels, out_hw) - target_params), arch_text(name, kwargs))
        for name, kwargs in CAPACITY_ARCHS
    ]
    return min(scored)[1]


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
    """Partition the teacher's final layer once per K (balanced), from one set of activations.

    Key 1 is the fair-capacity rows' partition: one group holding every filter.
    """
    from nonn.partition import Partition
    from nonn.partition.activations import collect_activations
    from nonn.partition.api import partition_fan
    from nonn.partition.fan import build_fan
    from nonn.students.loader import make_loader
    from nonn.students.teacher_loading import load_teacher

    paths = {k: out / f"partition-k{k}.json" for k in ks}
    paths[1] = out / "partition-all.json"
    if all(p.exists() for p in paths.values()):
        return paths
    teacher = load_teacher(teacher_path)
    loader = make_loader(data, "train", batch_size=256, train=False, limit=setting.partition_images)
    activations = collect_activations(teacher.model.to(device), teacher.feature_layer, loader, device=device, progress=progress)
    top_k = min(50, activations.shape[1])
    fan = build_fan(activations, top_k=top_k)
    teacher_info = {"fingerprint": teacher.fingerprint, "arch": teacher.arch}
    for k in ks:
        part: Partition = partition_fan(
            fan, k, strategy="balanced", layer=teacher.feature_layer, teacher=teacher_info,
            extra_params={"images": int(activations.shape[0]), "top_k": top_k},
        )
        part.save(paths[k])
        log.info("K=%d: groups of %s, community modularity %s, modularity of the %d groups %s", k, part.group_sizes,
                 part.modularity, k, part.stats.get("group_modularity"))
    num_filters = int(activations.shape[1])
    Partition(num_filters=num_filters, groups=[list(range(num_filters))], strategy="all-filters",
              layer=teacher.feature_layer, teacher=teacher_info).save(paths[1])
    return paths


def teacher_accuracy(teacher_path: Path, data: Any, setting: Setting, device: str) -> tuple[float, int]:
    from nonn.students.evaluate import model_accuracy
    from nonn.students.loader import make_loader
    from nonn.students.teacher_loading import load_teacher

    teacher = load_teacher(teacher_path)
    dev = torch.device(device)
    loader = make_loader(data, "test", batch_size=256, train=False, limit=setting.eval_limit)
    return model_accuracy(teacher.model.to(dev), loader, dev), teacher.params


def teacher_layer_shape(teacher_path: Path, input_shape: tuple[int, ...]) -> tuple[int, tuple[int, int]]:
    """Channels and spatial size of the teacher's feature layer, from one forward pass."""
    from nonn.students.teacher_loading import load_teacher

    teacher = load_teacher(teacher_path)
    fmap: dict[str, torch.Tensor] = {}
    layer = teacher.model.get_submodule(teacher.feature_layer)
    handle = layer.register_forward_hook(lambda m, i, o: fmap.setdefault("x", o))
    with torch.no_grad():
        teacher.model(torch.zeros(1, *input_shape))
    handle.remove()
    return int(fmap["x"].shape[1]), (int(fmap["x"].shape[2]), int(fmap["x"].shape[3]))


# ----------------------------------------------------------------------------------------------
# One run (row x seed), possibly in a worker process


@dataclass(frozen=True)
class Job:
    row: Row
    seed: int
    config: StudentsConfig
    threads: int | None


def run_job(job: Job) -> dict[str, Any]:
    """Train (or reuse) one run; returns its figures. Runs in a worker process under --jobs."""
    if job.threads:
        torch.set_num_threads(job.threads)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log.info("run %s seed %d: arch %s", job.row.name, job.seed, job.config.arch)
    result = train_students(job.config)
    without = result["accuracy_without"] or {}
    return {
        "run": job.row.name,
        "seed": job.seed,
        "accuracy": result["accuracy"],
        "worst_one_lost": result["worst_accuracy_one_lost"],
        "mean_one_lost": statistics.fmean(without.values()) if without else None,
        "params_per_student": list(result["params_per_student"]),
        "group_sizes": list(result["feature_sizes"]),
        # Summed over the epochs' own timings, so a run finished earlier (and only reused
        # here) still reports what its training took.
        "seconds": round(sum(epoch.get("seconds", 0.0) for epoch in result["history"]), 1),
    }


def run_finished(config: StudentsConfig) -> bool:
    """Whether the run's checkpoint holds every epoch it was asked for."""
    path = Path(config.out)
    if not path.is_file():
        return False
    checkpoint = load_checkpoint(path, STUDENTS_FORMAT)
    return bool(checkpoint.get("complete")) and checkpoint.get("epoch") == config.epochs


def run_all(jobs: list[Job], workers: int) -> list[dict[str, Any]]:
    if workers <= 1:
        return [run_job(job) for job in jobs]
    # spawn: a fork of a process whose torch thread pool already ran can deadlock.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(run_job, jobs))


# ----------------------------------------------------------------------------------------------
# Statistics over seeds


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value) and the values themselves."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def paired_comparison(ours: dict[int, float], base: dict[int, float]) -> dict[str, Any] | None:
    """NoNN minus baseline, seed by seed, in points; a paired t-test on the differences."""
    seeds = sorted(set(ours) & set(base))
    if not seeds:
        return None
    diffs = [100 * (ours[s] - base[s]) for s in seeds]
    out: dict[str, Any] = {"seeds": seeds, "diff_points": spread(diffs), "p_value": None}
    if len(diffs) > 1:
        sd = statistics.stdev(diffs)
        if sd > 0:
            from scipy import stats

            out["p_value"] = float(stats.ttest_rel([ours[s] for s in seeds], [base[s] for s in seeds]).pvalue)
        else:
            out["p_value"] = 0.0 if statistics.fmean(diffs) != 0 else 1.0
    p = out["p_value"]
    mean = out["diff_points"]["mean"]
    if p is None:
        out["verdict"] = "one seed: no spread to judge by"
    elif p < SIGNIFICANCE:
        out["verdict"] = "NoNN higher" if mean > 0 else "NoNN lower"
    else:
        out["verdict"] = "not distinguishable"
    return out


def summarise_rows(results: list[dict[str, Any]], t_acc: float) -> list[dict[str, Any]]:
    by_row: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_row.setdefault(r["run"], []).append(r)
    rows = []
    for name, runs in by_row.items():
        runs.sort(key=lambda r: r["seed"])
        lost = [r["worst_one_lost"] for r in runs if r["worst_one_lost"] is not None]
        rows.append({
            "run": name,
            "seeds": [r["seed"] for r in runs],
            "accuracy": spread([r["accuracy"] for r in runs]),
            "delta_vs_teacher_points": spread([100 * (r["accuracy"] - t_acc) for r in runs]),
            "worst_one_lost": spread(lost) if lost else None,
            "params_per_student": runs[0]["params_per_student"],
            "group_sizes": runs[0]["group_sizes"],
            "seconds": spread([r["seconds"] for r in runs]),
        })
    return rows


def accuracy_by_seed(results: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    per_seed: dict[str, dict[int, float]] = {}
    for r in results:
        per_seed.setdefault(r["run"], {})[r["seed"]] = r["accuracy"]
    return per_seed


def goals(rows: list[dict[str, Any]], results: list[dict[str, Any]], t_acc: float, t_params: int) -> dict[str, str]:
    """The goals, each as a sentence that states the means and their spread."""
    by = {r["run"]: r for r in rows}
    per_seed = accuracy_by_seed(results)
    out: dict[str, str] = {}
    for k in (2, 4):
        r = by.get(f"nonn-k{k}")
        if r:
            d = r["delta_vs_teacher_points"]
            met = d["mean"] >= -1.0
            inside = abs(d["mean"] + 1.0) <= d["std"]
            out[f"nonn-k{k} within 1.0 point of the teacher"] = (
                f"{'yes' if met else 'no'}: {d['mean']:+.2f} ± {d['std']:.2f} points"
                + (" (the 1.0-point line lies inside the spread)" if inside else "")
            )
            ratio = t_params / max(r["params_per_student"])
            out[f"nonn-k{k} each student at most 1/{SIZE_BOUND} of the teacher"] = (
                f"{'yes' if ratio >= SIZE_BOUND else 'no'}: {ratio:.1f}x smaller"
            )
    for ours, base in COMPARISONS:
        if ours in per_seed and base in per_seed:
            c = paired_comparison(per_seed[ours], per_seed[base])
            if c:
                d = c["diff_points"]
                p = "" if c["p_value"] is None else f", paired t-test p = {c['p_value']:.3f}"
                out[f"{ours} vs {base}"] = f"{c['verdict']}: {d['mean']:+.2f} ± {d['std']:.2f} points over {len(c['seeds'])} seeds{p}"
    return out


def comparisons(results: list[dict[str, Any]]) -> dict[str, Any]:
    per_seed = accuracy_by_seed(results)
    return {
        f"{ours} vs {base}": paired_comparison(per_seed[ours], per_seed[base])
        for ours, base in COMPARISONS if ours in per_seed and base in per_seed
    }


def pct(s: dict[str, Any] | None) -> str:
    return "n/a" if s is None else f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"


def _fmt3(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(summary: dict[str, Any]) -> str:
    t = summary["teacher"]
    st = summary["settings"]
    lines = [
        f"NoNN on {summary['dataset']} ({summary['setting']} setting: {st['epochs']} student epochs, "
        f"batch {st['batch_size']}, lr {st['lr']:g}, {st['train_limit'] or 'all'} training images, activation transfer {summary['activation_transfer']}, "
        f"student dropout {summary['student_dropout']}, seeds {summary['seeds']})",
        "",
        f"Teacher: {t['arch']['name'] if t['arch'] else t['path']}, {t['params']:,} parameters, accuracy {100 * t['accuracy']:.2f}%",
        "",
        "Partitions (balanced; modularity of the FAN's communities, then of the K groups dealt from them, "
        "and the filters no community holds): " + "; ".join(
            f"K={k}: groups {p['group_sizes']}, modularity {_fmt3(p['modularity'])} / {_fmt3(p.get('group_modularity'))}, "
            f"{p.get('isolated_filters', 'n/a')} isolated"
            for k, p in t["partitions"].items()
        ),
        "",
        "| run | K | student | params / device | params, all students | accuracy % (mean ± sd) | per seed % | "
        "vs teacher (points) | worst one lost % | train s / run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        per_seed = ", ".join(f"{100 * v:.2f}" for v in r["accuracy"]["values"])
        d = r["delta_vs_teacher_points"]
        lines.append(
            f"| {r['run']} | {len(r['params_per_student'])} | {r['arch']} | {max(r['params_per_student']):,} | "
            f"{sum(r['params_per_student']):,} | {pct(r['accuracy'])} | {per_seed} | {d['mean']:+.2f} ± {d['std']:.2f} | "
            f"{pct(r['worst_one_lost'])} | {r['seconds']['mean']:.0f} |"
        )
    lines += ["", "Goals, and NoNN against each baseline paired by seed (NoNN minus baseline):", ""]
    lines += [f"- {name}: {text}" for name, text in summary["goals"].items()]
    lines += ["", f"Total time of this call: {summary['seconds']:.0f} s ({summary['jobs']} parallel jobs)", ""]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU setting: a training subset and few epochs")
    parser.add_argument("--seeds", type=int, default=1, help="train every row with seeds 0..N-1 (default 1)")
    parser.add_argument("--rows", default=None, help="comma list of rows to run, in this order (default: all): " + ", ".join(r.name for r in ROWS))
    parser.add_argument("--finished-only", action="store_true",
                        help="train nothing: summarise the runs already finished in --out (a benchmark cut short)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process and one CPU thread each")
    parser.add_argument("--teacher", default=None, help="reuse this teacher checkpoint instead of training one")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--arch", default=None, help="student backbone (default: the largest thin WRN within 1/20 of the teacher)")
    parser.add_argument("--epochs", type=int, default=None, help="override the setting's student epochs")
    parser.add_argument("--limit", type=int, default=None, help="override the setting's training-image limit")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="override the setting's teacher epochs")
    parser.add_argument("--teacher-limit", type=int, default=None, help="override the setting's teacher training images")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on only the first N test images")
    parser.add_argument("--batch-size", type=int, default=None, help="override the setting's student batch size (128)")
    parser.add_argument("--lr", type=float, default=None, help="override the setting's student learning rate (0.05)")
    parser.add_argument("--at", choices=("pooled", "spatial"), default="pooled", help="activation-transfer form for NoNN")
    parser.add_argument("--beta", type=float, default=None, help="activation-transfer weight (default per form)")
    parser.add_argument("--student-dropout", type=float, default=0.0,
                        help="student dropout p for every row with several students (default 0)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="students' training precision (auto: by the device, see nonn.students.precision)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (with --jobs > 1: 1 per job)")
    parser.add_argument("--out", default="runs/bench-accuracy", help="directory for checkpoints and results")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    known = {r.name for r in ROWS}
    if args.rows:
        unknown = [name for name in args.rows.split(",") if name not in known]
        if unknown:
            parser.error(f"unknown row(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    threads = 1 if args.jobs > 1 else args.threads
    if threads:
        torch.set_num_threads(threads)

    from nonn.students.train import resolve_device

    args.device = str(resolve_device(args.device))
    setting = QUICK if args.quick else FULL
    overrides = {"epochs": args.epochs, "train_limit": args.limit, "teacher_epochs": args.teacher_epochs,
                 "teacher_limit": args.teacher_limit, "eval_limit": args.eval_limit, "batch_size": args.batch_size,
                 "lr": args.lr}
    setting = replace(setting, **{k: v for k, v in overrides.items() if v})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from nonn.partition import Partition
    from nonn.students.data import load_dataset
    from nonn.students.teacher_loading import load_teacher

    data = load_dataset(args.dataset, args.data_dir)
    started = time.perf_counter()
    teacher_path = ensure_teacher(args, setting, out)
    t_acc, t_params = teacher_accuracy(teacher_path, data, setting, args.device)
    log.info("teacher %s: %d parameters, accuracy %.4f", teacher_path, t_params, t_acc)
    partitions = make_partitions(teacher_path, data, [2, 4], setting, out, args.device, not args.no_progress)
    num_filters, out_hw = teacher_layer_shape(teacher_path, data.input_shape)
    shape_args = (data.num_classes, data.input_shape[0], out_hw)
    archs = {k: args.arch or pick_student_arch(t_params, k, num_filters, *shape_args) for k in (2, 4)}

    by_name = {r.name: r for r in ROWS}
    rows = [by_name[name] for name in args.rows.split(",")] if args.rows else list(ROWS)
    jobs: list[Job] = []
    row_archs: dict[str, str] = {}
    for row in rows:
        arch = archs[row.k]
        partition = partitions[row.k]
        overrides: dict[str, Any] = {}
        if row.kind in ("random-partition", "single-kd", "no-at"):
            overrides["baseline"] = row.kind
        if row.multi_student:
            overrides["student_dropout"] = args.student_dropout
        if row.kind == "fair-capacity":
            name, kwargs = arch.split(":", 1)[0], dict(kv.split("=") for kv in arch.split(":")[1:])
            kwargs = {key: int(value) for key, value in kwargs.items()}
            group = -(-num_filters // row.k)
            target = row.k * student_params(name, kwargs, group, *shape_args)
            arch = pick_capacity_arch(target, num_filters, *shape_args)
            partition = partitions[1]
        row_archs[row.name] = arch
        for seed in range(args.seeds):
            path = out / (f"{row.name}.pt" if seed == 0 else f"{row.name}-seed{seed}.pt")
            config = StudentsConfig(
                partition=str(partition), out=str(path), teacher=str(teacher_path), dataset=args.dataset,
                data_dir=args.data_dir, arch=arch, epochs=setting.epochs, batch_size=setting.batch_size, lr=setting.lr,
                at=args.at, beta=args.beta, train_limit=setting.train_limit, eval_limit=setting.eval_limit,
                device=args.device, precision=args.precision, resume=path.exists(),
                progress=not args.no_progress and args.jobs == 1, seed=seed, **overrides,
            )
            jobs.append(Job(row, seed, config, threads))
    # Seed by seed, rows in the order given: a benchmark cut short still has paired comparisons.
    jobs.sort(key=lambda job: job.seed)
    if args.finished_only:
        finished = [run_finished(job.config) for job in jobs]
        unfinished = [f"{job.row.name} seed {job.seed}" for job, done in zip(jobs, finished) if not done]
        jobs = [job for job, done in zip(jobs, finished) if done]
        if unfinished:
            log.warning("summarising finished runs only; not run or not finished: %s", ", ".join(unfinished))
        if not jobs:
            raise SystemExit(f"accuracy: no finished run in {out}")
    log.info("%d runs (%d rows x %d seeds), %d at a time", len(jobs), len(rows), args.seeds, args.jobs)
    results = run_all(jobs, args.jobs)

    summary_rows = summarise_rows(results, t_acc)
    for r in summary_rows:
        r["arch"] = row_archs[r["run"]]
    part_info = {}
    for k in (2, 4):
        p = Partition.load(partitions[k])
        part_info[str(k)] = {"group_sizes": p.group_sizes, "modularity": p.modularity,
                             "group_modularity": p.stats.get("group_modularity"),
                             "isolated_filters": p.stats.get("isolated_filters"),
                             "community_sizes": p.stats.get("community_sizes")}
    teacher_arch = load_teacher(teacher_path).arch
    summary = {
        "dataset": args.dataset,
        "setting": "quick" if args.quick else "full",
        "settings": asdict(setting),
        "activation_transfer": args.at,
        "student_dropout": args.student_dropout,
        "seeds": args.seeds,
        "jobs": args.jobs,
        "teacher": {"path": str(teacher_path), "params": t_params, "accuracy": t_acc, "arch": teacher_arch,
                    "partitions": part_info},
        "rows": summary_rows,
        "runs": results,
        "comparisons": comparisons(results),
        "goals": goals(summary_rows, results, t_acc, t_params),
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "device": args.device,
        "precision": args.precision,
    }
    atomic_write_json(out / "accuracy.json", summary)
    table = markdown(summary)
    atomic_write_text(out / "accuracy.md", table)
    print(table)


if __name__ == "__main__":
    main()
