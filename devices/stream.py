"""One simulated request stream: workers sending requests through the aggregator to a running
fleet, and the fault schedule (kills, restarts, slowdowns) played against it."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, Callable

import numpy as np

from nonn.devices.faults import FaultSpec, SlowSpec
from nonn.devices.fleet import LocalFleet

__all__ = ["RequestStream"]

log = logging.getLogger("nonn.devices.simulate")


class RequestStream:
    """The request stream: workers sending requests through the aggregator, and the fault schedule."""

    def __init__(self, bundle: Any, fleet: LocalFleet, x: np.ndarray, config: Any, on_progress: Callable[[int], None] | None) -> None:
        self.bundle = bundle
        self.fleet = fleet
        self.x = x
        self.config = config
        self.on_progress = on_progress
        n_images = x.shape[0]
        per_pass = math.ceil(n_images / config.batch_size)
        self.target = config.requests if config.requests > 0 else per_pass
        self.events: list[dict[str, Any]] = []
        self.health_events: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.start_s: list[float] = []
        self.latency_s: list[float] = []
        self.answered: list[bool] = []
        self.contributed: list[list[bool]] = []
        self.answered_by: list[list[int]] = []
        self.skipped: list[list[bool]] = []
        self.bytes_sent: list[list[int]] = []
        self.bytes_received: list[list[int]] = []
        self.image_index: list[list[int]] = []
        self.predictions: list[list[int]] = []
        self.wall_s = 0.0
        self.hedged = 0  # requests also sent to a second replica because the first was slow
        self._next = 0
        self._t0 = 0.0
        self._faults_pending = len(config.faults) + len(config.slowdowns)
        self._last_fault_event = 0.0

    def measurements(self) -> dict[str, Any]:
        """What the run measured, as the fields of a SimulationResult."""
        k, b = self.bundle.num_students, self.config.batch_size
        d = k * self.config.replicas
        return dict(
            events=self.events,
            wall_s=self.wall_s,
            request_start_s=np.asarray(self.start_s, dtype=np.float64),
            latency_s=np.asarray(self.latency_s, dtype=np.float64),
            answered=np.asarray(self.answered, dtype=bool),
            contributed=np.asarray(self.contributed, dtype=bool).reshape(-1, k),
            bytes_sent=np.asarray(self.bytes_sent, dtype=np.int64).reshape(-1, d),
            bytes_received=np.asarray(self.bytes_received, dtype=np.int64).reshape(-1, d),
            image_index=np.asarray(self.image_index, dtype=np.int64).reshape(-1, b),
            predictions=np.asarray(self.predictions, dtype=np.int64).reshape(-1, b),
            errors=self.errors,
            replicas=self.config.replicas,
            answered_by=np.asarray(self.answered_by, dtype=np.int64).reshape(-1, k),
            skipped=np.asarray(self.skipped, dtype=bool).reshape(-1, d),
            health_events=self.health_events,
            hedged=self.hedged,
        )

    def _batch_indices(self, request: int) -> np.ndarray:
        b = self.config.batch_size
        n = self.x.shape[0]
        return (np.arange(request * b, request * b + b)) % n

    def _more(self, loop: asyncio.AbstractEventLoop) -> int | None:
        """The next request number, or None when the stream is complete."""
        i = self._next
        now = loop.time() - self._t0
        done = i >= self.target and now >= self.config.min_duration_s
        if done and self.config.until_faults_end and (self.config.faults or self.config.slowdowns):
            # the faults play out (kills: and recovery)
            done = self._faults_pending == 0 and (not self.config.faults or now >= self._last_fault_event + self.config.recovery_s)
        if done:
            return None
        self._next += 1
        return i

    async def run(self) -> None:
        from nonn.runtime.aggregator import Aggregator

        loop = asyncio.get_running_loop()
        cfg = self.config
        aggregator = Aggregator(
            self.bundle,
            self.fleet.endpoints,
            deadline_s=cfg.deadline_s,
            retries=cfg.retries,
            strict=cfg.strict,
            transport=cfg.transport,
            replicas=cfg.replicas,
            hedge=cfg.hedge,
        )
        progress = StreamProgress(self.target, planned_seconds(cfg), cfg.progress)
        try:
            await aggregator.start()
            self._t0 = loop.time()
            self.fleet_offset = self.fleet.elapsed()
            fault_tasks = [asyncio.ensure_future(self._fault(self._play_kill(f))) for f in cfg.faults]
            fault_tasks += [asyncio.ensure_future(self._fault(self._play_slowdown(f))) for f in cfg.slowdowns]
            workers = [asyncio.ensure_future(self._worker(aggregator, progress)) for _ in range(cfg.concurrency)]
            await asyncio.gather(*workers)
            self.wall_s = loop.time() - self._t0
            for task in fault_tasks:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*fault_tasks, return_exceptions=True)
        finally:
            progress.close()
            index = {device.name: d for d, device in enumerate(aggregator.devices)}
            self.health_events = [{**e.to_dict(since=self._t0), "index": index.get(e.device)} for e in aggregator.health_events]
            self.hedged = sum(student.hedges for student in aggregator.students)
            await aggregator.close()

    async def _worker(self, aggregator: Any, progress: Any) -> None:
        loop = asyncio.get_running_loop()
        k = self.bundle.num_students
        d = k * self.config.replicas
        while (i := self._more(loop)) is not None:
            if self.config.rate is not None:
                due = self._t0 + i / self.config.rate
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
            idx = self._batch_indices(i)
            sent_at = loop.time()
            try:
                result = await aggregator.infer(self.x[idx])
            except Exception as exc:  # a lost request: recorded, never fatal to the run
                latency = float("nan")
                self.errors.append(f"request {i}: {type(exc).__name__}: {exc}")
                answered, contributed, preds = False, [False] * k, [-1] * len(idx)
                sent, received, by, skipped = [0] * d, [0] * d, [-1] * k, [False] * d
            else:
                latency = loop.time() - sent_at
                answered = True
                contributed = [bool(c) for c in result.contributed]
                preds = np.asarray(result.logits).argmax(axis=1).astype(int).tolist()
                sent = [int(v) for v in result.bytes_sent]
                received = [int(v) for v in result.bytes_received]
                by = [-1 if v is None else int(v) for v in result.answered_by]
                skipped = [bool(v) for v in result.skipped]
            self.start_s.append(sent_at - self._t0)
            self.latency_s.append(latency)
            self.answered.append(answered)
            self.contributed.append(contributed)
            self.answered_by.append(by)
            self.skipped.append(skipped)
            self.bytes_sent.append(sent)
            self.bytes_received.append(received)
            self.image_index.append(idx.tolist())
            self.predictions.append(preds)
            progress.request_done(loop.time() - self._t0)
            if self.on_progress is not None:
                self.on_progress(len(self.latency_s))

    def _event(self, device: int, event: str, recovery: bool = True, **extra: Any) -> None:
        """Record a fault event; with `recovery`, the stream runs `recovery_s` past it."""
        t = asyncio.get_running_loop().time() - self._t0
        if recovery:
            self._last_fault_event = max(self._last_fault_event, t)
        self.events.append({"t": round(t, 4), "device": device, "event": event, **extra})
        log.info("t=%.2f s: device %d %s", t, device, event)

    async def _fault(self, play: Any) -> None:
        try:
            await play
        finally:
            self._faults_pending -= 1

    async def _at(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, self._t0 + seconds - loop.time()))

    async def _play_slowdown(self, slow: SlowSpec) -> None:
        await self._at(slow.at_s)
        self.fleet.slow(slow.device, slow.factor)
        self._event(slow.device, "slowed", recovery=False, fault=str(slow), factor=slow.factor)

    async def _play_kill(self, fault: FaultSpec) -> None:
        loop = asyncio.get_running_loop()
        await self._at(fault.at_s)
        # Killing is quick (SIGKILL + reap); restarting waits for health off the event loop.
        self.fleet.kill(fault.device)
        self._event(fault.device, "killed", fault=str(fault))
        if fault.restart_after_s is None:
            return
        await asyncio.sleep(fault.restart_after_s)
        self.fleet.spawn(fault.device)
        self._event(fault.device, "restarted", fault=str(fault))
        deadline = loop.time() + self.config.startup_timeout_s
        while loop.time() < deadline:
            if await loop.run_in_executor(None, self.fleet.is_serving, fault.device, 0.5):
                self._event(fault.device, "serving")
                return
            await asyncio.sleep(0.05)
        self._event(fault.device, "restart-timeout")


def planned_seconds(config: Any) -> float | None:
    """How long a time-bound stream is planned to last (None: it is bound by its request count):
    `min_duration_s`, or with `until_faults_end` the last fault event's planned time plus recovery."""
    ends = [config.min_duration_s] if config.min_duration_s > 0 else []
    if config.until_faults_end:
        ends += [f.at_s + (f.restart_after_s or 0.0) + config.recovery_s for f in config.faults]
        ends += [s.at_s for s in config.slowdowns]
    return max(ends) if ends else None


class StreamProgress:
    """The stream's progress bar, always with a known total: requests when the stream is bound by
    its request count, else seconds of the planned stream time (`planned_seconds`), the requests
    sent so far shown beside it. A restart slower than planned extends the total when it happens."""

    def __init__(self, requests: int, seconds: float | None, enabled: bool) -> None:
        from tqdm import tqdm

        self.seconds = seconds
        self.requests = 0
        self.elapsed_s = 0.0
        if seconds is None:
            self.bar = tqdm(total=requests, desc="simulate", unit="req", disable=not enabled, dynamic_ncols=True, leave=False)
        else:
            self.bar = tqdm(total=round(seconds, 1), desc="simulate", unit="s",
                            bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s {postfix}", disable=not enabled,
                            dynamic_ncols=True, leave=False)  # fmt: skip

    @property
    def total(self) -> float:
        return self.bar.total

    def request_done(self, elapsed_s: float) -> None:
        self.requests += 1
        if self.seconds is None:
            self.bar.update(1)
            return
        if elapsed_s > self.bar.total:
            self.bar.total = round(elapsed_s, 1)
        self.bar.set_postfix_str(f"{self.requests} requests", refresh=False)
        self.bar.update(round(elapsed_s, 1) - self.elapsed_s)  # redrawn at tqdm's own pace
        self.elapsed_s = round(elapsed_s, 1)

    def close(self) -> None:
        self.bar.close()
