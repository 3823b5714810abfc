"""`nonn simulate`: run a bundle's students as a local fleet of device processes and report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from nonn.cli import CLIError
from nonn.cli.common import (
    FLEET_METAVAR,
    add_data_args,
    add_json_arg,
    add_normalize_arg,
    add_seed_arg,
    emit_json,
    add_transport_arg,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from nonn.cli.deprecation import add_alias

SIMULATE_EPILOG = """\
faults (--kill, repeatable):
  DEVICE@SECONDS            kill device DEVICE (index from 0) SECONDS into the stream
  DEVICE@SECONDS:RESTART    ... and start it again RESTART seconds later
  e.g. --kill 1@2 --kill 0@3:5. The stream sends exactly --requests requests; a fault due
  after the last one does not happen (the report says so). --until-faults-end keeps the stream
  going past --requests until every fault has played out (the device serving again, plus
  --recovery seconds), so the report shows the outage and the recovery.
  --slow DEVICE@SECONDS:FACTOR   from SECONDS on, device DEVICE runs FACTOR times slower (its
                            process is paused and resumed in a 20 ms cycle), e.g. --slow 1@0:4
  --compare-all-up          first stream with every device up, then with the faults: the report
                            puts latency and throughput side by side

replicas (--replicas R):
  each student on R devices (--fleet then lists R devices per student, each student's in a
  row); a request goes to the healthiest replica, and also to a second one when the first has
  not answered within its usual time (--no-hedge: only when the first fails). Device indices
  in --kill and --slow count every device: student k's replicas are k*R .. k*R+R-1.

network (--network):
  auto   the client delay model (as delay); never changes this host's network
  delay  the client delay model: a relay per device adds latency + bytes/bandwidth (+ loss)
  netns  a network namespace per device, shaped by the kernel's netem (root, iproute2 and the
         netem qdisc needed; error when not possible here). Addresses from 198.18.0.0/15,
         names tagged with this process's id; what a killed run left is removed at the next
         start
  none   plain loopback

example:
  nonn simulate --bundle runs/bundle --fleet rpi3b+:4 --dataset fashion-mnist \\
      --requests 2000 --concurrency 8 --kill 1@2:3 --until-faults-end --json sim.json --report sim.html
"""


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
        "--fleet",
        default=None,
        metavar=FLEET_METAVAR,
        help="(required) device profiles, at least one per student: NAME[:COUNT],... e.g. rpi3b+:4 or rpi4b,rpi3b+:3 "
        "(a single profile name is used for every student); students are placed on them as `nonn plan` places them",
    )
    add_alias(s, "--devices", "--fleet", dest="fleet")
    s.add_argument("--profiles", default=None, help="extra device profile file (nonn.devices/1 JSON) to add or override profiles")
    add_data_args(s, fallback="the data set the bundle records")
    s.add_argument("--split", choices=("test", "train"), default="test", help="which split to stream (default: test)")
    run = s.add_argument_group("stream")
    run.add_argument("--requests", type=non_negative_int, default=1000,
                     help="requests to send, exactly, cycling over the split's images in a seeded random order (--seed); "
                          "0 = every image once (default: 1000). Only --duration and --until-faults-end send more")
    run.add_argument("--concurrency", type=positive_int, default=4, help="requests in flight at once (default: 4)")
    run.add_argument("--batch-size", type=positive_int, default=1, help="images per request (default: 1)")
    run.add_argument("--rate", type=positive_float, default=None,
                     help="send at this many requests per second (open loop; default: as fast as --concurrency allows)")
    run.add_argument("--duration", type=non_negative_float, default=0.0,
                     help="stream for at least this many seconds, sending more than --requests if needed (default: 0)")
    run.add_argument("--kill", action="append", default=[], metavar="DEVICE@SECONDS[:RESTART]",
                     help="kill a device during the stream, optionally restarting it (repeatable; see below)")
    run.add_argument("--slow", action="append", default=[], metavar="DEVICE@SECONDS:FACTOR",
                     help="slow a device down by FACTOR from SECONDS on (repeatable; see below)")
    run.add_argument("--until-faults-end", action="store_true",
                     help="keep streaming past --requests until every --kill/--slow has played out (plus --recovery)")
    run.add_argument("--compare-all-up", action="store_true",
                     help="run the same stream with every device up first and report both side by side")
    run.add_argument("--replicas", type=positive_int, default=1, help="devices per student (default: 1; see below)")
    run.add_argument("--no-hedge", action="store_true", help="with --replicas: no second request to a slow replica")
    run.add_argument("--recovery", type=non_negative_float, default=1.0,
                     help="with --until-faults-end: seconds to keep streaming after the last fault event (default: 1)")
    run.add_argument("--deadline", type=positive_float, default=1.0,
                     help="seconds a device has to answer, retries included (default: 1.0)")
    run.add_argument("--retries", type=non_negative_int, default=2, help="extra attempts on UNAVAILABLE (default: 2)")
    run.add_argument("--strict", action="store_true",
                     help="a request fails (is lost) when any device misses it, instead of a degraded answer")
    add_transport_arg(run)
    run.add_argument("--network", choices=("auto", "netns", "delay", "none"), default="auto",
                     help="network emulation (default: auto; see below)")
    run.add_argument("--startup-timeout", type=positive_float, default=60.0,
                     help="seconds each device has to report SERVING (default: 60)")
    add_seed_arg(s)
    teacher = s.add_argument_group("teacher (for agreement)")
    teacher.add_argument("--teacher-predictions", default=None,
                         help=".npy of the teacher's classes (N,) or logits (N, classes) for the streamed split")
    teacher.add_argument("--teacher", default=None, help="teacher checkpoint to compute those predictions (needs torch)")
    teacher.add_argument("--teacher-factory", default=None, help="bring-your-own teacher: package.module:function")
    teacher.add_argument("--weights", default=None, help="weights for --teacher-factory")
    add_normalize_arg(teacher, "what the teacher checkpoint records, else the bundle's input contract")
    out = s.add_argument_group("output")
    add_json_arg(out)
    out.add_argument("--report", default=None, metavar="FILE", help="write the HTML report (with plots) here")
    out.add_argument("--log-dir", default=None, help="keep the device servers' logs in this directory")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_simulate)


def resolve_devices(devices: str, num_devices: int, profiles_file: str | None = None) -> list[Any]:
    """The DeviceProfiles of a device list ("rpi3b+:4"), at least `num_devices` (one per student and
    replica); a bare single name is repeated."""
    from nonn.devices.profiles import load_profiles, parse_device_list

    catalogue = load_profiles(profiles_file) if profiles_file else None
    resolved = parse_device_list(devices, catalogue)
    if len(resolved) == 1 and num_devices > 1 and ":" not in devices:
        resolved = resolved * num_devices
    if len(resolved) < num_devices:
        raise CLIError(
            f"--fleet {devices!r} gives {len(resolved)} device(s) where at least {num_devices} are needed (one per "
            f"student and replica); e.g. {resolved[0].name}:{num_devices}"
        )
    return resolved


def load_teacher_predictions(path: str | Path, num_images: int) -> Any:
    """A .npy of the teacher's classes (N,) or logits (N, classes) for the streamed images."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--teacher-predictions {path}: file not found")
    preds = np.load(path, allow_pickle=False)
    if preds.ndim not in (1, 2) or preds.shape[0] != num_images:
        raise CLIError(
            f"--teacher-predictions {path}: shape {list(preds.shape)}, expected ({num_images},) classes "
            f"or ({num_images}, classes) logits for the streamed split"
        )
    return preds


def run_teacher(
    teacher: str | None, images: Any, dataset: Any, factory: str | None = None, weights: str | None = None,
    normalize: Any = None, contract: Any = None, source: str = "the bundle",
) -> Any:
    """The teacher's classes for `images` (as stored), normalised as the teacher expects: as
    `normalize` says, else as its checkpoint records, else as `contract` (the bundle's) says."""
    import numpy as np
    import torch

    from nonn.students.normalization import Recorded, teacher_contract
    from nonn.students.teacher_loading import load_teacher

    loaded = load_teacher(teacher, factory=factory, weights=weights)
    recorded = [Recorded(contract, source)] if contract is not None else []
    wanted = teacher_contract(normalize, dataset, loaded, recorded)
    out = []
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    with torch.no_grad():
        for start in range(0, len(images), 256):
            x = wanted.normalize_unit(wanted.to_unit(images[start : start + 256]))
            out.append(loaded.model(torch.from_numpy(x)).argmax(dim=1).numpy())
    return np.concatenate(out)


def run_simulation(
    bundle: str | Path,
    devices: str,
    dataset: str | None = None,
    *,
    data_dir: str | None = None,
    image_size: Any = None,
    normalize: Any = None,
    split: str = "test",
    config: Any = None,
    kills: Sequence[str] = (),
    slowdowns: Sequence[str] = (),
    profiles_file: str | None = None,
    teacher_predictions: str | Path | None = None,
    teacher: str | None = None,
    teacher_factory: str | None = None,
    weights: str | None = None,
    json_path: str | Path | None = None,
    report_path: str | Path | None = None,
    log_dir: str | None = None,
    echo: bool = True,
) -> dict[str, Any]:
    """`nonn simulate` as a function: load the bundle, devices and data, run, write the reports.

    `config` is a SimulationConfig (its `faults` and `slowdowns` are replaced by the parsed `kills`
    and `slowdowns`). Returns the JSON report; prints the table when `echo`.
    """
    from dataclasses import replace

    import numpy as np

    from nonn.devices.planner import place_replicas
    from nonn.devices.report import build_report, format_table, write_html
    from nonn.devices.simulate import SimulationConfig, parse_faults, parse_slowdowns, simulate
    from nonn.runtime.bundle import Bundle
    from nonn.students.data import resolve_data

    if teacher_predictions and (teacher or teacher_factory):
        raise CLIError("give either --teacher-predictions or --teacher/--teacher-factory, not both")
    if weights and not teacher_factory:
        raise CLIError("--weights goes with --teacher-factory; --teacher already holds the weights")
    if split not in ("test", "train"):
        raise CLIError(f"--split {split!r}: expected test or train")
    loaded = Bundle.load(bundle)
    config = config or SimulationConfig()
    candidates = resolve_devices(devices, loaded.num_students * config.replicas, profiles_file)
    # Student k's replicas on profiles[k*R] .. profiles[k*R + R-1], placed as `nonn plan` places them.
    profiles = [candidates[d] for copies in place_replicas(loaded, candidates, config.replicas) for d in copies]
    config = replace(config, faults=parse_faults(list(kills), len(profiles)), slowdowns=parse_slowdowns(list(slowdowns), len(profiles)))
    data = resolve_data(dataset, data_dir, image_size, [(loaded.dataset, loaded.manifest_path)])
    if list(data.input_shape) != list(loaded.input_contract.input_shape):
        raise CLIError(
            f"data set {data.name}: images are {list(data.input_shape)}, the bundle's students take "
            f"{list(loaded.input_contract.input_shape)} (resize with --image-size H[,W])"
        )
    # An image folder is decoded here: only as many images as --requests asks for (the stream
    # cycles over them when faults or --duration make it longer). Requests take the images in a
    # seeded random order: a folder lists its images class by class, and a set may be sorted by
    # label, so the first N would be a few classes only.
    available = data.split_size(split)
    wanted = available if data.in_memory or config.requests == 0 else min(available, config.requests * config.batch_size)
    order = np.arange(available) if config.requests == 0 else np.random.default_rng(config.seed).permutation(available)
    pick = order[:wanted]
    images, labels = data.read(split, pick), data.labels(split)[pick]
    if teacher_predictions:
        teacher_classes = load_teacher_predictions(teacher_predictions, available)[pick]
    elif teacher or teacher_factory:
        teacher_classes = run_teacher(teacher, images, data, teacher_factory, weights, normalize,
                                      loaded.input_contract, str(loaded.manifest_path))
    else:
        teacher_classes = None
    if echo:
        print(
            f"nonn simulate: {len(profiles)} devices ("
            + ", ".join(f"{loaded.students[d // config.replicas].name} on {p.name}" for d, p in enumerate(profiles))
            + f"), {data.name} {split} split, {len(images)} images; starting the fleet...",
            file=sys.stderr,
        )
    result = simulate(loaded.root, profiles, images, labels, teacher_classes, config, log_dir=log_dir)
    report = build_report(result, dataset=data.name)
    if echo and str(json_path) != "-":
        print(format_table(report))
    if json_path:
        emit_json(str(json_path), report)
        if echo and str(json_path) != "-":
            print(f"JSON report: {json_path}")
    if report_path:
        write_html(report, report_path)
        if echo:
            print(f"HTML report: {report_path}")
    return report


def _simulate(args: argparse.Namespace) -> int:
    from nonn.devices.simulate import SimulationConfig

    config = SimulationConfig(
        requests=args.requests,
        concurrency=args.concurrency,
        batch_size=args.batch_size,
        rate=args.rate,
        min_duration_s=args.duration,
        until_faults_end=args.until_faults_end,
        recovery_s=args.recovery,
        deadline_s=args.deadline,
        retries=args.retries,
        strict=args.strict,
        transport=args.transport,
        network=args.network,
        replicas=args.replicas,
        hedge=not args.no_hedge,
        compare_all_up=args.compare_all_up,
        startup_timeout_s=args.startup_timeout,
        seed=args.seed,
        progress=not args.no_progress,
    )
    if args.fleet is None:
        raise CLIError(f"simulate needs the devices: --fleet {FLEET_METAVAR}, e.g. --fleet rpi3b+:4")
    from nonn.devices.fleet import FleetError

    try:
        run_simulation(
            args.bundle,
            args.fleet,
            args.dataset,
            data_dir=args.data_dir,
            image_size=args.image_size,
            normalize=args.normalize,
            split=args.split,
            config=config,
            kills=args.kill,
            slowdowns=args.slow,
            profiles_file=args.profiles,
            teacher_predictions=args.teacher_predictions,
            teacher=args.teacher,
            teacher_factory=args.teacher_factory,
            weights=args.weights,
            json_path=args.json,
            report_path=args.report,
            log_dir=args.log_dir,
        )
    except FleetError as exc:
        raise CLIError(exc.summary) from None
    return 0
