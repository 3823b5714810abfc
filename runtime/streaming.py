"""The stream transport: one long-lived ModelStreamInfer stream per device (Triton's streaming
extension, which nonn's server also offers).

A message on an open stream costs a fraction of a unary call, and for a small student that cost
is most of the latency. Many requests share the stream, so every reply must find its own
request: by the id the server echoes, or by write order on a stream whose server echoes none.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Callable

import grpc

from nonn.runtime.protocol import pb
from nonn.runtime.retry import CallFailed

__all__ = ["STREAM_METHOD", "NO_STREAM", "DeviceStream"]

STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
# Stream statuses that mean "this device will not stream": use unary ModelInfer instead.
NO_STREAM = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED)


class _OpenStream:
    """One ModelStreamInfer call and what its replies have shown about the server.

    `echoes_ids` is None until the first reply: True when the server echoes request ids (every
    reply is then matched by id), False when it leaves them empty (replies are then taken in
    the order the requests were written, which `written` keeps).
    """

    __slots__ = ("call", "written", "echoes_ids")

    def __init__(self, call: Any) -> None:
        self.call = call
        self.written: collections.deque[str] = collections.deque()
        self.echoes_ids: bool | None = None


class DeviceStream:
    """One ModelStreamInfer stream to a device, shared by every request to it.

    Opened on first use and reopened after it breaks. Replies are matched to requests by id; on
    a stream whose server echoes no ids at all (decided from its replies) they are matched by
    the order the requests were written. A reply whose request is no longer waiting (it gave up
    at its deadline) is dropped and counted through `on_unmatched`, never handed to another
    request. When a stream breaks, every request waiting on it fails with CallFailed carrying
    the stream's status.
    """

    def __init__(self, channel: grpc.aio.Channel, on_unmatched: Callable[[], None] = lambda: None) -> None:
        self._open = channel.stream_stream(
            STREAM_METHOD,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        self._on_unmatched = on_unmatched
        self._current: _OpenStream | None = None
        self._readers: set[asyncio.Task] = set()
        # Waiting requests by id, with the stream each was written to.
        self._pending: dict[str, tuple[_OpenStream, asyncio.Future]] = {}
        self._write_lock = asyncio.Lock()

    def _ensure_open(self) -> _OpenStream:
        if self._current is None:
            self._current = _OpenStream(self._open())
            reader = asyncio.ensure_future(self._read(self._current))
            self._readers.add(reader)
            reader.add_done_callback(self._readers.discard)
        return self._current

    def _forget(self, stream: _OpenStream) -> None:
        if self._current is stream:
            self._current = None

    def _match(self, stream: _OpenStream, reply: pb.ModelStreamInferResponse) -> asyncio.Future | None:
        """The waiting request `reply` answers, removed from the pending ones; None if there is none."""
        request_id = reply.infer_response.id
        if request_id:
            if stream.echoes_ids is None:
                stream.echoes_ids = True
                stream.written.clear()
        elif stream.echoes_ids:
            return None  # an id-less reply on a stream that echoes ids cannot be placed
        else:
            stream.echoes_ids = False
            if not stream.written:
                return None
            request_id = stream.written.popleft()
        entry = self._pending.get(request_id)
        if entry is None or entry[0] is not stream:
            return None
        del self._pending[request_id]
        return entry[1]

    async def _read(self, stream: _OpenStream) -> None:
        failure = CallFailed(grpc.StatusCode.UNAVAILABLE, "the device closed the stream")
        try:
            async for reply in stream.call:
                future = self._match(stream, reply)
                if future is None:
                    self._on_unmatched()
                elif not future.done():
                    future.set_result(reply)
        except grpc.aio.AioRpcError as exc:
            failure = CallFailed(exc.code(), exc.details() or "")
        except asyncio.CancelledError:
            failure = CallFailed(grpc.StatusCode.CANCELLED, "the aggregator closed the stream")
        finally:
            self._forget(stream)
            for request_id, (owner, future) in list(self._pending.items()):
                if owner is stream:
                    del self._pending[request_id]
                    if not future.done():
                        future.set_exception(failure)

    async def infer(self, request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
        """Send one request and wait for its reply (the caller bounds the wait)."""
        stream = self._ensure_open()
        future = asyncio.get_running_loop().create_future()
        entry = (stream, future)
        self._pending[request.id] = entry
        try:
            async with self._write_lock:
                if not stream.echoes_ids:  # the order of writes matters until the server shows ids
                    stream.written.append(request.id)
                try:
                    await stream.call.write(request)
                except grpc.aio.AioRpcError as exc:
                    self._forget(stream)
                    raise CallFailed(exc.code(), exc.details() or "") from None
                except asyncio.CancelledError:
                    if not stream.echoes_ids:
                        # Whether the device got this message is unknown, so is the order of the
                        # replies to come: later requests go on a new stream.
                        self._forget(stream)
                        stream.call.cancel()
                    raise
                except asyncio.InvalidStateError:  # the stream had already ended: report how
                    self._forget(stream)
                    code = await stream.call.code()
                    if code == grpc.StatusCode.OK:
                        raise CallFailed(grpc.StatusCode.UNAVAILABLE, "the device closed the stream") from None
                    raise CallFailed(code, await stream.call.details() or "") from None
            return await future
        finally:
            if self._pending.get(request.id) is entry:
                del self._pending[request.id]
            if future.done() and not future.cancelled():
                # The stream may have failed this future while the write itself failed: the
                # write's error is the one raised, and this one is consumed here rather than
                # reported later as "Future exception was never retrieved".
                future.exception()

    async def close(self) -> None:
        if self._current is not None:
            self._current.call.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self._current = None
