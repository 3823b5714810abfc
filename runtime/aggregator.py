"""The aggregator: fan one request out to the K student devices, concatenate, apply the head.

Each request goes to every device concurrently over asyncio gRPC (`grpc.aio`). By default it
travels on one long-lived ModelStreamInfer stream per device (Triton's streaming extension, which
nonn's server also offers): a message on an open stream costs a fraction of a unary call, and
for a small student that cost is most of the latency. A device that does not offer the stream
(UNIMPLEMENTED, or too many streams open) is called with plain Open Inference Protocol
ModelInfer instead, so any compliant server (nonn's own, Triton) can host a student. Per device:
a deadline for the whole exchange, retries with backoff on UNAVAILABLE (and on a broken stream),
and a check of the reply's name, datatype and shape. The pooled feature vectors are concatenated in
group order (student 0 first) and the head runs locally in ONNX Runtime.

Degraded mode (the default): a device that is down, too slow or answers badly contributes zeros,
which is what student-dropout training prepares the head for, and the result says which devices
contributed. Strict mode raises AggregationError instead. Bytes sent and received are counted
per device per request as serialized protobuf message sizes.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import grpc
import numpy as np

from nonn.runtime.aioloop import LoopThread
from nonn.runtime.arrays import numpy_dtype, to_array
from nonn.runtime.codec import RawTensor, TensorError, TensorSpec, bytes_per_item, check_shape, decode_output
from nonn.runtime.onnx_model import OnnxModel
from nonn.runtime.protocol import pb, service_pb2_grpc
from nonn.runtime.server import DEFAULT_MAX_BATCH, BackendUnavailable, InferOutput, ModelBackend
from nonn.runtime.tls import ClientTLS

__all__ = [
    "AggregationError",
    "StudentRoute",
    "EnsembleSpec",
    "AggregateResult",
    "Aggregator",
    "AggregatorBackend",
    "parse_endpoints",
    "preprocess_images",
]

log = logging.getLogger(__name__)

_MESSAGE_SLACK = 1 << 20
_FALLBACK_MESSAGE_BYTES = 64 << 20  # when the input has dynamic non-batch dimensions


class AggregationError(RuntimeError):
    """Too few devices answered (any missing one in strict mode); names each device's problem."""


@dataclass(frozen=True)
class StudentRoute:
    """What the aggregator needs to call one student: its model name and tensor specs."""

    name: str
    input: TensorSpec
    output: TensorSpec

    @property
    def feature_size(self) -> int:
        return self.output.shape[-1]


@dataclass(frozen=True)
class EnsembleSpec:
    """The students (in group order) and the head model: everything taken from a bundle."""

    students: tuple[StudentRoute, ...]
    head_path: Path
    head_sha256: str | None = None
    class_names: tuple[str, ...] = ()

    @classmethod
    def from_bundle(cls, bundle: Any) -> "EnsembleSpec":
        """From a nonn.runtime.bundle.Bundle (or a path to one)."""
        if isinstance(bundle, (str, os.PathLike)):
            from nonn.runtime.bundle import Bundle

            bundle = Bundle.load(bundle)
        routes = tuple(
            StudentRoute(
                name=s.name,
                input=TensorSpec(s.input.name, s.input.datatype, tuple(s.input.shape)),
                output=TensorSpec(s.output.name, s.output.datatype, tuple(s.output.shape)),
            )
            for s in bundle.students
        )
        return cls(routes, Path(bundle.path_of(bundle.head)), bundle.head.sha256, tuple(bundle.class_names))


def parse_endpoints(endpoints: str | Sequence[str] | Mapping[str, str], names: Sequence[str]) -> list[str]:
    """One "host:port" per student, in student order, from a comma list, a list or {name: endpoint}."""
    if isinstance(endpoints, str):
        endpoints = [e.strip() for e in endpoints.split(",") if e.strip()]
    if isinstance(endpoints, Mapping):
        missing = [n for n in names if n not in endpoints]
        if missing:
            raise ValueError(f"no endpoint for student(s) {missing}; got endpoints for {sorted(endpoints)}")
        endpoints = [endpoints[n] for n in names]
    endpoints = list(endpoints)
    if len(endpoints) != len(names):
        raise ValueError(
            f"{len(endpoints)} device endpoint(s) for {len(names)} students ({', '.join(names)}); "
            "give one host:port per student, in student order"
        )
    for endpoint in endpoints:
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"device endpoint {endpoint!r} is not host:port (e.g. 192.168.1.20:8001)")
    return endpoints


def preprocess_images(images: np.ndarray, mean: Sequence[float], std: Sequence[float], input_shape: Sequence[int], pixel_scale: float = 1 / 255) -> np.ndarray:
    """Images -> the students' input: float32 NCHW, (x - mean) / std per channel.

    Accepts (N, C, H, W), (N, H, W, C), or (N, H, W) for one channel; uint8 pixels are scaled by
    `pixel_scale` first, float images are taken to be in [0, 1] already.
    """
    c, h, w = (int(d) for d in input_shape)
    x = np.asarray(images)
    if x.ndim == 3 and c == 1 and x.shape[1:] == (h, w):
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1:] != (c, h, w) and x.shape[1:] == (h, w, c):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1:] != (c, h, w):
        raise ValueError(f"images have shape {list(x.shape)}; expected (N, {c}, {h}, {w}), (N, {h}, {w}, {c})" + (f" or (N, {h}, {w})" if c == 1 else ""))
    if x.dtype == np.uint8:
        x = x.astype(np.float32) * np.float32(pixel_scale)
    elif x.dtype.kind != "f":
        raise ValueError(f"images have dtype {x.dtype}; expected uint8 pixels or floats in [0, 1]")
    mean_a = np.asarray(mean, dtype=np.float32).reshape(1, c, 1, 1)
    std_a = np.asarray(std, dtype=np.float32).reshape(1, c, 1, 1)
    return np.ascontiguousarray((x.astype(np.float32) - mean_a) / std_a)


@dataclass
class AggregateResult:
    """One aggregated answer: logits plus, per device, whether it contributed and what it cost.

    bytes_sent / bytes_received are serialized protobuf sizes of the ModelInfer request and reply
    for each device, summed over attempts; an attempt that found no connection (UNAVAILABLE)
    sent nothing and is not counted.
    """

    logits: np.ndarray
    contributed: list[bool]
    bytes_sent: list[int]
    bytes_received: list[int]
    latency_s: float
    device_latency_s: list[float | None]
    attempts: list[int]
    errors: list[str | None]
    devices: list[str] = field(default_factory=list)

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @property
    def degraded(self) -> bool:
        return not all(self.contributed)

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "predictions": self.predictions.tolist(),
            "logits": self.logits.tolist(),
            "degraded": self.degraded,
            "latency_ms": self.latency_s * 1e3,
            "devices": [
                {
                    "endpoint": endpoint,
                    "contributed": ok,
                    "bytes_sent": sent,
                    "bytes_received": received,
                    "latency_ms": None if lat is None else lat * 1e3,
                    "attempts": attempts,
                    "error": error,
                }
                for endpoint, ok, sent, received, lat, attempts, error in zip(
                    self.devices, self.contributed, self.bytes_sent, self.bytes_received,
                    self.device_latency_s, self.attempts, self.errors,
                )
            ],
        }  # fmt: skip
        if class_names:
            out["labels"] = [class_names[i] for i in out["predictions"]]
        return out


@dataclass
class _DeviceOutcome:
    features: np.ndarray | None
    bytes_sent: int
    bytes_received: int
    latency_s: float | None
    attempts: int
    error: str | None


class _Deadline:
    """One request's deadline, shared by its K device calls: a single timer on the event loop.

    When it fires it cancels the device calls still running, and marks itself expired so each
    of them reports DEADLINE_EXCEEDED rather than passing the cancellation on. One timer per
    fan-out costs less than one `asyncio.timeout` per device call, which shows in a small
    model's latency.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.loop = loop
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

    def _expire(self) -> None:
        self.expired = True
        for task in self._tasks:
            if not task.done():
                task.cancel()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


TRANSPORTS = ("auto", "stream", "unary")
_STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
# Stream statuses that mean "this device will not stream": use unary ModelInfer instead.
_NO_STREAM = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED)


class _CallFailed(Exception):
    """One attempt at a device failed: its gRPC status (None for an error reply on a stream).

    A broken stream fails its waiting requests with the stream's status (UNAVAILABLE when the
    device closed it cleanly).
    """

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        super().__init__(f"{code.name}: {details}" if code is not None else details)
        self.code = code
        self.details = details


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


class _DeviceStream:
    """One ModelStreamInfer stream to a device, shared by every request to it.

    Opened on first use and reopened after it breaks. Replies are matched to requests by id; on
    a stream whose server echoes no ids at all (decided from its replies) they are matched by
    the order the requests were written. A reply whose request is no longer waiting (it gave up
    at its deadline) is dropped and counted through `on_unmatched`, never handed to another
    request. When a stream breaks, every request waiting on it fails with _CallFailed carrying
    the stream's status.
    """

    def __init__(self, channel: grpc.aio.Channel, on_unmatched: Callable[[], None] = lambda: None) -> None:
        self._open = channel.stream_stream(
            _STREAM_METHOD,
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
        failure = _CallFailed(grpc.StatusCode.UNAVAILABLE, "the device closed the stream")
        try:
            async for reply in stream.call:
                future = self._match(stream, reply)
                if future is None:
                    self._on_unmatched()
                elif not future.done():
                    future.set_result(reply)
        except grpc.aio.AioRpcError as exc:
            failure = _CallFailed(exc.code(), exc.details() or "")
        except asyncio.CancelledError:
            failure = _CallFailed(grpc.StatusCode.CANCELLED, "the aggregator closed the stream")
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
                    raise _CallFailed(exc.code(), exc.details() or "") from None
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
                        raise _CallFailed(grpc.StatusCode.UNAVAILABLE, "the device closed the stream") from None
                    raise _CallFailed(code, await stream.call.details() or "") from None
            return await future
        finally:
            if self._pending.get(request.id) is entry:
                del self._pending[request.id]

    async def close(self) -> None:
        if self._current is not None:
            self._current.call.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self._current = None


class Aggregator:
    """Serve the ensemble by fanning requests out to K devices and applying the head locally.

    `bundle`: a Bundle, a bundle directory, or an EnsembleSpec. `endpoints`: one "host:port"
    per student in student order (list or comma string) or {student name: endpoint}.
    `deadline_s` bounds each device's exchange (all retries included), `retries` is the number of
    extra attempts after UNAVAILABLE. `strict` turns a missing device into AggregationError;
    otherwise fewer than `min_contributing` devices is the only failure. `coalesce` > 1 merges
    requests that queue up behind `pipeline` in-flight fan-outs into one call per device (up to
    `coalesce` images): fewer, larger calls under load, no added wait when idle. `transport`:
    "auto" streams to each device that offers ModelStreamInfer and calls the others with
    ModelInfer; "stream" or "unary" forces one (a device that cannot stream is then missing).

    Async use: ``async with Aggregator(...) as agg: result = await agg.infer(batch)``.
    Sync use: ``with Aggregator(...) as agg: result = agg.infer_sync(batch)`` (a private event
    loop thread carries the gRPC channels).
    """

    def __init__(
        self,
        bundle: Any,
        endpoints: str | Sequence[str] | Mapping[str, str],
        deadline_s: float = 1.0,
        retries: int = 2,
        strict: bool = False,
        tls: ClientTLS | None = None,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        head_threads: int = 1,
        backoff_s: float = 0.02,
        min_contributing: int = 1,
        coalesce: int = 1,
        pipeline: int = 2,
        transport: str = "auto",
    ) -> None:
        self.spec = bundle if isinstance(bundle, EnsembleSpec) else EnsembleSpec.from_bundle(bundle)
        if not self.spec.students:
            raise ValueError("the ensemble has no students")
        self.routes = list(self.spec.students)
        self.endpoints = parse_endpoints(endpoints, [r.name for r in self.routes])
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be positive, got {deadline_s}")
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, got {retries}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if not 0 <= min_contributing <= len(self.routes):
            raise ValueError(f"min_contributing must be in 0..{len(self.routes)}, got {min_contributing}")
        self.deadline_s = float(deadline_s)
        self.retries = int(retries)
        self.strict = bool(strict)
        self.tls = tls
        self.max_batch = int(max_batch)
        self.backoff_s = float(backoff_s)
        self.min_contributing = int(min_contributing)
        if not 1 <= coalesce <= max_batch:
            raise ValueError(f"coalesce must be in 1..max_batch ({max_batch}), got {coalesce}")
        if pipeline < 1:
            raise ValueError(f"pipeline must be at least 1, got {pipeline}")
        self.coalesce = int(coalesce)
        self.pipeline = int(pipeline)
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.transport = transport
        self._queue: collections.deque[tuple[np.ndarray, asyncio.Future, float]] = collections.deque()
        self._in_flight = 0

        first = self.routes[0].input
        for route in self.routes[1:]:
            if route.input.shape != first.shape or route.input.datatype != first.datatype:
                raise ValueError(
                    f"students disagree on the input: {self.routes[0].name} takes {first}, {route.name} takes {route.input}"
                )
        for route in self.routes:
            if len(route.output.shape) != 2 or route.output.shape[1] < 1:
                raise ValueError(
                    f"student {route.name}: output shape {list(route.output.shape)} is not (batch, fixed number of features)"
                )
        self.input_spec = first
        self.head = OnnxModel(self.spec.head_path, threads=head_threads, expected_sha256=self.spec.head_sha256)
        if len(self.head.inputs) != 1 or len(self.head.outputs) != 1:
            raise ValueError(f"{self.spec.head_path}: the head must have one input and one output")
        self.head_input = self.head.inputs[0]
        self.head_output = self.head.outputs[0]
        total = sum(route.feature_size for route in self.routes)
        if self.head_input.shape[-1] not in (-1, total):
            raise ValueError(
                f"{self.spec.head_path}: head takes {self.head_input.shape[-1]} features, "
                f"but the students produce {total} in all"
            )
        self.feature_total = total
        self.class_names = list(self.spec.class_names)

        item = bytes_per_item(first)
        self.max_message_bytes = item * self.max_batch + _MESSAGE_SLACK if item else _FALLBACK_MESSAGE_BYTES
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._calls: list[Any] = []
        self._streams: list[_DeviceStream | None] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: LoopThread | None = None
        self._ids = itertools.count()
        # Per device: stream replies dropped because their request was no longer waiting (it
        # had reached its deadline) or could not be identified.
        self.unmatched_replies = [0] * len(self.routes)

    # -- connection life cycle ---------------------------------------------------------------
    def _channel(self, target: str) -> grpc.aio.Channel:
        options = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # Notice a restarted device quickly instead of waiting out gRPC's default backoff.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.enable_retries", 0),
        ]
        if self.tls is not None:
            return grpc.aio.secure_channel(target, self.tls.credentials(), options + self.tls.channel_options())
        return grpc.aio.insecure_channel(target, options)

    async def start(self) -> None:
        """Open one channel per distinct endpoint on the running loop (idempotent)."""
        loop = asyncio.get_running_loop()
        if self._loop is not None:
            if self._loop is not loop:
                raise RuntimeError("this Aggregator's channels belong to another event loop")
            return
        self._loop = loop
        for endpoint in dict.fromkeys(self.endpoints):
            self._channels[endpoint] = self._channel(endpoint)
        self._calls = [
            service_pb2_grpc.GRPCInferenceServiceStub(self._channels[endpoint]).ModelInfer for endpoint in self.endpoints
        ]
        self._streams = [
            None if self.transport == "unary" else _DeviceStream(self._channels[endpoint], functools.partial(self._unmatched, k))
            for k, endpoint in enumerate(self.endpoints)
        ]

    def _unmatched(self, k: int) -> None:
        self.unmatched_replies[k] += 1
        log.debug("%s: dropped a reply for a request that is no longer waiting", self.endpoints[k])

    async def close(self) -> None:
        while self._queue:
            _, future, _ = self._queue.popleft()
            if not future.done():
                future.set_exception(RuntimeError("the aggregator was closed before this request was sent"))
        for stream in self._streams:
            if stream is not None:
                await stream.close()
        self._streams = []
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._calls = []
        self._loop = None

    async def __aenter__(self) -> "Aggregator":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def transports(self) -> list[str]:
        """How each device is called: "stream" (ModelStreamInfer) or "unary" (ModelInfer)."""
        if not self._streams:
            return ["unary" if self.transport == "unary" else "stream"] * len(self.endpoints)
        return ["unary" if stream is None else "stream" for stream in self._streams]

    async def check_devices(self, timeout_s: float | None = None) -> list[str]:
        """Ask every device for its model's metadata; list every mismatch with this ensemble."""
        await self.start()
        timeout_s = self.deadline_s if timeout_s is None else timeout_s

        async def one(k: int) -> list[str]:
            route, endpoint = self.routes[k], self.endpoints[k]
            stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channels[endpoint])
            try:
                meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name=route.name), timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                return [f"{route.name} at {endpoint}: {exc.code().name}: {exc.details()}"]
            problems = []
            for kind, want, got in (("input", route.input, meta.inputs), ("output", route.output, meta.outputs)):
                specs = [TensorSpec.from_metadata(t) for t in got]
                if want not in specs:
                    problems.append(f"{route.name} at {endpoint}: expected {kind} {want.to_dict()}, device has {[s.to_dict() for s in specs]}")
            return problems

        results = await asyncio.gather(*(one(k) for k in range(len(self.routes))))
        return [problem for problems in results for problem in problems]

    # -- inference ---------------------------------------------------------------------------
    def _validate(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        dtype = numpy_dtype(self.input_spec.datatype)
        if batch.dtype != dtype:
            if batch.dtype.kind not in "fiu":
                raise ValueError(f"batch has dtype {batch.dtype}; expected {self.input_spec.datatype} numbers")
            batch = batch.astype(dtype)
        try:
            check_shape(self.input_spec, batch.shape, self.max_batch)
        except TensorError as exc:
            raise ValueError(str(exc)) from None
        return np.ascontiguousarray(batch)

    def _features(self, route: StudentRoute, reply: pb.ModelInferResponse, batch_size: int) -> np.ndarray:
        """The reply's feature tensor, checked against the route (TensorError when it is wrong)."""
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

    async def _unary(self, k: int, request: pb.ModelInferRequest, timeout: float) -> tuple[pb.ModelInferResponse, int]:
        try:
            reply = await self._calls[k](request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _CallFailed(exc.code(), exc.details() or "") from None
        return reply, reply.ByteSize()

    async def _exchange(self, k: int, request: pb.ModelInferRequest, deadline: _Deadline) -> tuple[pb.ModelInferResponse, int]:
        """One attempt at device k: (reply, reply bytes), or _CallFailed with the gRPC status.

        A stream attempt is bounded by the request's shared deadline (which cancels it); a
        unary call carries the time left as its gRPC deadline.
        """
        stream = self._streams[k] if self._streams else None
        if stream is None:
            return await self._unary(k, request, deadline.remaining())
        try:
            wrapped = await stream.infer(request)
        except _CallFailed as exc:  # the stream broke
            if self.transport == "auto" and exc.code in _NO_STREAM:
                log.info("%s does not stream (%s); calling it with ModelInfer", self.endpoints[k], exc)
                self._streams[k] = None
                return await self._unary(k, request, max(deadline.remaining(), 1e-3))
            if self.transport == "auto" and exc.code == grpc.StatusCode.INTERNAL:
                # gRPC reports a stream refused while a write was under way as INTERNAL (and then
                # the real status is lost): this attempt goes unary, the next one streams again.
                return await self._unary(k, request, max(deadline.remaining(), 1e-3))
            if exc.code == grpc.StatusCode.CANCELLED:
                # A stream cancelled under us (the device is restarting) is as retryable as no connection.
                raise _CallFailed(grpc.StatusCode.UNAVAILABLE, exc.details) from None
            raise
        if wrapped.error_message:
            raise _CallFailed(None, wrapped.error_message)
        return wrapped.infer_response, wrapped.ByteSize()

    async def _call_device(
        self, k: int, shape: tuple[int, ...], raw: bytes, request_id: str, deadline: _Deadline
    ) -> _DeviceOutcome:
        route = self.routes[k]
        request = pb.ModelInferRequest(model_name=route.name, id=request_id)
        request.inputs.add(name=route.input.name, datatype=route.input.datatype, shape=shape)
        request.outputs.add(name=route.output.name)
        request.raw_input_contents.append(raw)
        size = request.ByteSize()
        loop = deadline.loop
        started = loop.time()
        sent = received = attempts = 0
        error: str | None = None
        in_flight = False
        try:
            while True:
                remaining = deadline.remaining()
                if remaining <= 0:
                    error = error or f"DEADLINE_EXCEEDED: no answer within {self.deadline_s:g} s"
                    break
                attempts += 1
                in_flight = True
                try:
                    reply, reply_size = await self._exchange(k, request, deadline)
                except _CallFailed as exc:
                    in_flight = False
                    error = str(exc)
                    # UNAVAILABLE: no connection, so the request is not counted as sent; any other
                    # status came from (or timed out at) a server that had the request.
                    if exc.code != grpc.StatusCode.UNAVAILABLE:
                        sent += size
                    if exc.code == grpc.StatusCode.UNAVAILABLE and attempts <= self.retries:
                        pause = min(self.backoff_s * 2 ** (attempts - 1), deadline.remaining())
                        if pause > 0:
                            await asyncio.sleep(pause)
                        continue
                    break
                in_flight = False
                sent += size
                received += reply_size
                try:
                    if reply.id and reply.id != request_id:
                        raise TensorError(f"the reply is for request {reply.id!r}, not {request_id!r}")
                    features = self._features(route, reply, shape[0])
                except TensorError as exc:
                    error = f"bad reply: {exc}"
                    break
                return _DeviceOutcome(features, sent, received, loop.time() - started, attempts, None)
        except asyncio.CancelledError:
            if not deadline.expired:
                raise  # the caller gave up on the request: pass it on
            if in_flight:  # the device had the request and did not answer in time
                sent += size
                error = str(_CallFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
            else:  # between attempts
                error = error or f"DEADLINE_EXCEEDED: no answer within {self.deadline_s:g} s"
        return _DeviceOutcome(None, sent, received, None, attempts, error)

    async def infer(self, batch: np.ndarray) -> AggregateResult:
        """Run one batch (already preprocessed, shape of the students' input) through the ensemble.

        With `coalesce` > 1, requests that arrive while `pipeline` fan-outs are in flight wait
        and go out together as one device call (up to `coalesce` images); each caller still
        gets its own rows, and the bytes of a shared call are split by image count.
        """
        await self.start()
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("this Aggregator's channels belong to another event loop")
        batch = self._validate(batch)
        if self.coalesce <= 1:
            return await self._fan_out(batch)
        future: asyncio.Future[AggregateResult] = self._loop.create_future()
        self._queue.append((batch, future, time.perf_counter()))
        self._dispatch_queued()
        return await future

    def _dispatch_queued(self) -> None:
        """Start fan-outs for queued requests while fewer than `pipeline` are in flight."""
        while self._queue and self._in_flight < self.pipeline:
            taken = [self._queue.popleft()]
            images = len(taken[0][0])
            while self._queue and images + len(self._queue[0][0]) <= self.coalesce:
                item = self._queue.popleft()
                taken.append(item)
                images += len(item[0])
            self._in_flight += 1
            asyncio.ensure_future(self._run_coalesced(taken))

    async def _run_coalesced(self, taken: list[tuple[np.ndarray, asyncio.Future, float]]) -> None:
        try:
            batch = taken[0][0] if len(taken) == 1 else np.concatenate([item[0] for item in taken])
            try:
                shared = await self._fan_out(batch)
            except Exception as exc:  # every caller of this call gets the failure
                for _, future, _ in taken:
                    if not future.done():
                        future.set_exception(exc)
                return
            total, offset, now = len(batch), 0, time.perf_counter()
            for images, future, queued_at in taken:
                n = len(images)
                share = n / total
                result = replace(
                    shared,
                    logits=shared.logits[offset : offset + n],
                    bytes_sent=[round(b * share) for b in shared.bytes_sent],
                    bytes_received=[round(b * share) for b in shared.bytes_received],
                    latency_s=now - queued_at,
                )
                offset += n
                if not future.done():
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            self._dispatch_queued()

    async def _fan_out(self, batch: np.ndarray) -> AggregateResult:
        """One concurrent call per device for `batch`, then the head."""
        started = time.perf_counter()
        raw = batch.tobytes()
        request_id = str(next(self._ids))
        loop = asyncio.get_running_loop()
        deadline = _Deadline(loop, self.deadline_s)
        calls = [
            loop.create_task(self._call_device(k, batch.shape, raw, request_id, deadline)) for k in range(len(self.routes))
        ]
        deadline.guard(calls)
        try:
            outcomes = await asyncio.gather(*calls)
        finally:
            deadline.disarm()
        contributed = [o.features is not None for o in outcomes]
        missing = [f"{r.name} at {e}: {o.error}" for r, e, o in zip(self.routes, self.endpoints, outcomes) if o.features is None]
        if missing and (self.strict or sum(contributed) < self.min_contributing):
            why = "strict mode" if self.strict else f"fewer than {self.min_contributing} device(s) answered"
            raise AggregationError(f"{why}: " + "; ".join(missing))
        dtype = numpy_dtype(self.head_input.datatype)
        parts = [
            o.features.astype(dtype, copy=False) if o.features is not None else np.zeros((batch.shape[0], r.feature_size), dtype)
            for r, o in zip(self.routes, outcomes)
        ]
        head_in = np.concatenate(parts, axis=1)
        logits = self.head.run({self.head_input.name: head_in})[self.head_output.name]
        if missing:
            log.debug("degraded answer: %s", "; ".join(missing))
        return AggregateResult(
            logits=logits,
            contributed=contributed,
            bytes_sent=[o.bytes_sent for o in outcomes],
            bytes_received=[o.bytes_received for o in outcomes],
            latency_s=time.perf_counter() - started,
            device_latency_s=[o.latency_s for o in outcomes],
            attempts=[o.attempts for o in outcomes],
            errors=[o.error for o in outcomes],
            devices=list(self.endpoints),
        )

    # -- synchronous facade ------------------------------------------------------------------
    def _background(self) -> LoopThread:
        if self._thread is None:
            if self._loop is not None:
                raise RuntimeError("this Aggregator is already in use on an event loop; call `await infer()` there")
            self._thread = LoopThread(name="nonn-aggregator")
        return self._thread

    def infer_sync(self, batch: np.ndarray) -> AggregateResult:
        """Blocking infer() for synchronous callers (runs on a private event loop thread)."""
        return self._background().run(self.infer(batch))

    def check_devices_sync(self, timeout_s: float | None = None) -> list[str]:
        return self._background().run(self.check_devices(timeout_s))

    def close_sync(self) -> None:
        if self._thread is not None:
            self._thread.run(self.close())
            self._thread.stop()
            self._thread = None

    def __enter__(self) -> "Aggregator":
        self._background().run(self.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_sync()


class AggregatorBackend(ModelBackend):
    """The whole ensemble as one served model: image in, logits out, on the same protocol.

    Handler threads hand requests to the aggregator's event loop thread, so up to `concurrency`
    requests fan out at once. Response parameters say which devices contributed
    ("contributed": "1,1,0,1", "degraded": true/false).
    """

    platform = "nonn_ensemble"

    def __init__(self, aggregator: Aggregator, name: str = "ensemble", concurrency: int = 32) -> None:
        if not name:
            raise ValueError("a served model needs a non-empty name")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.aggregator = aggregator
        self.name = name
        self.inputs = [aggregator.input_spec]
        out = aggregator.head_output
        self.outputs = [TensorSpec(out.name, out.datatype, (-1, out.shape[-1]))]
        self.max_batch = aggregator.max_batch
        self.concurrency = concurrency
        aggregator.__enter__()  # channels live on the aggregator's own loop thread

    def infer(self, inputs: dict[str, RawTensor], outputs: list[str]) -> InferOutput:
        try:
            result = self.aggregator.infer_sync(to_array(inputs[self.inputs[0].name]))
        except AggregationError as exc:
            raise BackendUnavailable(str(exc)) from exc
        return InferOutput(
            {self.outputs[0].name: result.logits},
            {
                "contributed": ",".join("1" if ok else "0" for ok in result.contributed),
                "degraded": result.degraded,
            },
        )

    def close(self) -> None:
        self.aggregator.close_sync()
