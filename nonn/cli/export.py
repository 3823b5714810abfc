"""`nonn export`, `nonn bundle verify`, `nonn plan`: the deployment bundle and device placement."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nonn.cli import CLIError
from nonn.cli.common import FLEET_METAVAR, add_data_args, non_negative_int, positive_int
from nonn.cli.deprecation import add_alias, add_retired_switch


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write the ONNX deployment bundle (students, head, manifest, Triton repository)",
        description="Export a students checkpoint to an ONNX bundle: one model per student "
        "(image -> pooled features) and one for the head (features -> logits). Every model is "
        "checked against PyTorch with ONNX Runtime; the bundle is written atomically.",
    )
    p.add_argument("--students", required=True, help="students checkpoint (nonn.students/1) from `nonn train-students`")
    p.add_argument("--out", required=True, help="bundle directory to write (atomically; an existing one is refused without --overwrite)")
    p.add_argument("--quantize", choices=["int8"], default=None, help="static int8 quantization of the students, calibrated on training images")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's default, at least 17)")
    p.add_argument("--calibration-images", type=positive_int, default=256, help="training images for int8 calibration (default: 256)")
    p.add_argument("--parity-images", type=positive_int, default=64, help="test images for the ONNX Runtime vs PyTorch parity check (default: 64)")
    p.add_argument("--eval-images", type=non_negative_int, default=2000, help="test images for the accuracy report (default: 2000; 0 skips it)")
    add_data_args(p, fallback="the one the students checkpoint records; its images are used for parity, calibration and accuracy")
    p.add_argument("--input-type", choices=("uint8", "fp32"), default="uint8",
                   help="what the students take: uint8, raw pixels as stored (normalised inside each graph; a quarter "
                        "of the bytes), or fp32, normalised floats (default: uint8)")
    p.add_argument("--out-of-range", choices=("error", "warn"), default="error",
                   help="clients given float pixels outside [0, 1]: refuse them, or warn and clip (default: error)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out instead of refusing")
    add_retired_switch(p, "--no-overwrite", "export refuses an existing --out unless --overwrite is given")
    p.set_defaults(func=_export)

    b = subparsers.add_parser("bundle", help="inspect a deployment bundle")
    bsub = b.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    v = bsub.add_parser(
        "verify",
        help="re-check a bundle's hashes, schema and model shapes",
        description="Exit 0 if the bundle is intact; otherwise print every problem and exit 1.",
    )
    v.add_argument("bundle", help="bundle directory (or its manifest.json)")
    v.add_argument("--no-run", action="store_true", help="skip loading the models in ONNX Runtime (hashes and schema only)")
    v.set_defaults(func=_verify)

    pl = subparsers.add_parser(
        "plan",
        help="place students on device profiles; estimate memory, latency, bytes and energy",
        description="Assign each student of a bundle to a device (each on a device of its own that "
        "holds it, the slowest device as fast as possible: the same placement `nonn simulate` uses), "
        "print the device order that `serve --aggregate` and `infer --devices` take, and compare the "
        "fleet with the teacher on one device and with a layer-wise model-parallel split of the "
        "teacher. --out writes plan.json, which `nonn deploy` reads.",
    )
    pl.add_argument("--bundle", required=True, help="bundle directory from `nonn export`")
    pl.add_argument("--fleet", default=None, metavar=FLEET_METAVAR, help="the devices to place the students on, as profile names: "
                    "e.g. rpi3b+:4 or rpi4b,jetson-nano (required)")
    add_alias(pl, "--devices", "--fleet", dest="fleet")
    pl.add_argument("--profiles", default=None, help="JSON file of extra or overriding device profiles")
    pl.add_argument("--aggregator", default=None, help="profile of the node that runs the head (default: the first device's kind)")
    pl.add_argument(
        "--runtime-mb",
        type=float,
        default=None,
        help="memory of the serving runtime itself, MB (default: the measured resident size of `nonn serve`, 82 MB)",
    )
    pl.add_argument("--replicas", type=positive_int, default=1,
                    help="devices per student (default: 1); spare devices take the extra copies")
    add_alias(pl, "--json", "--out", dest="out")
    pl.add_argument("--out", default=None,
                    help="write the plan (nonn.plan/2: placement, device order, estimates, the bundle's manifest sha256) here, e.g. plan.json")
    pl.set_defaults(func=_plan)


def _export(args: argparse.Namespace) -> int:
    from nonn.students.export import export_from_checkpoint

    if Path(args.out).exists() and not args.overwrite:
        raise CLIError(f"{args.out} already exists: pass --overwrite to replace it")
    bundle = export_from_checkpoint(
        args.students,
        args.out,
        quantize=args.quantize,
        opset=args.opset,
        dataset=args.dataset,
        data_dir=args.data_dir,
        image_size=args.image_size,
        input_type=args.input_type,
        out_of_range=args.out_of_range,
        calibration_count=args.calibration_images,
        parity_count=args.parity_images,
        eval_count=args.eval_images,
        overwrite=args.overwrite,
        progress=True,
    )
    from nonn.runtime.bundle_check import summarize

    for line in summarize(bundle):
        print(line)
    for entry in [*bundle.students, bundle.head]:
        if entry.parity_max_abs_diff is not None:
            print(f"  parity {entry.name}: max |onnx - torch| = {entry.parity_max_abs_diff:.2e}")
    if bundle.quantization:
        q = bundle.quantization
        for entry, fp32_diff, int8_diff in zip(bundle.students, q["fp32_parity_max_abs_diff"], q["max_abs_feature_diff"]):
            print(f"  parity {entry.name}: fp32 max |onnx - torch| = {fp32_diff:.2e}; int8 vs fp32 features max |diff| = {int8_diff:.3g}")
        print(
            f"  int8: students {q['fp32_bytes'] / 1024:.1f} KiB -> {q['int8_bytes'] / 1024:.1f} KiB; "
            f"accuracy {_pct(q.get('fp32_accuracy'))} -> {_pct(q.get('int8_accuracy'))} on {q.get('eval_images')} test images"
        )
    elif bundle.metrics.get("onnx_accuracy") is not None:
        print(f"  accuracy (ONNX Runtime, {bundle.metrics['eval_images']} test images): {_pct(bundle.metrics['onnx_accuracy'])}")
    print(f"wrote {Path(args.out)}")
    return 0


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _verify(args: argparse.Namespace) -> int:
    from nonn.artifacts import ArtifactError
    from nonn.deploy.triton import verify_model_repository
    from nonn.runtime.bundle import Bundle
    from nonn.runtime.bundle_check import verify_bundle

    problems = verify_bundle(args.bundle, check_models=not args.no_run)
    try:
        problems += verify_model_repository(Bundle.load(args.bundle))
    except ArtifactError:
        pass  # the manifest itself is broken: verify_bundle has said so
    if problems:
        for problem in problems:
            print(f"nonn: bundle verify: {problem}", file=sys.stderr)
        print(f"nonn: bundle verify: {args.bundle}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    from nonn.runtime.bundle_check import summarize

    for line in summarize(Bundle.load(args.bundle)):
        print(line)
    print(f"ok: {args.bundle} verified (schema, sha256{'' if args.no_run else ', model inputs/outputs'}, Triton repository)")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from nonn.devices.plan_text import format_plan
    from nonn.devices.cost_model import RUNTIME_FOOTPRINT_MB
    from nonn.devices.planner import plan
    from nonn.devices.profiles import load_profiles, parse_device_list
    from nonn.runtime.bundle import Bundle

    if args.fleet is None:
        raise CLIError(f"plan needs the devices: --fleet {FLEET_METAVAR}, e.g. --fleet rpi3b+:4")
    profiles = load_profiles(args.profiles)
    devices = parse_device_list(args.fleet, profiles)
    aggregator = None
    if args.aggregator is not None:
        named = parse_device_list(args.aggregator, profiles)
        if len(named) != 1:
            raise ValueError(f"--aggregator {args.aggregator!r}: expected one device profile name, got {len(named)} devices")
        aggregator = named[0]
    runtime_mb = RUNTIME_FOOTPRINT_MB if args.runtime_mb is None else args.runtime_mb
    if runtime_mb < 0:
        raise ValueError(f"--runtime-mb must be >= 0, got {runtime_mb}")
    result = plan(Bundle.load(args.bundle), devices, aggregator=aggregator, runtime_mb=runtime_mb, replicas=args.replicas)
    print(format_plan(result))
    if args.out:
        result.save(args.out)
        print(f"wrote {args.out}")
    return 0
