"""`nonn demo`: the whole pipeline on a bundled data set, one command.

Each stage runs exactly the command a user would type (printed before it runs), in this
process, so the demo doubles as a tour of the CLI. Every artifact lands in one directory.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nonn.cli import CLIError
from nonn.runtime.traffic import describe
from nonn.cli.common import FLEET_METAVAR, add_seed_arg, non_negative_int, positive_int
from nonn.cli.deprecation import add_alias

EPILOG = """\
examples:
  nonn demo                               # digits (bundled with scikit-learn), a few minutes on 2 cores
  nonn demo --out /tmp/nonn-demo --reuse  # keep artifacts already in --out, run the rest
  nonn demo --dataset fashion-mnist       # the same on Fashion-MNIST (needs its IDX files)
  nonn demo --dataset fashion-mnist --teacher runs/fmnist/teacher.pt   # reuse a trained teacher
"""


@dataclass(frozen=True)
class DemoPreset:
    """Sizes and epochs that keep the demo short on a 2-core CPU for one data set."""

    teacher_arch: str
    teacher_epochs: int
    student_arch: str
    student_epochs: int
    student_dropout: float
    requests: int
    kill: str | None  # DEVICE@SECONDS[:RESTART] for the simulated fault, None for none
    train_limit: int | None = None


PRESETS: dict[str, DemoPreset] = {
    "digits": DemoPreset("wrn-16-2", 10, "wrn-10-1:width=8", 10, 0.1, 0, "1@1:2"),
    "fashion-mnist": DemoPreset("wrn-16-2", 2, "wrn-10-1:width=8", 2, 0.1, 2000, "1@2:3"),
    "mnist": DemoPreset("wrn-16-2", 2, "wrn-10-1:width=8", 2, 0.1, 2000, "1@2:3"),
}


@dataclass
class DemoResult:
    """Where the demo put everything and the headline figures, for the summary and tests."""

    out: Path
    artifacts: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    teacher_accuracy: float | None = None
    students_accuracy: float | None = None
    simulation: dict[str, Any] = field(default_factory=dict)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the whole pipeline on a bundled data set: teacher, partition, students, export, simulate",
        description=(
            "Train a teacher, partition its final-layer filters into K groups, train K students "
            "jointly, export the ONNX bundle, plan the placement and simulate K devices on this "
            "machine, with a device killed and restarted mid-run. Every artifact, the simulate "
            "JSON and the HTML report go to --out."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="nonn-demo", help="directory for every artifact (default: nonn-demo)")
    p.add_argument("--dataset", default="digits", help=f"data set with a demo preset: {', '.join(sorted(PRESETS))} (default: digits)")
    p.add_argument("--data-dir", default=None, help="directory of the data set's files (default: its standard location)")
    p.add_argument("-K", "--num-students", type=positive_int, default=4, help="number of students / devices K (default: 4)")
    add_alias(p, "--students", "-K/--num-students", dest="num_students", type=positive_int)
    p.add_argument("--fleet", default=None, metavar=FLEET_METAVAR, help="device profiles to simulate (default: rpi3b+:K)")
    add_alias(p, "--devices", "--fleet", dest="fleet")
    p.add_argument("--teacher", default=None, help="reuse this teacher checkpoint instead of training one")
    p.add_argument("--teacher-epochs", type=positive_int, default=None, help="teacher epochs (default: the data set's preset)")
    p.add_argument("--student-epochs", type=positive_int, default=None, help="student epochs (default: the data set's preset)")
    p.add_argument("--requests", type=non_negative_int, default=None, help="requests to simulate (default: the whole test split for digits)")
    p.add_argument("--no-fault", action="store_true", help="do not kill a device during the simulation")
    p.add_argument("--reuse", action="store_true", help="keep artifacts already in --out and run only the missing stages")
    add_seed_arg(p)
    p.set_defaults(func=_run_demo)


def _stage(title: str, argv: list[str], result: DemoResult, key: str) -> None:
    """Run one CLI command in this process, printing it first; raise if it fails."""
    from nonn.cli import main

    print(f"\n== {title}\n$ nonn {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    status = main(argv)
    result.seconds[key] = time.perf_counter() - start
    if status:
        raise CLIError(f"demo stage '{title}' failed (exit {status}); the command above shows how to rerun it")


def run_demo(
    out: str | Path = "nonn-demo",
    *,
    dataset: str = "digits",
    data_dir: str | None = None,
    students: int = 4,
    devices: str | None = None,
    teacher: str | None = None,
    teacher_epochs: int | None = None,
    student_epochs: int | None = None,
    requests: int | None = None,
    fault: bool = True,
    reuse: bool = False,
    seed: int = 0,
) -> DemoResult:
    """The whole pipeline; returns where everything is and the headline figures."""
    if dataset not in PRESETS:
        raise CLIError(f"--dataset {dataset!r}: the demo has presets for {', '.join(sorted(PRESETS))}")
    if students < 2:
        raise CLIError(f"--students must be at least 2, got {students}")
    for name, value in (("--teacher-epochs", teacher_epochs), ("--student-epochs", student_epochs)):
        if value is not None and value < 1:
            raise CLIError(f"{name} must be a positive integer, got {value}")
    if teacher and not Path(teacher).is_file():
        raise FileNotFoundError(f"--teacher {teacher}: no such checkpoint")
    preset = PRESETS[dataset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult(out=out)
    paths = {
        "teacher": Path(teacher) if teacher else out / "teacher.pt",
        "partition": out / "partition.json",
        "fan_plot": out / "fan.png",
        "students": out / "students.pt",
        "bundle": out / "bundle",
        "plan": out / "plan.json",
        "simulation": out / "simulation.json",
        "report": out / "report.html",
    }
    result.artifacts = paths
    data = ["--dataset", dataset] + (["--data-dir", data_dir] if data_dir else [])
    seed_args = ["--seed", str(seed)]
    devices = devices or f"rpi3b+:{students}"

    def wanted(key: str) -> bool:
        return not (reuse and paths[key].exists())

    if teacher is None and wanted("teacher"):
        epochs = teacher_epochs or preset.teacher_epochs
        _stage(
            "1/6 train the teacher",
            ["train-teacher", *data, "--arch", preset.teacher_arch, "--epochs", str(epochs),
             "--out", str(paths["teacher"]), "--metrics", str(out / "teacher.jsonl"), "--overwrite", *seed_args],
            result, "teacher",
        )
    if wanted("partition"):
        _stage(
            "2/6 partition the teacher's final-layer filters",
            ["partition", "--teacher", str(paths["teacher"]), *data, "--num-students", str(students),
             "--out", str(paths["partition"]), "--plot", str(paths["fan_plot"]), *seed_args],
            result, "partition",
        )
    if wanted("students"):
        epochs = student_epochs or preset.student_epochs
        limit = ["--limit", str(preset.train_limit)] if preset.train_limit else []
        _stage(
            f"3/6 train {students} students jointly (KD + activation transfer, student dropout)",
            ["train-students", "--teacher", str(paths["teacher"]), "--partition", str(paths["partition"]), *data,
             "--arch", preset.student_arch, "--epochs", str(epochs), "--student-dropout", str(preset.student_dropout),
             "--out", str(paths["students"]), "--metrics", str(out / "students.jsonl"), "--overwrite", *limit, *seed_args],
            result, "students",
        )
    if wanted("bundle"):
        _stage("4/6 export the ONNX bundle", ["export", "--students", str(paths["students"]), "--out", str(paths["bundle"]), "--overwrite"],
               result, "export")
    _stage("5/6 plan the placement", ["plan", "--bundle", str(paths["bundle"]), "--fleet", devices, "--out", str(paths["plan"])],
           result, "plan")
    sim = ["simulate", "--bundle", str(paths["bundle"]), "--fleet", devices, *data,
           "--requests", str(preset.requests if requests is None else requests),
           "--teacher", str(paths["teacher"]), "--json", str(paths["simulation"]), "--report", str(paths["report"]), *seed_args]
    if fault and preset.kill:
        sim += ["--kill", preset.kill, "--until-faults-end"]
    _stage(f"6/6 simulate {students} devices on this machine", sim, result, "simulate")

    result.teacher_accuracy = _last_metric(out / "teacher.jsonl", "test_acc")
    result.students_accuracy = _last_metric(out / "students.jsonl", "test_accuracy")
    result.simulation = json.loads(paths["simulation"].read_text())
    return result


def _last_metric(path: Path, key: str) -> float | None:
    """The last epoch's value of `key` in a JSON-lines training log, if the log exists."""
    if not path.is_file():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]).get(key) if lines else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def format_summary(result: DemoResult) -> str:
    sim = result.simulation
    lat = sim.get("latency_ms", {})
    devices = sim.get("devices", [])
    lines = [
        "",
        "== nonn demo: summary",
        f"teacher test accuracy           {_pct(result.teacher_accuracy)}",
        f"students (PyTorch) accuracy     {_pct(result.students_accuracy)}",
        f"simulated fleet accuracy        {_pct(sim.get('accuracy'))} over {sim.get('answered')} of "
        f"{sim.get('requests')} requests ({sim.get('lost')} lost, {sim.get('degraded')} degraded)",
    ]
    outage = sim.get("accuracy_during_outage")
    if outage is not None:
        lines.append(f"  accuracy while a device was down {_pct(outage)}")
    if lat:
        lines.append(f"latency p50 / p95 / p99          {lat.get('p50', 0):.2f} / {lat.get('p95', 0):.2f} / {lat.get('p99', 0):.2f} ms")
    if devices:
        rss = ", ".join(f"{d.get('peak_rss_mb', 0):.0f}" for d in devices)
        lines.append(f"bytes, all devices               {describe(sim['bytes_per_inference'])}")
        lines.append(f"peak RSS per device (MB)         {rss}")
    total = sum(result.seconds.values())
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
    lines += [
        f"time                             {total:.0f} s ({stages})",
        f"artifacts                        {result.out}/",
        f"HTML report                      {result.artifacts['report']}",
    ]
    return "\n".join(lines)


def _run_demo(args: argparse.Namespace) -> int:
    result = run_demo(
        args.out,
        dataset=args.dataset,
        data_dir=args.data_dir,
        students=args.num_students,
        devices=args.fleet,
        teacher=args.teacher,
        teacher_epochs=args.teacher_epochs,
        student_epochs=args.student_epochs,
        requests=args.requests,
        fault=not args.no_fault,
        reuse=args.reuse,
        seed=args.seed,
    )
    print(format_summary(result))
    sys.stdout.flush()
    return 0
