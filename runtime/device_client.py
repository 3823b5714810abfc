"""One student device as the aggregator sees it: how it is called, attempts, checked replies.

`DeviceClient.call` makes one device's part of a fan-out: it sends the request on the device's
stream (or as a ModelInfer call where the device does not stream), retries with backoff on
UNAVAILABLE (and on a broken stream) while the request's deadline allows, and checks the reply
(the request it answers, the output's name, datatype and shape) before its features are used.
Bytes sent and received are serialized protobuf message sizes.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
import grpc
import numpy as np

from nonn.runtime.arrays import to_array
from nonn.runtime.codec import TensorError, decode_output
from nonn.runtime.datatypes import TensorSpec
from nonn.runtime.ensemble import StudentRoute
from nonn.runtime.protocol import pb, service_pb2_grpc
from nonn.runtime.retry import Backoff, CallFailed, Deadline
from nonn.runtime.streaming import NO_STREAM, DeviceStream

__all__ = ["TRANSPORTS", "DeviceOutcome", "DeviceClient"]

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "stream", "unary")


@dataclass
class DeviceOutcome:
    """One device's part of one request: its features (None when it did not contribute) and costs."""

    features: np.ndarray | None
    bytes_sent: int
    bytes_received: int
    latency_s: float | None
    attempts: int
    error: str | None


class DeviceClient:
    """Calls one student's device over a channel owned by the caller (the aggregator).

    `transport`: "auto" streams while the device offers ModelStreamInfer and falls back to
    ModelInfer for good when it refuses a stream; "stream" or "unary" forces one.
    """

    def __init__(self, route: StudentRoute, endpoint: str, channel: grpc.aio.Channel, *, transport: str = "auto",
                 retries: int = 2, backoff: Backoff | None = None) -> None:  # fmt: skip
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.route = route
        self.endpoint = endpoint
        self.transport = transport
        self.retries = retries
        self.backoff = backoff or Backoff(0.02)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        self._stream = None if transport == "unary" else DeviceStream(channel, self._unmatched)
        # Stream replies dropped because their request was no longer waiting (it had reached its
        # deadline) or could not be identified.
        self.unmatched_replies = 0

    @property
    def name(self) -> str:
        return f"{self.route.name} at {self.endpoint}"

    @property
    def streams(self) -> bool:
        """True while requests go on a ModelStreamInfer stream, False once they go as ModelInfer calls."""
        return self._stream is not None

    def _unmatched(self) -> None:
        self.unmatched_replies += 1
        log.debug("%s: dropped a reply for a request that is no longer waiting", self.endpoint)

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close()

    async def metadata_problems(self, timeout_s: float) -> list[str]:
        """Ask the device for its model's metadata; every mismatch with the route, as text."""
        route = self.route
        try:
            meta = await self._stub.ModelMetadata(pb.ModelMetadataRequest(name=route.name), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            return [f"{self.name}: {exc.code().name}: {exc.details()}"]
        problems = []
        for kind, want, got in (("input", route.input, meta.inputs), ("output", route.output, meta.outputs)):
            specs = [TensorSpec.from_metadata(t) for t in got]
            if want not in specs:
                problems.append(f"{self.name}: expected {kind} {want.to_dict()}, device has {[s.to_dict() for s in specs]}")
        return problems

    def features(self, reply: pb.ModelInferResponse, request_id: str, batch_size: int) -> np.ndarray:
        """The reply's feature tensor, checked against the request and the route (TensorError when wrong)."""
        route = self.route
        if reply.id and reply.id != request_id:
            raise TensorError(f"the reply is for request {reply.id!r}, not {request_id!r}")
        for index, tensor in enumerate(reply.outputs):
            if tensor.name == route.output.name:
                break
        else:
            raise TensorError(f"reply has no output {route.output.name!r} (outputs: {[t.name for t in reply.outputs]})")
        if tensor.datatype != route.output.datatype:
            raise TensorError(f"output {tensor.name!r} has datatype {tensor.datatype}, expected {route.output.datatype}")
        expected = [batch_size, route.feature_size]
        if list(tensor.shape) != expected:
            raise TensorError(f"output {tensor.name!r} has shape {list(tensor.shape)}, expected {expected}")
        raws = reply.raw_output_contents
        return to_array(decode_output(tensor, raws[index] if index < len(raws) else None))

    async def _unary(self, request: pb.ModelInferRequest, timeout: float) -> tuple[pb.ModelInferResponse, int]:
        try:
            reply = await self._stub.ModelInfer(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise CallFailed(exc.code(), exc.details() or "") from None
        return reply, reply.ByteSize()

    async def _exchange(self, request: pb.ModelInferRequest, deadline: Deadline) -> tuple[pb.ModelInferResponse, int]:
        """One attempt: (reply, reply bytes), or CallFailed with the gRPC status.

        A stream attempt is bounded by the request's shared deadline (which cancels it); a
        unary call carries the time left as its gRPC deadline.
        """
        stream = self._stream
        if stream is None:
            return await self._unary(request, deadline.remaining())
        try:
            wrapped = await stream.infer(request)
        except CallFailed as exc:  # the stream broke
            if self.transport == "auto" and exc.code in NO_STREAM:
                log.info("%s does not stream (%s); calling it with ModelInfer", self.endpoint, exc)
                self._stream = None
                return await self._unary(request, max(deadline.remaining(), 1e-3))
            if self.transport == "auto" and exc.code == grpc.StatusCode.INTERNAL:
                # gRPC reports a stream refused while a write was under way as INTERNAL (and then
                # the real status is lost): this attempt goes unary, the next one streams again.
                return await self._unary(request, max(deadline.remaining(), 1e-3))
            if exc.code == grpc.StatusCode.CANCELLED:
                # A stream cancelled under us (the device is restarting) is as retryable as no connection.
                raise CallFailed(grpc.StatusCode.UNAVAILABLE, exc.details) from None
            raise
        if wrapped.error_message:
            raise CallFailed(None, wrapped.error_message)
        return wrapped.infer_response, wrapped.ByteSize()

    def request(self, shape: tuple[int, ...], raw: bytes, request_id: str) -> pb.ModelInferRequest:
        """The ModelInferRequest carrying `raw` (the students' input of `shape`) to this student."""
        route = self.route
        request = pb.ModelInferRequest(model_name=route.name, id=request_id)
        request.inputs.add(name=route.input.name, datatype=route.input.datatype, shape=shape)
        request.outputs.add(name=route.output.name)
        request.raw_input_contents.append(raw)
        return request

    async def call(self, shape: tuple[int, ...], raw: bytes, request_id: str, deadline: Deadline) -> DeviceOutcome:
        """This device's part of one request, within `deadline` (all attempts included)."""
        request = self.request(shape, raw, request_id)
        size = request.ByteSize()
        loop = deadline.loop
        started = loop.time()
        sent = received = attempts = 0
        error: str | None = None
        in_flight = False
        try:
            while True:
                if deadline.remaining() <= 0:
                    error = error or f"DEADLINE_EXCEEDED: no answer within {deadline.timeout_s:g} s"
                    break
                attempts += 1
                in_flight = True
                try:
                    reply, reply_size = await self._exchange(request, deadline)
                except CallFailed as exc:
                    in_flight = False
                    error = str(exc)
                    # UNAVAILABLE: no connection, so the request is not counted as sent; any other
                    # status came from (or timed out at) a server that had the request.
                    if exc.code != grpc.StatusCode.UNAVAILABLE:
                        sent += size
                    if exc.code == grpc.StatusCode.UNAVAILABLE and attempts <= self.retries:
                        pause = min(self.backoff.pause_s(attempts), deadline.remaining())
                        if pause > 0:
                            await asyncio.sleep(pause)
                        continue
                    break
                in_flight = False
                sent += size
                received += reply_size
                try:
                    features = self.features(reply, request_id, shape[0])
                except TensorError as exc:
                    error = f"bad reply: {exc}"
                    break
                return DeviceOutcome(features, sent, received, loop.time() - started, attempts, None)
        except asyncio.CancelledError:
            if not deadline.expired:
                raise  # the caller gave up on the request: pass it on
            if in_flight:  # the device had the request and did not answer in time
                sent += size
                error = str(CallFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
            else:  # between attempts
                error = error or f"DEADLINE_EXCEEDED: no answer within {deadline.timeout_s:g} s"
        return DeviceOutcome(None, sent, received, None, attempts, error)

