"""A TCP relay on loopback that puts the delay model between a client and one device server.

Any gRPC client works through it unchanged: it connects to the relay's port, and every chunk of
bytes crossing the relay, in either direction, arrives when the device's `LinkModel` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

from nonn.devices.links import LinkDirection, LinkModel
from nonn.runtime.aioloop import LoopThread

__all__ = ["LinkRelay"]


class LinkRelay:
    """A TCP relay on loopback that applies a LinkModel to all traffic to one upstream server.

    Runs on its own event loop thread (`LoopThread`) so it works beside any client (sync or
    async). When the upstream is down, a new connection is closed at once, so clients see
    UNAVAILABLE rather than a hang; a live connection is closed on both sides when either
    side closes it.
    """

    def __init__(self, upstream: tuple[str, int], model: LinkModel, listen_host: str = "127.0.0.1", seed: int = 0) -> None:
        self.upstream = upstream
        self.model = model
        self.listen_host = listen_host
        rng = random.Random(seed)
        self.up = LinkDirection(model, random.Random(rng.random()))  # client -> device
        self.down = LinkDirection(model, random.Random(rng.random()))  # device -> client
        self.port: int | None = None
        self.connections = 0
        self._loop_thread: LoopThread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.port}"

    def start(self) -> "LinkRelay":
        thread = LoopThread(name=f"link-relay-{self.upstream[1]}")
        try:
            self._server = thread.run(asyncio.start_server(self._handle, self.listen_host, 0), timeout=10.0)
        except BaseException:
            thread.stop()
            raise
        self._loop_thread = thread
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.close()
            return
        writers = (client_writer, server_writer)
        self._writers.update(writers)
        try:
            await asyncio.gather(
                self._pump(client_reader, server_writer, self.up),
                self._pump(server_reader, client_writer, self.down),
                return_exceptions=True,
            )
        except asyncio.CancelledError:
            pass  # the relay is stopping
        finally:
            for w in writers:
                self._writers.discard(w)
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: LinkDirection) -> None:
        """Read chunks as they come, deliver each at its scheduled arrival time, in order."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                arrival, data = item
                delay = arrival - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        last_arrival = 0.0
        try:
            while True:
                data = await reader.read(65536)
                if not data or sender.done():
                    break
                last_arrival = max(last_arrival, direction.schedule(len(data), loop.time()))
                queue.put_nowait((last_arrival, data))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait(None)
            with contextlib.suppress(BaseException):
                await sender
            # One side is gone: close the other so the peer notices (the gRPC channel reconnects).
            writer.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        """Close the listening socket and every connection, then the loop thread (idempotent)."""
        thread, self._loop_thread = self._loop_thread, None
        if thread is None:
            return
        with contextlib.suppress(Exception):
            thread.run(self._shutdown(), timeout=5.0)
        thread.stop()

    def stats(self) -> dict[str, Any]:
        return {
            "bytes_up": self.up.bytes,
            "bytes_down": self.down.bytes,
            "lost_segments": self.up.lost_segments + self.down.lost_segments,
            "connections": self.connections,
        }
