"""`nonn simulate`: run a bundle's students as a local fleet of device processes and report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from nonn.cli import CLIError
from nonn.cli.common import add_data_args, add_seed_arg

SIMULATE_EPILOG = """\
faults (--kill, repeatable):
  DEVICE@SECONDS            kill device DEVICE (index from 0) SECONDS into the stream
  DEVICE@SECONDS:RESTART    ... and start it again RESTART seconds later
  e.g. --kill 1@2 --kill 0@3:5. The stream keeps going until every fault has played out
  (plus --recovery seconds), so the report shows the outage and the recovery.

network (--network):
  auto   network namespaces + netem per device link when root, iproute2 and the netem qdisc
         are available, else the client delay model (the report says which ran and why)
  netns  namespaces only (error when not possible here)
  delay  the client delay model: a relay per device adds latency + bytes/bandwidth (+ loss)
  none   plain loopback

example:
  nonn simulate --bundle runs/bundle --devices rpi3b+:4 --dataset fashion-mnist \\
      --requests 2000 --concurrency 8 --kill 1@2:3 --json sim.json --report sim.html
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser(
        "simulate",
        help="run the fleet on this machine (one process per student) and report",
        description=(
            "Start one `nonn serve` process per student of a bundle on this machine, each behind "
            "its device profile's network link, stream a data set's test images through the "
            "aggregator, optionally kill and restart devices, and report accuracy, latency, memory, "
            "bytes on the wire and the estimated cost against the teacher on one device."
        ),
        epilog=SIMULATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--bundle", required=True, help="bundle directory from `nonn export`")
    s.add_argument(
        "--devices",
        required=True,
        help="device profiles, one per student: NAME[:COUNT],... e.g. rpi3b+:4 or rpi4b,rpi3b+:3 "
        "(a single profile name is used for every student)",
    )
    s.add_argument("--profiles", default=None, help="extra device profile file (nonn.devices/1 JSON) to add or override profiles")
    add_data_args(s, default="digits")
    s.add_argument("--split", choices=("test", "train"), default="test", help="which split to stream (default: test)")
    run = s.add_argument_group("stream")
    run.add_argument("--requests", type=_non_negative_int, default=1000,
                     help="requests to send, cycling over the images; 0 = every image once (default: 1000)")
    run.add_argument("--concurrency", type=_positive_int, default=4, help="requests in flight at once (default: 4)")
    run.add_argument("--batch-size", type=_positive_int, default=1, help="images per request (default: 1)")
    run.add_argument("--rate", type=_positive_float, default=None,
                     help="send at this many requests per second (open loop; default: as fast as --concurrency allows)")
    run.add_argument("--duration", type=_non_negative_float, default=0.0,
                     help="stream for at least this many seconds (default: 0)")
    run.add_argument("--kill", action="append", default=[], metavar="DEVICE@SECONDS[:RESTART]",
                     help="kill a device during the stream, optionally restarting it (repeatable; see below)")
    run.add_argument("--recovery", type=_non_negative_float, default=1.0,
                     help="seconds to keep streaming after the last fault event (default: 1)")
    run.add_argument("--deadline", type=_positive_float, default=1.0,
                     help="seconds a device has to answer, retries included (default: 1.0)")
    run.add_argument("--retries", type=_non_negative_int, default=2, help="extra attempts on UNAVAILABLE (default: 2)")
    run.add_argument("--strict", action="store_true",
                     help="a request fails (is lost) when any device misses it, instead of a degraded answer")
    run.add_argument("--network", choices=("auto", "netns", "delay", "none"), default="auto",
                     help="network emulation (default: auto; see below)")
    run.add_argument("--startup-timeout", type=_positive_float, default=60.0,
                     help="seconds each device has to report SERVING (default: 60)")
    add_seed_arg(s)
    teacher = s.add_argument_group("teacher (for agreement)")
    teacher.add_argument("--teacher-predictions", default=None,
                         help=".npy of the teacher's classes (N,) or logits (N, classes) for the streamed split")
    teacher.add_argument("--teacher", default=None, help="teacher checkpoint to compute those predictions (needs torch)")
    teacher.add_argument("--teacher-factory", default=None, help="bring-your-own teacher: package.module:function")
    teacher.add_argument("--weights", default=None, help="weights for --teacher-factory")
    out = s.add_argument_group("output")
    out.add_argument("--json", default=None, metavar="FILE", help="write the JSON report here")
    out.add_argument("--report", default=None, metavar="FILE", help="write the HTML report (with plots) here")
    out.add_argument("--log-dir", default=None, help="keep the device servers' logs in this directory")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_simulate)


def _profiles_for(args: argparse.Namespace, num_students: int) -> list[Any]:
    from nonn.devices.profiles import load_profiles, parse_device_list

    catalogue = load_profiles(args.profiles) if args.profiles else None
    devices = parse_device_list(args.devices, catalogue)
    if len(devices) == 1 and num_students > 1 and ":" not in args.devices:
        devices = devices * num_students
    if len(devices) != num_students:
        raise CLIError(
            f"--devices {args.devices!r} gives {len(devices)} device(s) for a bundle with {num_students} students; "
            f"give one per student, e.g. {devices[0].name}:{num_students}"
        )
    return devices


def _teacher_predictions(args: argparse.Namespace, images: Any, dataset: Any) -> Any:
    """The teacher's classes for the streamed images, from a file or by running the teacher."""
    import numpy as np

    if args.teacher_predictions and (args.teacher or args.teacher_factory):
        raise CLIError("give either --teacher-predictions or --teacher/--teacher-factory, not both")
    if args.weights and not args.teacher_factory:
        raise CLIError("--weights goes with --teacher-factory; --teacher already holds the weights")
    if args.teacher_predictions:
        path = Path(args.teacher_predictions)
        if not path.is_file():
            raise FileNotFoundError(f"--teacher-predictions {path}: file not found")
        preds = np.load(path, allow_pickle=False)
        if preds.ndim not in (1, 2) or preds.shape[0] != images.shape[0]:
            raise CLIError(
                f"--teacher-predictions {path}: shape {list(preds.shape)}, expected ({images.shape[0]},) classes "
                f"or ({images.shape[0]}, classes) logits for the {args.split} split"
            )
        return preds
    if not (args.teacher or args.teacher_factory):
        return None
    import torch

    from nonn.students.teacher import load_teacher

    loaded = load_teacher(args.teacher, factory=args.teacher_factory, weights=args.weights)
    meta = loaded.dataset or {}
    mean = np.asarray(meta.get("mean", dataset.mean), dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(meta.get("std", dataset.std), dtype=np.float32).reshape(1, -1, 1, 1)
    out = []
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    with torch.no_grad():
        for start in range(0, images.shape[0], 256):
            x = torch.from_numpy((images[start : start + 256] - mean) / std)
            out.append(loaded.model(x).argmax(dim=1).numpy())
    return np.concatenate(out)


def _simulate(args: argparse.Namespace) -> int:
    from nonn.devices.report import build_report, format_table, write_html, write_json
    from nonn.devices.simulate import SimulationConfig, parse_faults, simulate
    from nonn.runtime.bundle import Bundle
    from nonn.students.data import load_dataset

    bundle = Bundle.load(args.bundle)
    profiles = _profiles_for(args, bundle.num_students)
    faults = parse_faults(args.kill, bundle.num_students)
    dataset = load_dataset(args.dataset, args.data_dir)
    images = dataset.test_x if args.split == "test" else dataset.train_x
    labels = dataset.test_y if args.split == "test" else dataset.train_y
    if list(dataset.input_shape) != list(bundle.preprocessing.input_shape):
        raise CLIError(
            f"--dataset {args.dataset}: images are {list(dataset.input_shape)}, the bundle's students take "
            f"{list(bundle.preprocessing.input_shape)}"
        )
    teacher = _teacher_predictions(args, images, dataset)
    config = SimulationConfig(
        requests=args.requests,
        concurrency=args.concurrency,
        batch_size=args.batch_size,
        rate=args.rate,
        min_duration_s=args.duration,
        recovery_s=args.recovery,
        deadline_s=args.deadline,
        retries=args.retries,
        strict=args.strict,
        network=args.network,
        faults=faults,
        startup_timeout_s=args.startup_timeout,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(
        f"nonn simulate: {bundle.num_students} devices ({args.devices}), {args.dataset} {args.split} split, "
        f"{len(images)} images; starting the fleet...",
        file=sys.stderr,
    )
    result = simulate(bundle.root, profiles, images, labels, teacher, config, log_dir=args.log_dir)
    report = build_report(result, dataset=args.dataset)
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"JSON report: {args.json}")
    if args.report:
        write_html(report, args.report)
        print(f"HTML report: {args.report}")
    return 0
