"""What the aggregator knows of each device's health: a circuit breaker per device.

The ideas of gRPC's client-side health checking and Envoy's outlier detection:

* healthy -> suspect after a failed call, -> down after `failures_to_down` failures in a row, or
  at once when the failure says the device cannot be reached at all (its channel is in
  TRANSIENT_FAILURE) or a health check says it is not serving;
* while down, requests skip the device at once (its student answers degraded, or its other
  replica answers) and a prober asks it for grpc.health.v1 status in the background, with
  backoff and jitter;
* when the device reports SERVING (and, where a bundle is known, still serves the same model),
  it is half-open: one real request goes through as a trial; success closes the breaker
  (healthy), failure opens it again (down, probed again after a longer pause).

Each change of state is logged once (a WARNING when a device is lost and when it is back) and
recorded in `events` with its time, for reports.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from typing import Callable

from nonn.runtime.checks import at_least

__all__ = ["DeviceState", "HealthEvent", "DeviceHealth"]

log = logging.getLogger("nonn.runtime.health")


class DeviceState(enum.Enum):
    HEALTHY = "healthy"
    SUSPECT = "suspect"
    DOWN = "down"
    HALF_OPEN = "half-open"


@dataclass(frozen=True)
class HealthEvent:
    """One change of a device's state: monotonic time, device, new state, why."""

    t: float
    device: str
    state: str
    reason: str

    def to_dict(self, since: float = 0.0) -> dict[str, object]:
        return {"t": round(self.t - since, 4), "device": self.device, "state": self.state, "reason": self.reason}


class DeviceHealth:
    """The breaker of one device (`name`, e.g. "student_1 at 10.0.0.2:8001"); event-loop confined."""

    def __init__(self, name: str, failures_to_down: int = 3, clock: Callable[[], float] = time.monotonic,
                 on_event: Callable[[HealthEvent], None] | None = None) -> None:  # fmt: skip
        at_least(1, failures_to_down=failures_to_down)
        self.name = name
        self.failures_to_down = failures_to_down
        self._clock = clock
        self._on_event = on_event
        self.state = DeviceState.HEALTHY
        self.since = self.down_since = clock()
        self.reason = ""
        self.failures = 0  # consecutive failed calls
        self.ejections = 0  # times in a row the device went down without a successful call between
        self.trial_in_flight = False
        self.skipped = 0  # requests that did not go to the device because it was down

    def _change(self, state: DeviceState, reason: str) -> None:
        self.state, self.since, self.reason = state, self._clock(), reason
        if self._on_event is not None:
            self._on_event(HealthEvent(self.since, self.name, state.value, reason))

    @property
    def down(self) -> bool:
        return self.state is DeviceState.DOWN

    def rank(self) -> int:
        """Lower is healthier: the order in which replicas of one student are tried."""
        return {DeviceState.HEALTHY: 0, DeviceState.SUSPECT: 1, DeviceState.HALF_OPEN: 2, DeviceState.DOWN: 3}[self.state]

    def available(self) -> bool:
        """Would a request be let through now (without taking the half-open trial)?"""
        return self.state in (DeviceState.HEALTHY, DeviceState.SUSPECT) or (
            self.state is DeviceState.HALF_OPEN and not self.trial_in_flight
        )

    def admit(self) -> bool:
        """May a request go to the device now? In half-open, only the one trial request may."""
        if self.state in (DeviceState.HEALTHY, DeviceState.SUSPECT):
            return True
        if self.state is DeviceState.HALF_OPEN and not self.trial_in_flight:
            self.trial_in_flight = True
            return True
        self.skipped += 1
        return False

    def why_skipped(self) -> str:
        waited = self._clock() - self.since
        what = "down" if self.state is DeviceState.DOWN else "rejoining (one trial request at a time)"
        return f"skipped: the device is {what} since {waited:.1f} s ago ({self.reason})"

    def succeeded(self) -> None:
        was = self.state
        self.failures = 0
        self.trial_in_flight = False
        if was is not DeviceState.HEALTHY:
            if was in (DeviceState.HALF_OPEN, DeviceState.DOWN):
                self.ejections = 0
                log.warning("device %s is back after %.1f s: it reports SERVING and answered a request",
                            self.name, self._clock() - self.down_since)  # fmt: skip
            self._change(DeviceState.HEALTHY, "answered")

    def failed(self, reason: str, unreachable: bool = False) -> bool:
        """Record a failed call; True when this failure took the device down."""
        self.failures += 1
        trial = self.state is DeviceState.HALF_OPEN
        self.trial_in_flight = False
        if self.state is DeviceState.DOWN:
            return False
        if unreachable or trial or self.failures >= self.failures_to_down:
            self.ejections += 1
            why = f"{reason}" if not trial else f"its trial request failed: {reason}"
            log.warning("device %s lost: %s; requests skip it until it answers a health check", self.name, why)
            self._change(DeviceState.DOWN, why)
            self.down_since = self.since
            return True
        if self.state is DeviceState.HEALTHY:
            self._change(DeviceState.SUSPECT, reason)
        return False

    def serving_again(self) -> None:
        """The prober saw the device SERVING (with the right model): let one trial request through."""
        if self.state is DeviceState.DOWN:
            self.trial_in_flight = False
            self._change(DeviceState.HALF_OPEN, "health check: SERVING")

    def mark_down(self, reason: str) -> None:
        """Take the device out at once (e.g. it serves another model than the bundle names)."""
        if self.state is not DeviceState.DOWN:
            self.ejections += 1
            log.warning("device %s lost: %s; requests skip it until it answers a health check", self.name, reason)
            self._change(DeviceState.DOWN, reason)
            self.down_since = self.since
