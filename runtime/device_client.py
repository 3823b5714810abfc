"""One student device as the aggregator sees it: how it is called, attempts, checked replies, health.

`DeviceClient.call` makes one device's part of a fan-out: it sends the request on the device's
stream (or as a ModelInfer call where the device does not stream), retries with backoff on
UNAVAILABLE (and on a broken stream) while the request's deadline allows, and checks the reply
(the request it answers, the output's name, datatype and shape) before its features are used.
Bytes sent and received are serialized protobuf message sizes.

Each device has a `DeviceHealth` breaker (`nonn.runtime.health`): a device that is down is not
called at all, and a background prober asks it for its grpc.health.v1 status until it serves
again. `verify` confirms that the device serves the model the bundle names (name, inputs and
outputs, and the sha256 the server reports in its model configuration).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nonn.runtime.arrays import to_array
from nonn.runtime.codec import TensorError, decode_output
from nonn.runtime.datatypes import TensorSpec
from nonn.runtime.ensemble import StudentRoute
from nonn.runtime.health import DeviceHealth
from nonn.runtime.protocol import pb, service_pb2_grpc
from nonn.runtime.retry import Backoff, CallFailed, Deadline
from nonn.runtime.servicer import SHA256_PARAMETER
from nonn.runtime.streaming import NO_STREAM, DeviceStream

__all__ = ["TRANSPORTS", "DeviceOutcome", "Verification", "DeviceClient"]

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "stream", "unary")
# Statuses that say something about the device rather than about the request.
_DEVICE_FAILURES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
     grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
)  # fmt: skip
_PROBE_TIMEOUT_S = 1.0
_PROBE_PAUSE_MAX_S = 0.5


@dataclass
class DeviceOutcome:
    """One device's part of one request: its features (None when it did not contribute) and costs.

    Filled in as the call goes, so a call cancelled half way (a hedge that lost) still tells
    what it sent. `skipped`: the device was down and not called at all.
    """

    features: np.ndarray | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    latency_s: float | None = None
    attempts: int = 0
    error: str | None = None
    skipped: bool = False


@dataclass(frozen=True)
class Verification:
    """Whether a device serves the model the bundle names: "ok", "mismatch", "unreachable" or
    "unconfirmed" (it answers, but does not report its model's sha256), with the details."""

    status: str
    message: str = ""


class DeviceClient:
    """Calls one student's device over a channel owned by the caller (the aggregator).

    `transport`: "auto" streams while the device offers ModelStreamInfer and falls back to
    ModelInfer for good when it refuses a stream; "stream" or "unary" forces one.
    """

    def __init__(self, route: StudentRoute, endpoint: str, channel: grpc.aio.Channel, *, transport: str = "auto",
                 retries: int = 2, backoff: Backoff | None = None, health: DeviceHealth | None = None,
                 verify_on_rejoin: bool = True) -> None:  # fmt: skip
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.route = route
        self.endpoint = endpoint
        self.transport = transport
        self.retries = retries
        self.backoff = backoff or Backoff(0.02)
        self.health = health or DeviceHealth(self.name)
        self.verify_on_rejoin = verify_on_rejoin
        self._channel = channel
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        self._stream = None if transport == "unary" else DeviceStream(channel, self._unmatched)
        self._prober: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self.in_flight = 0
        self.latency_s = 0.0  # moving average of this device's answer times (0: none yet)
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

    def _note_latency(self, seconds: float, at_least: bool = False) -> None:
        """Fold one answer time into the moving average; `at_least`: a call given up after
        `seconds` (the answer would have taken longer), which only ever raises the average."""
        if at_least and seconds <= self.latency_s:
            return
        self.latency_s = seconds if self.latency_s == 0.0 else 0.7 * self.latency_s + 0.3 * seconds

    def expected_wait_s(self) -> float:
        """What a new request should expect here: the usual answer time, times the calls queued."""
        return self.latency_s * (self.in_flight + 1)

    def _unmatched(self) -> None:
        self.unmatched_replies += 1
        log.debug("%s: dropped a reply for a request that is no longer waiting", self.endpoint)

    async def close(self) -> None:
        for task in (self._prober, self._watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._prober = self._watcher = None
        if self._stream is not None:
            await self._stream.close()

    # -- identity ----------------------------------------------------------------------------
    async def verify(self, timeout_s: float) -> Verification:
        """Does the device serve this student: its name, inputs, outputs and (where reported) sha256?"""
        route = self.route
        try:
            meta = await self._stub.ModelMetadata(pb.ModelMetadataRequest(name=route.name), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return Verification("unreachable", f"{self.name}: {exc.code().name}: {exc.details()}")
            return Verification("mismatch", f"{self.name}: the device does not serve {route.name!r} ({exc.code().name}: {exc.details()})")
        problems = []
        for kind, want, got in (("input", route.input, meta.inputs), ("output", route.output, meta.outputs)):
            specs = [TensorSpec.from_metadata(t) for t in got]
            if want not in specs:
                problems.append(f"{self.name}: expected {kind} {want.to_dict()}, device has {[s.to_dict() for s in specs]}")
        if problems:
            return Verification("mismatch", "; ".join(problems))
        if route.sha256 is None:
            return Verification("ok")
        try:
            config = await self._stub.ModelConfig(pb.ModelConfigRequest(name=route.name), timeout=timeout_s)
            served = config.config.parameters[SHA256_PARAMETER].string_value if SHA256_PARAMETER in config.config.parameters else ""
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return Verification("unreachable", f"{self.name}: {exc.code().name}: {exc.details()}")
            served = ""
        if not served:
            return Verification("unconfirmed", f"{self.name}: the server does not report its model's sha256, so it cannot be "
                                f"confirmed to be the bundle's {route.name} (sha256 {route.sha256})")  # fmt: skip
        if served != route.sha256:
            return Verification("mismatch", f"{self.name}: the device serves a model with sha256 {served}, the bundle's "
                                f"{route.name} has sha256 {route.sha256} (another run's model?)")  # fmt: skip
        return Verification("ok")

    # -- health ------------------------------------------------------------------------------
    def _unreachable(self) -> bool:
        """True when the channel cannot connect at all (the device is gone, not just slow)."""
        try:
            return self._channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.TRANSIENT_FAILURE
        except Exception:  # a channel implementation without get_state
            return False

    def _failed(self, reason: str) -> None:
        if self.health.failed(reason, unreachable=self._unreachable()):
            self._start_prober()

    def watch_health(self) -> None:
        """Follow the device's grpc.health.v1 status (Watch) in the background, so a device that
        goes away is taken out, and one that comes back let in, even while no request needs it."""
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch_health())

    async def _watch_health(self) -> None:
        pause, attempt = Backoff(0.05), 0
        stub = health_pb2_grpc.HealthStub(self._channel)
        while True:
            try:
                async for reply in stub.Watch(health_pb2.HealthCheckRequest(service=""), wait_for_ready=True):
                    attempt = 0
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        if self.health.down:
                            await self._rejoin()
                    elif not self.health.down:
                        self.health.mark_down(f"health: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
                        self._start_prober()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    return  # no health service there (or no room for a watch): calls and the prober tell instead
                if self.health.failed(f"{exc.code().name}: the device went away ({exc.details()})", unreachable=True):
                    self._start_prober()
            attempt += 1
            await asyncio.sleep(min(pause.pause_s(attempt), _PROBE_PAUSE_MAX_S))

    async def _rejoin(self) -> None:
        """The device serves again: if it serves the right model, let one trial request through."""
        check = await self.verify(_PROBE_TIMEOUT_S) if self.verify_on_rejoin else Verification("ok")
        if check.status != "mismatch":
            self.health.serving_again()
        elif self.health.reason != check.message:  # serving, but not this student: it stays out
            log.warning("device %s stays out: %s", self.name, check.message)
            self.health.reason = check.message

    def _start_prober(self) -> None:
        if self._prober is None or self._prober.done():
            self._prober = asyncio.ensure_future(self._probe_until_serving())

    async def _health_status(self) -> str:
        """grpc.health.v1 status of the device (ModelReady where the server has no health service)."""
        try:
            reply = await health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=_PROBE_TIMEOUT_S, wait_for_ready=True
            )
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                return exc.code().name
        try:
            ready = await self._stub.ModelReady(pb.ModelReadyRequest(name=self.route.name), timeout=_PROBE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return "SERVING" if ready.ready else "NOT_SERVING"

    async def _probe_until_serving(self) -> None:
        """While the device is down: health checks with backoff and jitter until it serves (the
        right model) again, then let one trial request through (half-open)."""
        pause = Backoff(0.05)
        await asyncio.sleep(min(0.05 * 2 ** (self.health.ejections - 1), 2.0))  # longer after repeated ejections
        attempt = 0
        while self.health.down:
            attempt += 1
            if await self._health_status() == "SERVING":
                await self._rejoin()
                if not self.health.down:
                    return
            await asyncio.sleep(min(pause.pause_s(attempt), _PROBE_PAUSE_MAX_S))

    # -- calls -------------------------------------------------------------------------------
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

    async def call(self, shape: tuple[int, ...], raw: bytes, request_id: str, deadline: Deadline,
                   outcome: DeviceOutcome | None = None, admitted: bool = False) -> DeviceOutcome:  # fmt: skip
        """This device's part of one request, within `deadline` (all attempts included).

        A device that is down is not called: the outcome says it was skipped, and why
        (`admitted`: the caller already asked the device's breaker).
        """
        outcome = outcome if outcome is not None else DeviceOutcome()
        if not admitted and not self.health.admit():
            outcome.skipped = True
            outcome.error = self.health.why_skipped()
            return outcome
        request = self.request(shape, raw, request_id)
        size = request.ByteSize()
        started = time.monotonic()
        in_flight = False
        self.in_flight += 1
        try:
            while True:
                if deadline.remaining() <= 0:
                    outcome.error = outcome.error or f"DEADLINE_EXCEEDED: no answer within {deadline.timeout_s:g} s"
                    break
                outcome.attempts += 1
                in_flight = True
                # Counted when sent, so a call that lost to another replica and ends after the
                # request was answered is in that request's figures.
                outcome.bytes_sent += size
                try:
                    reply, reply_size = await self._exchange(request, deadline)
                except CallFailed as exc:
                    in_flight = False
                    outcome.error = str(exc)
                    # UNAVAILABLE: no connection, so the request was not sent after all; any other
                    # status came from (or timed out at) a server that had the request.
                    if exc.code == grpc.StatusCode.UNAVAILABLE:
                        outcome.bytes_sent -= size
                    if exc.code in _DEVICE_FAILURES:
                        self._failed(outcome.error)
                    if exc.code == grpc.StatusCode.UNAVAILABLE and outcome.attempts <= self.retries and not self.health.down:
                        pause = min(self.backoff.pause_s(outcome.attempts), deadline.remaining())
                        if pause > 0:
                            await asyncio.sleep(pause)
                        continue
                    if self.health.down and exc.code == grpc.StatusCode.UNAVAILABLE:
                        outcome.error += " (the device is down; not retried)"
                    break
                in_flight = False
                outcome.bytes_received += reply_size
                try:
                    outcome.features = self.features(reply, request_id, shape[0])
                except TensorError as exc:
                    outcome.error = f"bad reply: {exc}"
                    self._failed(outcome.error)
                    break
                outcome.latency_s = time.monotonic() - started
                outcome.error = None
                self._note_latency(outcome.latency_s)
                self.health.succeeded()
                return outcome
        except asyncio.CancelledError:
            if in_flight:  # the device had the request
                self._note_latency(time.monotonic() - started, at_least=True)
            if not deadline.expired:
                self.health.trial_in_flight = False  # a trial that was called off proves nothing
                raise  # the caller gave up on the request (or a hedge won): pass it on
            if in_flight:  # ... and did not answer in time
                outcome.error = str(CallFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
                self._failed(outcome.error)
            else:  # between attempts (the failed attempt was counted)
                outcome.error = outcome.error or f"DEADLINE_EXCEEDED: no answer within {deadline.timeout_s:g} s"
        finally:
            self.in_flight -= 1
        return outcome
