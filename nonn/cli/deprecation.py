"""Old flag spellings kept working for one release, with a warning that names the new one.

An alias is a hidden option (absent from --help and from the flag vocabulary) that stores into
the new option's destination. The warning is logged once logging is set up, after parsing.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Callable

log = logging.getLogger("nonn.cli")

_NOTES = "_deprecation_notes"


class _DeprecatedAlias(argparse.Action):
    """Stores like the option it stands for (or not at all, for a retired switch) and notes a warning."""

    def __init__(self, option_strings, dest, *, message: str, store: bool = True, **kwargs: Any) -> None:
        self.message = message
        self.store = store
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        notes = getattr(namespace, _NOTES, None) or []
        notes.append(f"{option_string} is deprecated and will be removed in the next release: {self.message}")
        setattr(namespace, _NOTES, notes)
        if self.store:
            setattr(namespace, self.dest, values)


def add_alias(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    old: str,
    new: str,
    *,
    dest: str,
    type: Callable[[str], Any] | None = None,
) -> None:
    """`old` keeps working as `new` (same destination, taking a value); using it logs a deprecation warning."""
    parser.add_argument(old, dest=dest, type=type, action=_DeprecatedAlias, message=f"use {new}", default=argparse.SUPPRESS)


def add_retired_switch(parser: argparse.ArgumentParser | argparse._ArgumentGroup, old: str, message: str) -> None:
    """A switch whose behaviour became the default: accepted, ignored, and warned about."""
    parser.add_argument(old, action=_DeprecatedAlias, message=message, store=False, nargs=0,
                        dest="_retired_" + old.lstrip("-").replace("-", "_"), default=argparse.SUPPRESS)


def log_deprecations(args: argparse.Namespace) -> None:
    """One WARNING per deprecated spelling the user typed."""
    for note in getattr(args, _NOTES, None) or []:
        log.warning("%s", note)
