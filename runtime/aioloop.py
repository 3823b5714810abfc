"""An asyncio event loop on a daemon thread, for driving async servers and clients from sync code.

grpc.aio channels and servers belong to the loop they were created on; LoopThread keeps one
loop alive so a synchronous caller (tests, benchmarks, `Aggregator.infer_sync`) can submit
coroutines to it from any thread.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine, TypeVar

__all__ = ["LoopThread"]

T = TypeVar("T")


class LoopThread:
    """Run an event loop on a background thread; `run(coro)` blocks until the coroutine is done."""

    def __init__(self, name: str = "nonn-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if not self.loop.is_running() and self.loop.is_closed():
            raise RuntimeError("the background event loop is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """Stop the loop and join the thread (idempotent)."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
