"""The `nonn` command: a thin argparse layer over the typed Python API.

Each stage has its own module here with a `register(subparsers)` function; handlers import the
heavy libraries (torch, networkx) only when they run, so `nonn serve` starts on a device that
has neither.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from nonn import __version__
from nonn.cli.vocabulary import apply_vocabulary

# Modules under nonn.cli that contribute sub-commands, in --help order.
COMMAND_MODULES = ("teacher", "partition", "students", "export", "runtime", "fleet", "deploy", "demo")

EPILOG = """\
pipeline:
  nonn train-teacher   train a teacher CNN (or bring your own with --teacher-factory)
  nonn partition       group the teacher's final-layer filters into K groups
  nonn train-students  train K students jointly (KD + activation transfer)
  nonn export          write the ONNX deployment bundle
  nonn plan            place students on device profiles, estimate cost
  nonn serve           host one student (or the whole ensemble) over gRPC
  nonn simulate        run the fleet on this machine and report
  nonn deploy          Kubernetes manifests, systemd units, container image, Triton repository
  nonn demo            all of the above on the bundled digits data

Run `nonn COMMAND --help` for a command's options.
"""


class CLIError(Exception):
    """A user-facing error: printed as `nonn: error: ...` with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nonn",
        description="NoNN: turn one large CNN into K small students that run on K edge devices.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nonn {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"nonn.cli.{name}")
        except ModuleNotFoundError as exc:
            # A stage whose optional dependencies are missing simply contributes no commands.
            if exc.name and exc.name.startswith("nonn.cli"):
                continue
            raise
        module.register(subparsers)
    apply_vocabulary(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own messages at INFO; other libraries' (exporters, gRPC) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("nonn").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from nonn.cli.deprecation import log_deprecations

    log_deprecations(args)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("nonn: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        print(
            f"nonn: error: this command needs the '{exc.name}' package; "
            "install the training extras with: pip install 'nonn[train]'",
            file=sys.stderr,
        )
        return 2
    except FloatingPointError as exc:  # a training run that diverged: the message says what to change
        if args.verbose:
            raise
        print(f"nonn: error: {exc}", file=sys.stderr)
        return 1
    except (CLIError, ValueError, OSError) as exc:  # OSError: missing files, permissions, ports in use
        if args.verbose:
            raise
        print(f"nonn: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
