"""Argument checks shared by the runtime's constructors: a bad value is named, with what was expected."""

from __future__ import annotations

__all__ = ["at_least"]


def at_least(minimum: float, **values: float) -> None:
    """ValueError naming the first of `values` (name=value) below `minimum`."""
    for name, value in values.items():
        if value < minimum:
            raise ValueError(f"{name} must be at least {minimum:g}, got {value}")
