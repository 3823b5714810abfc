"""Argument groups and the summary line shared by several commands, so that every command spells them the same way."""

from __future__ import annotations

import argparse
import time

# The two ways a command names devices: profiles to place students on, or running servers.
FLEET_METAVAR = "PROFILE[:COUNT],..."
DEVICES_METAVAR = "HOST:PORT,..."

DATASET_HELP = (
    "data set: digits (bundled with scikit-learn), mnist, fashion-mnist, cifar10, cifar100, "
    "a path to an .npz file with arrays x (N,H,W[,C] or N,C,H,W) and y (N,), or an image folder "
    "(one subfolder of PNG/JPEG images per class, optionally inside train/ and val/ or test/)"
)
NORMALIZE_HELP = (
    "how images are normalised for the teacher: dataset (the training split's mean/std), none (images as "
    "stored, scaled to [0, 1]), imagenet (torchvision's constants), MEAN,..:STD,.. (one per channel, on the "
    "[0, 1] scale), or auto (score the teacher under each and take the best)"
)


def add_data_args(parser: argparse.ArgumentParser, default: str | None = "digits", *, fallback: str | None = None) -> None:
    """--dataset and --data-dir, as every command that reads images takes them.

    `default=None` makes --dataset required, unless `fallback` describes what the command uses
    when it is left out (e.g. "the data set the teacher was trained on"); then it is None.
    """
    if fallback is not None:
        parser.add_argument("--dataset", default=None, help=DATASET_HELP + f" (default: {fallback})")
    else:
        parser.add_argument("--dataset", default=default, required=default is None,
                            help=DATASET_HELP + ("" if default is None else f" (default: {default})"))
    parser.add_argument(
        "--data-dir",
        default=None,
        help="directory holding a named data set's files (default: the set's standard location, "
        "e.g. /usr/share/datasets/fashion-mnist)",
    )
    parser.add_argument(
        "--image-size", type=image_size, default=None, metavar="H[,W]",
        help="resize every image to H x W pixels (default: keep their size; an image folder's images must then all have one size)",
    )  # fmt: skip


def image_size(text: str) -> tuple[int, int]:
    """`--image-size` H or H,W -> (H, W)."""
    parts = text.replace("x", ",").split(",")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) not in (1, 2) or min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected H or H,W in pixels (e.g. 96 or 96,128), got {text!r}")
    return (size[0], size[-1])


def normalize_spec(text: str):
    """`--normalize` text -> NormalizeSpec (argparse reports a malformed value)."""
    from nonn.runtime.input_contract import parse_normalize

    try:
        return parse_normalize(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--normalize {text!r}: ")) from None


def add_normalize_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: str) -> None:
    """--normalize for a command that runs a teacher; `default` says what happens without it."""
    parser.add_argument("--normalize", type=normalize_spec, default=None, metavar="MODE",
                        help=f"{NORMALIZE_HELP} (default: {default})")


def add_workers_arg(parser: argparse.ArgumentParser) -> None:
    """--data-workers: processes decoding an image folder's batches while the model runs."""
    parser.add_argument(
        "--data-workers", type=non_negative_int, default=None,
        help="worker processes decoding image-folder batches (default: one per spare CPU core, at most 4; "
        "0 decodes in the main process; in-memory data sets need none)",
    )  # fmt: skip


def default_workers(requested: int | None) -> int:
    """--data-workers, or one per spare CPU core (at most 4)."""
    if requested is not None:
        return requested
    import os

    return max(0, min(4, (os.cpu_count() or 1) - 1))


def add_torch_device_arg(parser: argparse.ArgumentParser) -> None:
    """--device for training and evaluation (cpu, cuda, cuda:1, auto)."""
    parser.add_argument(
        "--device",
        default="auto",
        help="torch device: cpu, cuda, cuda:N, or auto (cuda when available) (default: auto)",
    )


# nonn.students.precision.PRECISIONS, repeated so that building the parser does not import torch.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def add_precision_arg(parser: argparse.ArgumentParser) -> None:
    """--precision for training (fp32, bf16, fp16 or auto)."""
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="auto",
        help="numeric precision of training: auto picks by the device actually used: bf16 on CUDA compute "
        "capability >= 8.0, fp16 with loss scaling on 7.x, else fp32 (always fp32 on CPU); bf16/fp16 on a CPU "
        "run CPU autocast (default: auto)",
    )  # fmt: skip


def summary_line(command: str, written: str, detail: str, metric: str, started: float) -> str:
    """The one line a training command ends with: what it wrote, its key figure, how long it took.

    `started` is time.perf_counter() when the command began.
    """
    return f"{command}: wrote {written} ({detail}); {metric}; took {time.perf_counter() - started:.1f} s"


# nonn.runtime.aggregator.TRANSPORTS, repeated so that building the parser does not import grpc.
TRANSPORTS = ("auto", "stream", "unary")


def add_transport_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--transport", choices=TRANSPORTS, default="auto",
        help="how the aggregator calls the devices: one ModelStreamInfer stream each (cheaper per request), "
        "ModelInfer calls, or auto: stream where the device offers it (default: auto)",
    )  # fmt: skip


def add_json_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup, what: str = "report") -> None:
    """--json [FILE]: the command's result as JSON, to FILE, or on stdout instead of the text."""
    parser.add_argument(
        "--json", nargs="?", const="-", default=None, metavar="FILE",
        help=f"write the {what} as JSON to FILE; with no FILE (or -), print it on stdout instead of the text",
    )  # fmt: skip


def emit_json(path: str, obj: object) -> None:
    """Write `obj` as the --json flag asks: '-' prints it, anything else is a file written atomically."""
    if path == "-":
        import json

        print(json.dumps(obj, indent=2))
    else:
        from nonn.artifacts import atomic_write_json

        atomic_write_json(path, obj)


def add_seed_arg(parser: argparse.ArgumentParser, default: int = 0) -> None:
    parser.add_argument("--seed", type=int, default=default, help=f"random seed (default: {default})")


def _number_type(convert: type, minimum: float, inclusive: bool, what: str):
    """An argparse `type=` that converts and checks a lower bound, naming the bad value."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value >= minimum if inclusive else value > minimum):  # also rejects NaN
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number_type(int, 1, True, "a positive integer")
non_negative_int = _number_type(int, 0, True, "an integer >= 0")
positive_float = _number_type(float, 0.0, False, "a positive number")
non_negative_float = _number_type(float, 0.0, True, "a number >= 0")
