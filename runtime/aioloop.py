"""An asyncio event loop on a daemon thread, for driving async servers and clients from sync code.

grpc.aio channels and servers belong to the loop they were created on; LoopThread keeps one
loop alive so a synchronous caller (tests, benchmarks, `Aggregator.infer_sync`) can submit
coroutines to it from any thread; BlockingFacade gives an async object blocking methods that way.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine, TypeVar

__all__ = ["LoopThread", "BlockingFacade"]

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


class BlockingFacade:
    """Blocking use of an object whose coroutines belong to one event loop: a private LoopThread.

    The object provides async `start()` and `close()`; `blocking(coro)` runs a coroutine on the
    object's own loop thread, started on first use, and `with obj:` starts and closes it. An
    object already started on a caller's event loop refuses blocking use (its channels belong
    to that loop).
    """

    _loop_thread: LoopThread | None = None
    _thread_name = "nonn-loop"

    def _loop_in_use(self) -> bool:
        """True when the object already runs on an event loop of the caller's (override)."""
        return False

    def blocking(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop_thread is None:
            if self._loop_in_use():
                coro.close()
                raise RuntimeError(f"this {type(self).__name__} is already in use on an event loop; await it there")
            self._loop_thread = LoopThread(name=self._thread_name)
        return self._loop_thread.run(coro)

    def close_sync(self) -> None:
        if self._loop_thread is not None:
            self._loop_thread.run(self.close())  # type: ignore[attr-defined]
            self._loop_thread.stop()
            self._loop_thread = None

    def __enter__(self):
        self.blocking(self.start())  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_sync()
