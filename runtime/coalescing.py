"""Coalescing: requests that queue up under load go to the devices together, as one batch.

While `pipeline` fan-outs are in flight, new requests wait in a queue; when one finishes, the
queued requests (up to `limit` images in all) go out as one batch, and each caller gets its
own rows of the shared answer. Fewer, larger device calls under load; no added wait when idle.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Awaitable, Callable, Generic, Protocol, TypeVar

import numpy as np

from nonn.runtime.checks import at_least

__all__ = ["Coalescer", "Rows"]


class Rows(Protocol):
    """A result that can be cut into the rows of each request that shared it."""

    def rows(self, start: int, stop: int, latency_s: float) -> "Rows": ...


R = TypeVar("R", bound=Rows)


class Coalescer(Generic[R]):
    """Queue requests behind `pipeline` runs of `run`, merging queued ones up to `limit` rows."""

    def __init__(self, run: Callable[[np.ndarray], Awaitable[R]], limit: int, pipeline: int) -> None:
        at_least(1, coalesce=limit, pipeline=pipeline)
        self._run = run
        self.limit = limit
        self.pipeline = pipeline
        self._queue: collections.deque[tuple[np.ndarray, asyncio.Future, float]] = collections.deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, batch: np.ndarray) -> R:
        """`batch`'s rows of the answer to the (possibly shared) run that carries it."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append((batch, future, time.perf_counter()))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        """Start runs for queued requests while fewer than `pipeline` are in flight."""
        while self._queue and self._in_flight < self.pipeline:
            taken = [self._queue.popleft()]
            images = len(taken[0][0])
            while self._queue and images + len(self._queue[0][0]) <= self.limit:
                item = self._queue.popleft()
                taken.append(item)
                images += len(item[0])
            self._in_flight += 1
            task = asyncio.ensure_future(self._run_shared(taken))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_shared(self, taken: list[tuple[np.ndarray, asyncio.Future, float]]) -> None:
        try:
            batch = taken[0][0] if len(taken) == 1 else np.concatenate([item[0] for item in taken])
            try:
                shared = await self._run(batch)
            except Exception as exc:  # every caller of this run gets the failure
                for _, future, _ in taken:
                    if not future.done():
                        future.set_exception(exc)
                return
            offset, now = 0, time.perf_counter()
            for images, future, queued_at in taken:
                n = len(images)
                if not future.done():
                    future.set_result(shared.rows(offset, offset + n, now - queued_at))
                offset += n
        finally:
            self._in_flight -= 1
            self._dispatch()

    def close(self) -> None:
        """Fail every request still queued (the runs in flight finish)."""
        while self._queue:
            _, future, _ = self._queue.popleft()
            if not future.done():
                future.set_exception(RuntimeError("the aggregator was closed before this request was sent"))
