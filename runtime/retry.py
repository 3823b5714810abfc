"""Deadlines and retries for the calls the aggregator makes to its devices."""

from __future__ import annotations

import asyncio
import random

import grpc

__all__ = ["CallFailed", "Deadline", "Backoff"]


class CallFailed(Exception):
    """One attempt at a device failed: its gRPC status (None for an error reply on a stream).

    A broken stream fails its waiting requests with the stream's status (UNAVAILABLE when the
    device closed it cleanly).
    """

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        super().__init__(f"{code.name}: {details}" if code is not None else details)
        self.code = code
        self.details = details


class Deadline:
    """One request's deadline, shared by its K device calls: a single timer on the event loop.

    When it fires it cancels the device calls still running, and marks itself expired so each
    of them reports DEADLINE_EXCEEDED rather than passing the cancellation on. One timer per
    fan-out costs less than one `asyncio.timeout` per device call, which shows in a small
    model's latency.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.at = loop.time() + timeout_s
        self.expired = False
        self._tasks: list[asyncio.Task] = []
        self._timer: asyncio.TimerHandle | None = None

    def remaining(self) -> float:
        return self.at - self.loop.time()

    def guard(self, tasks: list[asyncio.Task]) -> None:
        """Arm the timer over `tasks`."""
        self._tasks = tasks
        self._timer = self.loop.call_at(self.at, self._expire)

    def watch(self, task: asyncio.Task) -> None:
        """Also cancel `task` when the deadline passes (a call started after guard())."""
        if self.expired:
            task.cancel()
        self._tasks.append(task)

    def _expire(self) -> None:
        self.expired = True
        for task in self._tasks:
            if not task.done():
                task.cancel()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class Backoff:
    """Exponential backoff with jitter between attempts: base * 2**(attempt - 1), +-`jitter`.

    The jitter (a fraction, 0.2 as gRPC's own reconnect backoff uses) keeps the callers of a
    device that went away from retrying in lockstep when it comes back.
    """

    def __init__(self, base_s: float, jitter: float = 0.2, rng: random.Random | None = None) -> None:
        if base_s < 0:
            raise ValueError(f"backoff must be 0 s or more, got {base_s}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be a fraction in [0, 1), got {jitter}")
        self.base_s = base_s
        self.jitter = jitter
        self._rng = rng or random.Random()

    def pause_s(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (from 1)."""
        return self.base_s * 2 ** (attempt - 1) * self._rng.uniform(1 - self.jitter, 1 + self.jitter)
