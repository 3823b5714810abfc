"""One student on several devices: ask the healthiest replica, hedge, fail over; one answer wins.

A request for the student goes to the replica that is healthiest, then the one with the
shortest expected wait (its usual answer time times the calls it has queued), then the next in
turn. If that replica has not answered after the student's hedge delay, the 95th percentile of
its recent answer times (the "tail at scale" hedge), the request also goes to the next replica,
when that one is expected to answer sooner than the first usually does (hedging to a replica
known to be slower only adds load); a replica that fails hands over to the next one at once. The first good answer is the
student's answer: the head never sees two answers for one student. A call that lost runs on,
its answer dropped, until the request's deadline, so that its replica's answer time is learned.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
from typing import Sequence

from nonn.runtime.device_client import DeviceClient, DeviceOutcome
from nonn.runtime.retry import Deadline

__all__ = ["LatencyWindow", "ReplicaSet"]


class LatencyWindow:
    """The last `size` answer times of a student, for its hedge delay (`quantile` of them)."""

    def __init__(self, size: int = 200, quantile: float = 0.95, min_samples: int = 20) -> None:
        self._recent: collections.deque[float] = collections.deque(maxlen=size)
        self._sorted: list[float] = []
        self.quantile = quantile
        self.min_samples = min_samples

    def add(self, seconds: float) -> None:
        if len(self._recent) == self._recent.maxlen:
            self._sorted.pop(bisect.bisect_left(self._sorted, self._recent[0]))
        self._recent.append(seconds)
        bisect.insort(self._sorted, seconds)

    def delay_s(self, fallback_s: float) -> float:
        """The hedge delay: the quantile of recent answer times, `fallback_s` until enough are known."""
        if len(self._sorted) < self.min_samples:
            return fallback_s
        return self._sorted[min(len(self._sorted) - 1, int(self.quantile * len(self._sorted)))]


class ReplicaSet:
    """The devices serving one student (`clients`), asked as one; `hedge` turns hedging on."""

    def __init__(self, clients: Sequence[DeviceClient], hedge: bool = True) -> None:
        if not clients:
            raise ValueError("a student needs at least one device")
        self.clients = list(clients)
        self.hedge = hedge
        self.latency = LatencyWindow()
        self.hedges = 0  # requests that went to a second replica because the first was slow
        self._turn = 0
        self._late: set[asyncio.Task] = set()  # calls that lost to another replica, left to finish

    def _finish_later(self, task: asyncio.Task, deadline: Deadline) -> None:
        """Let a call that lost to another replica run on until its request's deadline.

        Its answer is dropped; what it is for is the replica's answer time: a call cancelled when
        the hedge won would only teach the slow replica's estimate a lower bound, and the replica
        would keep being tried first.
        """
        stop = deadline.loop.call_at(deadline.at, task.cancel)
        self._late.add(task)

        def finished(done: asyncio.Task) -> None:
            stop.cancel()
            self._late.discard(done)
            if not done.cancelled():
                done.exception()  # retrieved: a late failure is the device's, already counted

        task.add_done_callback(finished)

    async def close(self) -> None:
        """Cancel the calls still finishing late."""
        late = list(self._late)
        for task in late:
            task.cancel()
        if late:
            await asyncio.gather(*late, return_exceptions=True)

    def _order(self) -> list[int]:
        """Replica indices: healthiest first, then the shortest expected wait (usual answer time
        times calls queued), then in turn (round robin among equals)."""
        n = len(self.clients)
        turn, self._turn = self._turn, (self._turn + 1) % n
        return sorted(range(n), key=lambda i: (self.clients[i].health.rank(), self.clients[i].expected_wait_s(), (i - turn) % n))

    async def ask(self, shape: tuple[int, ...], raw: bytes, request_id: str, deadline: Deadline) -> tuple[int | None, list[DeviceOutcome]]:
        """(index of the replica whose answer counts, or None; every replica's outcome)."""
        loop = deadline.loop
        outcomes = [DeviceOutcome() for _ in self.clients]
        order = self._order()
        running: dict[asyncio.Task, int] = {}

        def worth_hedging(primary: DeviceClient) -> bool:
            """Is there a replica left that should answer sooner than `primary` usually does?"""
            spare = next((self.clients[i] for i in order if self.clients[i].health.available()), None)
            return spare is not None and (primary.latency_s == 0.0 or spare.expected_wait_s() < primary.latency_s)

        def launch() -> bool:
            """Start the next replica that takes requests; False when none is left."""
            while order:
                i = order.pop(0)
                client = self.clients[i]
                if not client.health.admit():
                    outcomes[i].skipped = True
                    outcomes[i].error = client.health.why_skipped()
                    continue
                task = loop.create_task(client.call(shape, raw, request_id, deadline, outcomes[i], admitted=True))
                deadline.watch(task)
                running[task] = i
                return True
            return False

        launch()
        hedged = False
        winner: int | None = None
        while running:
            wait_s = None
            if self.hedge and not hedged and len(running) == 1:
                wait_s = max(0.0, self.latency.delay_s(deadline.timeout_s / 4))
            done, _ = await asyncio.wait(running, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
            if not done:  # the replica is slower than usual: ask another one too, if one is likely faster
                hedged = True
                (primary,) = (self.clients[i] for i in running.values())
                if worth_hedging(primary) and launch():
                    self.hedges += 1
                continue
            for task in done:
                i = running.pop(task)
                if not task.cancelled() and task.exception() is None and outcomes[i].features is not None:
                    winner = i
                    break
            if winner is not None:
                break
            if not running:  # every call so far failed: fail over to the next replica
                launch()
        # Only a winner leaves calls running (failures end the loop with none): they finish late,
        # unless the deadline already cancelled them, in which case their outcomes are final first.
        if deadline.expired:
            await asyncio.gather(*running, return_exceptions=True)
        else:
            for task in running:
                self._finish_later(task, deadline)
        for i, client in enumerate(self.clients):  # replicas left out because they are down
            if client.health.down and outcomes[i].attempts == 0 and not outcomes[i].skipped:
                outcomes[i].skipped = True
                outcomes[i].error = client.health.why_skipped()
        if winner is not None and outcomes[winner].latency_s is not None:
            self.latency.add(outcomes[winner].latency_s)
        return winner, outcomes
