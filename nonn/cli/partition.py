"""`nonn fan` and `nonn partition`: the partitioner's commands (see nonn.partition)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from nonn.cli import CLIError
from nonn.cli.common import (
    add_data_args,
    add_normalize_arg,
    add_seed_arg,
    add_torch_device_arg,
    add_workers_arg,
    default_workers,
    positive_int,
    summary_line,
)
from nonn.cli.deprecation import add_alias


def register(subparsers: argparse._SubParsersAction) -> None:
    fan = subparsers.add_parser(
        "fan",
        help="build the Filter Activation Network from an activation matrix",
        description="Build the Filter Activation Network (FAN) from an (images x filters) array of "
        "spatially averaged activations: for every image, each pair (i, j) of its --top-k most active filters "
        "adds a_i * a_j * |a_i - a_j| (a: the image's activations after ReLU, divided by their maximum); the sum over images is saved as a "
        "(filters x filters) float64 .npy.",
    )
    fan.add_argument("--activations", required=True, help="(images x filters) .npy file")
    fan.add_argument("--top-k", type=int, default=50, help="filters kept per image (default: 50)")
    fan.add_argument("--out", required=True, help="where to write the FAN .npy")
    fan.set_defaults(func=run_fan)

    part = subparsers.add_parser(
        "partition",
        help="group the teacher's final-layer filters into K groups",
        description="Split a teacher layer's filters into K disjoint groups, one per student: "
        "threshold the FAN, find Louvain communities, group them. Reads a FAN (--fan) or "
        "computes it from a teacher over a data set (--teacher, or --teacher-factory with "
        "--weights); then the FAN is saved beside the partition.",
    )
    source = part.add_mutually_exclusive_group(required=True)
    source.add_argument("--fan", help="a FAN .npy (filters x filters), e.g. from `nonn fan`")
    source.add_argument(
        "--teacher",
        help="a nonn teacher checkpoint (from `nonn train-teacher`); --dataset then defaults to "
        "the data set it was trained on",
    )
    source.add_argument(
        "--teacher-factory",
        metavar="MODULE:FUNCTION",
        help="bring your own teacher: a function returning an nn.Module (use with --weights)",
    )
    part.add_argument(
        "--weights",
        help="state_dict or nonn checkpoint for --teacher-factory (without it, the weights the "
        "factory itself loads are used)",
    )
    part.add_argument(
        "--layer",
        help="module whose output is the final conv feature map (default: the model's "
        "feature_layer); an unknown name lists the valid ones",
    )
    add_data_args(part, fallback="the data set the teacher checkpoint records")
    add_normalize_arg(part, "what the teacher checkpoint records; auto for a bring-your-own teacher")
    part.add_argument(
        "--split", choices=("train", "test"), default="train", help="images to run (default: train)"
    )
    part.add_argument("--limit", type=positive_int, default=None, help="use only the first N images of the split")
    part.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass (default: 256)")
    add_torch_device_arg(part)
    add_workers_arg(part)
    part.add_argument("--top-k", type=int, default=50, help="filters kept per image in the FAN (default: 50)")
    part.add_argument("-K", "--num-students", type=int, default=None, help="number of students K (2..filters); required")
    add_alias(part, "--students", "-K/--num-students", dest="num_students", type=int)
    part.add_argument(
        "--strategy",
        choices=("balanced", "paper"),
        default="balanced",
        help="balanced: every filter used, sizes within --tolerance of C/K (default); "
        "paper: the prototype's rule, which drops the largest cluster",
    )
    part.add_argument("--resolution", type=float, default=0.7, help="Louvain resolution (default: 0.7)")
    part.add_argument(
        "--percentile", type=float, default=99.0, help="keep FAN edges at or above this percentile "
        "of the non-zero weights (default: 99)"
    )
    part.add_argument(
        "--tolerance", type=float, default=0.25, help="balanced: allowed deviation of group sizes "
        "from C/K (default: 0.25)"
    )
    add_seed_arg(part)
    part.add_argument("--out", required=True, help="where to write partition.json")
    part.add_argument("--fan-out", help="where to save the computed FAN (default: fan.npy beside --out)")
    part.add_argument(
        "--activations-out",
        help="also save the (images x filters) activations, e.g. to try other --top-k with `nonn fan`",
    )
    part.add_argument("--plot", metavar="PNG", help="also draw the FAN graph and group sizes to this PNG")
    part.add_argument("--no-progress", action="store_true", help="no progress bar")
    part.set_defaults(func=run_partition)


def _load_npy(path: str, what: str) -> Any:
    import numpy as np

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found (expected {what} .npy)")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read as .npy ({exc}); expected {what}") from exc
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise ValueError(f"{path}: is an .npz archive; expected {what} .npy")
    return array


def _save_npy(path: str | Path, array: Any) -> None:
    import numpy as np

    from nonn.artifacts import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def run_fan(args: argparse.Namespace) -> int:
    from nonn.partition.fan import build_fan

    activations = _load_npy(args.activations, "an (images x filters) activation array")
    try:
        fan = build_fan(activations, top_k=args.top_k)
    except ValueError as exc:
        raise ValueError(f"{args.activations}: {exc}") from exc
    _save_npy(args.out, fan)
    print(f"FAN {fan.shape[0]}x{fan.shape[1]} from {activations.shape[0]} images (top-k {args.top_k}) -> {args.out}")
    return 0


def _teacher_fan(args: argparse.Namespace) -> tuple[Any, str, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Load the teacher and data, settle the input contract, collect activations, build the FAN.

    Returns (fan, layer, teacher summary, extra params, data and input contract records)."""
    from nonn.partition.activations import collect_activations, layer_names
    from nonn.partition.fan import build_fan
    from nonn.students.data import resolve_data
    from nonn.students.loader import make_loader
    from nonn.students.normalization import teacher_contract
    from nonn.students.teacher import resolve_device
    from nonn.students.teacher_loading import load_teacher

    if args.teacher and args.weights:
        raise CLIError("--weights goes with --teacher-factory; --teacher already holds the weights")
    device = resolve_device(args.device)
    loaded = load_teacher(args.teacher, factory=args.teacher_factory, weights=args.weights, map_location=device)
    layer = args.layer or loaded.feature_layer
    if not layer:
        names = ", ".join(layer_names(loaded.model)[:60])
        raise CLIError(f"--layer is required: the model names no feature_layer; valid names: {names}")

    dataset = resolve_data(args.dataset, args.data_dir, args.image_size, [(loaded.dataset, loaded.source)])
    contract = teacher_contract(args.normalize, dataset, loaded, device=device)
    loader = make_loader(
        dataset, split=args.split, batch_size=args.batch_size, train=False, seed=args.seed, limit=args.limit,
        contract=contract, workers=default_workers(args.data_workers),
    )
    activations = collect_activations(loaded.model, layer, loader, device=device, progress=not args.no_progress)
    if args.activations_out:
        _save_npy(args.activations_out, activations)
    fan = build_fan(activations, top_k=args.top_k)
    teacher = {
        "source": str(args.teacher or args.weights or args.teacher_factory),
        "fingerprint": loaded.fingerprint,
        "arch": loaded.arch,
        "factory": loaded.factory,
    }
    extra = {
        "top_k": args.top_k,
        "dataset": dataset.name,
        "split": args.split,
        "images": int(activations.shape[0]),
    }
    records = {"data": dataset.spec.to_dict() if dataset.spec else None, "input_contract": contract.to_dict()}
    return fan, layer, teacher, extra, records


def run_partition(args: argparse.Namespace) -> int:
    from nonn.partition.api import partition_fan

    started = time.perf_counter()
    if args.num_students is None:
        raise CLIError("partition needs the number of students: -K/--num-students K")
    written = [args.out]
    if args.fan:
        if args.weights:
            raise CLIError("--weights goes with --teacher-factory, not --fan")
        fan = _load_npy(args.fan, "a (filters x filters) FAN")
        layer, teacher, extra, records = args.layer, None, {"fan": str(args.fan)}, {}
    else:
        fan, layer, teacher, extra, records = _teacher_fan(args)
        fan_path = Path(args.fan_out) if args.fan_out else Path(args.out).parent / "fan.npy"
        _save_npy(fan_path, fan)
        extra["fan"] = str(fan_path)
        written.append(str(fan_path))
        print(f"FAN {fan.shape[0]}x{fan.shape[1]} from {extra['images']} images of layer {layer} -> {fan_path}")
    try:
        partition = partition_fan(
            fan,
            args.num_students,
            strategy=args.strategy,
            resolution=args.resolution,
            percentile=args.percentile,
            seed=args.seed,
            tolerance=args.tolerance,
            layer=layer,
            teacher=teacher,
            extra_params=extra,
            **records,
        )
    except ValueError as exc:
        source = f"{args.fan}: " if args.fan else ""
        raise ValueError(f"{source}{exc}") from exc
    partition.save(args.out)
    if args.plot:
        from nonn.partition.plot import plot_partition

        plot_partition(fan, partition, args.plot)
        written.append(args.plot)
    modularity = "n/a" if partition.modularity is None else f"{partition.modularity + 0.0:.4f}"
    detail = (
        f"K={partition.num_students} {partition.strategy}: sizes {partition.group_sizes}, coverage {partition.coverage:.3f}, "
        f"{partition.stats['edges_kept']} edges kept, {partition.stats['isolated_filters']} isolated filters"
    )
    print(summary_line("partition", ", ".join(written), detail, f"modularity {modularity}", started))
    return 0
