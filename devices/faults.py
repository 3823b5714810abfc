"""Faults a simulation injects into its fleet: devices killed (and restarted) or slowed down.

Text forms, as the command line takes them:

* ``--kill DEVICE@SECONDS[:RESTART_AFTER]``: kill device DEVICE (index from 0) SECONDS into
  the stream, and start it again RESTART_AFTER seconds later if given;
* ``--slow DEVICE@SECONDS:FACTOR``: from SECONDS into the stream on, device DEVICE runs FACTOR
  times slower (its process is paused and resumed in a 20 ms cycle, as `cpulimit` does, so
  everything it does, serving included, takes FACTOR times as long on average).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

__all__ = ["FaultSpec", "SlowSpec", "parse_faults", "parse_slowdowns"]

_FAULT_RE = re.compile(r"^\s*(\d+)\s*@\s*(\d+(?:\.\d*)?|\.\d+)\s*(?::\s*(\d+(?:\.\d*)?|\.\d+)\s*)?$")


@dataclass(frozen=True)
class FaultSpec:
    """Kill device `device` (index from 0) `at_s` seconds into the stream; restart it
    `restart_after_s` seconds later (None: it stays down).

    Text form (`--kill`): ``DEVICE@SECONDS`` or ``DEVICE@SECONDS:RESTART_AFTER``, e.g. ``1@2``
    (device 1 dies at 2 s) or ``1@2:5`` (dies at 2 s, restarted 5 s later, at 7 s).
    """

    device: int
    at_s: float
    restart_after_s: float | None = None

    @classmethod
    def parse(cls, text: str) -> "FaultSpec":
        m = _FAULT_RE.match(text)
        if not m:
            raise ValueError(
                f"--kill {text!r}: expected DEVICE@SECONDS or DEVICE@SECONDS:RESTART_AFTER "
                "(device index from 0, times in seconds), e.g. 1@2 or 1@2:5"
            )
        restart = float(m.group(3)) if m.group(3) is not None else None
        return cls(device=int(m.group(1)), at_s=float(m.group(2)), restart_after_s=restart)

    @property
    def end_s(self) -> float:
        """When the fault is over (restart time), or when it starts if there is no restart."""
        return self.at_s + (self.restart_after_s or 0.0)

    def __str__(self) -> str:
        base = f"{self.device}@{self.at_s:g}"
        return base if self.restart_after_s is None else f"{base}:{self.restart_after_s:g}"


_SLOW_RE = re.compile(r"^\s*(\d+)\s*@\s*(\d+(?:\.\d*)?|\.\d+)\s*:\s*(\d+(?:\.\d*)?|\.\d+)\s*$")


@dataclass(frozen=True)
class SlowSpec:
    """Slow device `device` down by `factor` (> 1) from `at_s` seconds into the stream on.

    Text form (`--slow`): ``DEVICE@SECONDS:FACTOR``, e.g. ``1@0:4`` (device 1, four times slower
    from the start).
    """

    device: int
    at_s: float
    factor: float

    @classmethod
    def parse(cls, text: str) -> "SlowSpec":
        m = _SLOW_RE.match(text)
        if not m or float(m.group(3)) <= 1.0:
            raise ValueError(
                f"--slow {text!r}: expected DEVICE@SECONDS:FACTOR (device index from 0, seconds into the "
                "stream, a slowdown factor above 1), e.g. 1@0:4"
            )
        return cls(device=int(m.group(1)), at_s=float(m.group(2)), factor=float(m.group(3)))

    def __str__(self) -> str:
        return f"{self.device}@{self.at_s:g}:{self.factor:g}"


def _check_devices(specs: Sequence[FaultSpec | SlowSpec], flag: str, num_devices: int) -> None:
    for f in specs:
        if not 0 <= f.device < num_devices:
            raise ValueError(f"{flag} {f}: device {f.device} does not exist; devices are 0..{num_devices - 1}")


def parse_faults(texts: Sequence[str], num_devices: int) -> list[FaultSpec]:
    """Parse `--kill` values and check each device index is in range."""
    faults = [FaultSpec.parse(t) for t in texts]
    _check_devices(faults, "--kill", num_devices)
    return faults


def parse_slowdowns(texts: Sequence[str], num_devices: int) -> list[SlowSpec]:
    """Parse `--slow` values and check each device index is in range."""
    slowdowns = [SlowSpec.parse(t) for t in texts]
    _check_devices(slowdowns, "--slow", num_devices)
    return slowdowns
