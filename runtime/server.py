"""The device server: one model (a student, or the whole ensemble) on the Open Inference Protocol.

It implements `inference.GRPCInferenceService` (KServe v2) with the generated stubs shipped by
tritonclient, plus the standard `grpc.health.v1` service, so stock clients (tritonclient,
grpc_health_probe) and the aggregator talk to it without anything nonn-specific on the wire.

Every ModelInfer request is validated (model name, input names, datatypes, ranks, shapes, byte
lengths, batch limit) before it reaches the model; a bad request gets NOT_FOUND or
INVALID_ARGUMENT with a message naming the problem, and the server keeps serving. Health turns
SERVING only after the model is loaded and the port is bound; SIGTERM stops accepting new calls,
lets in-flight ones finish, then exits. Handlers run on a thread pool (ONNX Runtime releases the
GIL while it computes), which costs less per call than an asyncio server.
"""

from __future__ import annotations

import abc
import logging
import os
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nonn import __version__
from nonn.artifacts import ArtifactError, atomic_write_json
from nonn.runtime.codec import (
    RawTensor,
    TensorError,
    TensorSpec,
    bytes_per_item,
    decode_request_inputs,
    make_parameter,
    output_tensor,
    requested_outputs,
)
from nonn.runtime.memory import release_free_memory, tune_malloc
from nonn.runtime.ort_capi import CApiModel, OrtLibraryError
from nonn.runtime.protocol import model_config_pb2, pb, service_pb2_grpc
from nonn.runtime.tls import ServerTLS

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_QUEUED_CALLS",
    "DEFAULT_MAX_STREAMS",
    "RequestError",
    "DecodeGuard",
    "SERVICE_NAME",
    "BackendUnavailable",
    "InferOutput",
    "ModelBackend",
    "OnnxBackend",
    "InferenceServicer",
    "DeviceServer",
    "message_limit",
    "serve",
    "serve_backends",
    "student_backend",
    "load_model",
]

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
DEFAULT_MAX_BATCH = 64
# Headroom for headers, names and shapes on top of the tensor bytes in one message.
_MESSAGE_SLACK = 1 << 20
# Used when a model has dynamic non-batch dimensions, so no exact bound can be derived.
_FALLBACK_MESSAGE_BYTES = 64 << 20
# Handler threads beyond the backends' concurrency, for health, metadata and queued requests.
_SPARE_HANDLERS = 4
# Calls a server holds beyond its handler threads (waiting for one) before it refuses new ones
# with RESOURCE_EXHAUSTED: each waiting call keeps its whole request in memory.
DEFAULT_QUEUED_CALLS = 64
# Open ModelStreamInfer streams a server accepts at once; each holds a handler thread.
DEFAULT_MAX_STREAMS = 8


class RequestError(Exception):
    """A request the server refuses: the gRPC status and a message naming the problem."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class BackendUnavailable(RuntimeError):
    """The backend cannot answer now (e.g. the ensemble lost a device in strict mode): UNAVAILABLE."""


@dataclass
class InferOutput:
    """What a backend returns: outputs by name (RawTensors or numpy arrays), plus response parameters."""

    arrays: dict[str, Any]
    parameters: dict[str, Any] = field(default_factory=dict)


class ModelBackend(abc.ABC):
    """One model the server hosts: its protocol description and a thread-safe infer().

    `concurrency` is how many requests the backend runs at once; the server sizes its handler
    thread pool from it. Inputs arrive as validated RawTensors (bytes as the wire carried
    them); `nonn.runtime.arrays.to_array` views one as a numpy array.
    """

    name: str
    version: str = "1"
    platform: str = "onnxruntime_onnx"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch: int = DEFAULT_MAX_BATCH
    concurrency: int = 1

    @abc.abstractmethod
    def infer(self, inputs: dict[str, RawTensor], outputs: list[str]) -> InferOutput:
        """Run the model on validated inputs; return the requested outputs. Called from handler threads."""

    def close(self) -> None:
        """Release resources (called once after the server stopped)."""


class TensorModel(Protocol):
    """What OnnxBackend serves: CApiModel (what `nonn serve` uses) or OnnxModel."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run_tensors(self, feeds: Mapping[str, RawTensor], outputs: Sequence[str] | None = None) -> dict[str, RawTensor]: ...


class OnnxBackend(ModelBackend):
    """An ONNX model served under `name`; at most `workers` requests run in ONNX Runtime at once."""

    def __init__(self, model: TensorModel, name: str, max_batch: int = DEFAULT_MAX_BATCH, workers: int = 1) -> None:
        if not name:
            raise ValueError("a served model needs a non-empty name")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.model = model
        self.name = name
        self.inputs = list(model.inputs)
        self.outputs = list(model.outputs)
        self.max_batch = max_batch
        self.concurrency = workers
        # One worker (a small device's default): a plain lock, cheaper per request than a semaphore.
        self._slots = threading.Lock() if workers == 1 else threading.BoundedSemaphore(workers)

    def infer(self, inputs: dict[str, RawTensor], outputs: list[str]) -> InferOutput:
        with self._slots:
            return InferOutput(self.model.run_tensors(inputs, outputs))


def message_limit(backends: Sequence[ModelBackend]) -> int:
    """Largest message a full batch can need on either side, from the models' tensor shapes."""
    largest = 0
    for backend in backends:
        for specs in (backend.inputs, backend.outputs):
            per_item = [bytes_per_item(spec) for spec in specs]
            if any(size is None for size in per_item):
                return _FALLBACK_MESSAGE_BYTES
            total = sum(size * (backend.max_batch if spec.batched else 1) for size, spec in zip(per_item, specs))
            largest = max(largest, total)
    return largest + _MESSAGE_SLACK


def _config_dims(spec: TensorSpec) -> list[int]:
    return list(spec.shape[1:] if spec.batched else spec.shape)


class _StreamState:
    """Whether an open stream is handling a request (set by its handler thread, read on shutdown)."""

    __slots__ = ("busy",)

    def __init__(self) -> None:
        self.busy = False


def _not_supported(method: str):
    """A handler that answers UNIMPLEMENTED with a message.

    The generated servicer's default raises NotImplementedError, which gRPC logs with a full
    traceback for every call: any peer could flood a device's log with them.
    """

    def handler(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not supported by this server")

    handler.__name__ = method
    return handler


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService` over a set of ModelBackends (usually exactly one)."""

    def __init__(self, backends: Sequence[ModelBackend], server_name: str = "nonn", max_streams: int = DEFAULT_MAX_STREAMS) -> None:
        self.backends = {backend.name: backend for backend in backends}
        if len(self.backends) != len(backends):
            raise ValueError(f"model names repeat: {[b.name for b in backends]}")
        if max_streams < 0:
            raise ValueError(f"max_streams must be 0 or more, got {max_streams}")
        self.server_name = server_name
        self.ready = False
        self.stopping = False
        self.max_streams = max_streams
        self._stream_slots = threading.BoundedSemaphore(max_streams)
        self._open_streams: dict[Any, _StreamState] = {}

    # -- lookup -----------------------------------------------------------------------------
    def _find(self, name: str, version: str) -> ModelBackend | None:
        backend = self.backends.get(name)
        if backend is None or (version and version != backend.version):
            return None
        return backend

    def _require(self, name: str, version: str) -> ModelBackend:
        """The backend serving `name` (and `version`, if given); RequestError NOT_FOUND otherwise."""
        backend = self._find(name, version)
        if backend is None:
            known = ", ".join(sorted(self.backends)) or "none"
            what = f"model {name!r}" + (f" version {version!r}" if version else "")
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"unknown {what}; this server hosts: {known}")
        return backend

    def _get(self, name: str, version: str, context: grpc.ServicerContext) -> ModelBackend:
        try:
            return self._require(name, version)
        except RequestError as exc:
            context.abort(exc.code, exc.message)

    # -- health and metadata ----------------------------------------------------------------
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready)

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.ready and self._find(request.name, request.version) is not None)

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=self.server_name, version=__version__, extensions=[])

    def ModelMetadata(self, request, context):
        backend = self._get(request.name, request.version, context)
        return pb.ModelMetadataResponse(
            name=backend.name,
            versions=[backend.version],
            platform=backend.platform,
            inputs=[spec.metadata() for spec in backend.inputs],
            outputs=[spec.metadata() for spec in backend.outputs],
        )

    def ModelConfig(self, request, context):
        """A minimal Triton-style model configuration (batch dimension left out of dims)."""
        backend = self._get(request.name, request.version, context)
        batched = all(spec.batched for spec in backend.inputs + backend.outputs)

        def tensors(kind, specs):
            return [
                kind(
                    name=s.name,
                    data_type=model_config_pb2.DataType.Value("TYPE_" + s.datatype),
                    dims=_config_dims(s) if batched else list(s.shape),
                )
                for s in specs
            ]

        config = model_config_pb2.ModelConfig(
            name=backend.name,
            platform=backend.platform,
            max_batch_size=backend.max_batch if batched else 0,
            input=tensors(model_config_pb2.ModelInput, backend.inputs),
            output=tensors(model_config_pb2.ModelOutput, backend.outputs),
        )
        return pb.ModelConfigResponse(config=config)

    # -- inference --------------------------------------------------------------------------
    def infer_request(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """Validate one ModelInferRequest, run its model and build the reply (RequestError if refused).

        The one inference path: ModelInfer turns a RequestError into the call's status,
        ModelStreamInfer into the stream reply's error_message.
        """
        backend = self._require(request.model_name, request.model_version)
        if not self.ready:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"model {backend.name!r} is not ready")
        try:
            for key in request.parameters:
                if key.startswith("shared_memory"):
                    raise TensorError(f"request parameter {key!r}: shared memory is not supported by this server")
            for tensor in request.inputs:
                if any(key.startswith("shared_memory") for key in tensor.parameters):
                    raise TensorError(f"input {tensor.name!r}: shared memory is not supported by this server")
            inputs = decode_request_inputs(backend.inputs, request, backend.max_batch)
            wanted = requested_outputs(backend.outputs, request)
        except TensorError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        try:
            result = backend.infer(inputs, [spec.name for spec in wanted])
        except BackendUnavailable as exc:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        except Exception as exc:  # the model failed on validated input: report, keep serving
            log.exception("model %s failed", backend.name)
            raise RequestError(grpc.StatusCode.INTERNAL, f"model {backend.name!r} failed: {exc}") from None
        response = pb.ModelInferResponse(model_name=backend.name, model_version=backend.version, id=request.id)
        for spec in wanted:
            header, raw = output_tensor(spec.name, result.arrays[spec.name])
            response.outputs.append(header)
            response.raw_output_contents.append(raw)
        for key, value in result.parameters.items():
            response.parameters[key].CopyFrom(make_parameter(value))
        return response

    def ModelInfer(self, request, context):
        try:
            return self.infer_request(request)
        except RequestError as exc:
            context.abort(exc.code, exc.message)

    def ModelStreamInfer(self, request_iterator, context):
        """Triton's streaming extension: one reply per request on a long-lived stream.

        It saves the per-call cost of a unary RPC, which dominates a small model's latency. A
        refused request gets a reply with `error_message` (and the request's id) and the stream
        goes on; UNAVAILABLE ends the stream, so the client reconnects or goes elsewhere. At
        most `max_streams` streams are open at once (each holds a handler thread); beyond that
        a stream is refused with RESOURCE_EXHAUSTED and the client can use ModelInfer.
        """
        if not self._stream_slots.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this server already has {self.max_streams} open streams; use ModelInfer",
            )
        state = _StreamState()
        self._open_streams[context] = state
        try:
            if self.stopping:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            for request in request_iterator:
                state.busy = True
                if isinstance(request, _UndecodableRequest):
                    yield pb.ModelStreamInferResponse(error_message=request.message())
                else:
                    try:
                        yield pb.ModelStreamInferResponse(infer_response=self.infer_request(request))
                    except RequestError as exc:
                        if exc.code == grpc.StatusCode.UNAVAILABLE:
                            context.abort(exc.code, exc.message)
                        yield pb.ModelStreamInferResponse(
                            error_message=f"{exc.code.name}: {exc.message}",
                            infer_response=pb.ModelInferResponse(
                                model_name=request.model_name, model_version=request.model_version, id=request.id
                            ),
                        )
                if self.stopping:
                    return
                state.busy = False
        finally:
            self._open_streams.pop(context, None)
            self._stream_slots.release()

    ModelStreamInfer.handles_undecodable = True  # type: ignore[attr-defined]

    def end_idle_streams(self) -> None:
        """On shutdown: cancel streams waiting for their next request (busy ones end after their reply)."""
        self.stopping = True
        for context, state in list(self._open_streams.items()):
            if not state.busy:
                context.cancel()

    # -- optional parts of the protocol this server does not offer ----------------------------
    ModelStatistics = _not_supported("ModelStatistics")
    RepositoryIndex = _not_supported("RepositoryIndex")
    RepositoryModelLoad = _not_supported("RepositoryModelLoad")
    RepositoryModelUnload = _not_supported("RepositoryModelUnload")
    SystemSharedMemoryStatus = _not_supported("SystemSharedMemoryStatus")
    SystemSharedMemoryRegister = _not_supported("SystemSharedMemoryRegister")
    SystemSharedMemoryUnregister = _not_supported("SystemSharedMemoryUnregister")
    CudaSharedMemoryStatus = _not_supported("CudaSharedMemoryStatus")
    CudaSharedMemoryRegister = _not_supported("CudaSharedMemoryRegister")
    CudaSharedMemoryUnregister = _not_supported("CudaSharedMemoryUnregister")
    TraceSetting = _not_supported("TraceSetting")
    LogSettings = _not_supported("LogSettings")


class _UndecodableRequest:
    """Stands in for request bytes that do not parse as the RPC's message."""

    def __init__(self, message_type: str, error: Exception) -> None:
        self.message_type = message_type
        self.error = error

    def message(self) -> str:
        return f"the request bytes are not a valid {self.message_type} message ({self.error})"


class DecodeGuard(grpc.ServerInterceptor):
    """Answer request bytes that do not parse with INVALID_ARGUMENT from inside the handler.

    Left to itself, grpcio answers such a request with INTERNAL and (1.85) keeps about 19 KB of
    server memory for every one: a peer sending garbage could grow a device until it runs out
    of memory. With this guard decoding never fails inside gRPC; the handler aborts instead,
    which releases the call like any other refused request.
    """

    def __init__(self) -> None:
        # The guarded handler of each method is built once, not on every call.
        self._guarded: dict[str, Any] = {}

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        cached = self._guarded.get(method)
        if cached is not None:
            return cached
        handler = self._guard(continuation(handler_call_details))
        if handler is not None:
            self._guarded[method] = handler
        return handler

    @staticmethod
    def _guard(handler):
        if handler is None or handler.request_deserializer is None:
            return handler
        deserialize = handler.request_deserializer
        message_type = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
        message_name = message_type.full_name if message_type is not None else "request"

        def safe_deserialize(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception as exc:  # any decoding failure becomes a refused request
                return _UndecodableRequest(message_name, exc)

        def guarded(behavior):
            def call(request, context):
                if isinstance(request, _UndecodableRequest):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
                return behavior(request, context)

            return call

        def guarded_stream(behavior):
            # A streaming handler marked `handles_undecodable` answers bad messages in-stream.
            if getattr(behavior, "handles_undecodable", False):
                return behavior

            def call(request_iterator, context):
                def checked():
                    for request in request_iterator:
                        if isinstance(request, _UndecodableRequest):
                            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
                        yield request

                return behavior(checked(), context)

            return call

        if handler.unary_unary is not None:
            return handler._replace(request_deserializer=safe_deserialize, unary_unary=guarded(handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(request_deserializer=safe_deserialize, unary_stream=guarded(handler.unary_stream))
        if handler.stream_unary is not None:
            return handler._replace(request_deserializer=safe_deserialize, stream_unary=guarded_stream(handler.stream_unary))
        if handler.stream_stream is not None:
            return handler._replace(request_deserializer=safe_deserialize, stream_stream=guarded_stream(handler.stream_stream))
        return handler


class DeviceServer:
    """A gRPC server hosting ModelBackends on the inference and health services.

    Binds `host` (127.0.0.1 unless told otherwise); port 0 picks a free port, read it from
    `port` after start(). Message size limits are derived from the models' tensor shapes and
    batch limit unless `max_message_bytes` is given. Handlers run on a thread pool sized from
    the backends' concurrency plus a few threads so health and metadata calls never wait
    behind inference. At most `max_concurrent_rpcs` calls are held at once (default: the handler
    threads, the streams and DEFAULT_QUEUED_CALLS); beyond that a call is refused with RESOURCE_EXHAUSTED
    instead of queueing its request in memory without bound. Up to `max_streams` ModelStreamInfer
    streams are open at once, each on a thread of its own. Usable as a context manager (start on
    enter, stop on exit).
    """

    def __init__(
        self,
        backends: ModelBackend | Sequence[ModelBackend],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ServerTLS | None = None,
        max_message_bytes: int | None = None,
        grace_s: float = 5.0,
        server_name: str = "nonn",
        handler_threads: int | None = None,
        max_concurrent_rpcs: int | None = None,
        max_streams: int = DEFAULT_MAX_STREAMS,
    ) -> None:
        self.backends = [backends] if isinstance(backends, ModelBackend) else list(backends)
        if not self.backends:
            raise ValueError("a server needs at least one model")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self.tls = tls
        self.grace_s = grace_s
        self.max_message_bytes = max_message_bytes or message_limit(self.backends)
        self.handler_threads = handler_threads or sum(b.concurrency for b in self.backends) + _SPARE_HANDLERS
        self.max_streams = max_streams
        self.max_concurrent_rpcs = max_concurrent_rpcs or self.handler_threads + max_streams + DEFAULT_QUEUED_CALLS
        if self.max_concurrent_rpcs < self.handler_threads:
            raise ValueError(
                f"max_concurrent_rpcs ({self.max_concurrent_rpcs}) is below the handler threads ({self.handler_threads})"
            )
        self.servicer = InferenceServicer(self.backends, server_name, max_streams=max_streams)
        self.health = health.HealthServicer()
        self._server: grpc.Server | None = None
        self._stopped = False

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("the server is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def _health_names(self) -> list[str]:
        return ["", SERVICE_NAME] + [backend.name for backend in self.backends]

    def start(self) -> int:
        """Bind, start serving, then mark health SERVING; returns the bound port."""
        if self._server is not None:
            raise RuntimeError("the server is already started")
        server = grpc.server(
            # Each open stream holds a thread of its own on top of the unary handlers.
            ThreadPoolExecutor(max_workers=self.handler_threads + self.max_streams, thread_name_prefix="nonn-rpc"),
            interceptors=[DecodeGuard()],
            maximum_concurrent_rpcs=self.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for name in self._health_names():
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        target = f"[{self.host}]:{self.requested_port}" if ":" in self.host else f"{self.host}:{self.requested_port}"
        cannot_bind = f"cannot bind {target}: the port is in use or the address is not available here"
        try:
            if self.tls is not None:
                bound = server.add_secure_port(target, self.tls.credentials())
            else:
                bound = server.add_insecure_port(target)
        except RuntimeError as exc:  # grpcio raises for some bind failures and returns 0 for others
            raise OSError(cannot_bind) from exc
        if not bound:
            raise OSError(cannot_bind)
        server.start()
        self._server = server
        self.port = bound
        self.servicer.ready = True
        for name in self._health_names():
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving %s on %s%s",
            ", ".join(b.name for b in self.backends),
            self.address,
            " (mTLS)" if self.tls and self.tls.mutual else " (TLS)" if self.tls else "",
        )
        return bound

    def stop(self, grace_s: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING, refuse new calls, finish in-flight ones (up to grace_s)."""
        if self._server is None or self._stopped:
            return
        self._stopped = True
        self.health.enter_graceful_shutdown()
        done = self._server.stop(self.grace_s if grace_s is None else grace_s)
        self.servicer.end_idle_streams()
        done.wait()
        self.servicer.ready = False
        for backend in self.backends:
            backend.close()

    def wait_for_termination(self, timeout_s: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout_s) if self._server is not None else True

    def __enter__(self) -> "DeviceServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(0)


class _StopSignals:
    """SIGTERM and SIGINT, delivered to a socket the main thread blocks on (main thread only).

    The handler itself does nothing: Python's C-level handler writes the signal number to the
    wakeup socket, whichever thread the kernel interrupted. A handler that set a threading.Event
    instead could deadlock when the signal landed while the main thread held that Event's lock.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> "_StopSignals":
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        self._previous = {sig: signal.signal(sig, lambda *_: None) for sig in self.SIGNALS}
        return self

    def wait(self) -> int:
        """Block until SIGTERM or SIGINT arrives; return it."""
        while True:
            for number in self._read.recv(64):
                if number in self.SIGNALS:
                    return number

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._previous_fd)
        self._read.close()
        self._write.close()


def serve_backends(
    backends: ModelBackend | Sequence[ModelBackend],
    *,
    host: str = "127.0.0.1",
    port: int = 8001,
    tls: ServerTLS | None = None,
    max_message_bytes: int | None = None,
    grace_s: float = 5.0,
    ready_file: str | os.PathLike[str] | None = None,
    tune_memory: bool = True,
    max_streams: int = DEFAULT_MAX_STREAMS,
) -> None:
    """Serve `backends` until SIGTERM or SIGINT, then stop gracefully (blocking; main thread only).

    `ready_file` (optional) receives {"models", "host", "port", "address", "pid"} as JSON once
    the server is SERVING, and is removed on exit: a launcher using port 0 reads the port there.
    `tune_memory` applies nonn.runtime.memory's glibc settings (one malloc arena, a fixed mmap
    threshold) and releases start-up garbage once the server is up, for a smaller, flat footprint.
    """
    server = DeviceServer(
        backends, host=host, port=port, tls=tls, max_message_bytes=max_message_bytes, grace_s=grace_s,
        max_streams=max_streams,
    )  # fmt: skip
    if tune_memory:
        tune_malloc()
    ready = Path(ready_file) if ready_file is not None else None
    with _StopSignals() as stop_signals:
        try:
            server.start()
            if tune_memory:
                release_free_memory()
            names = [backend.name for backend in server.backends]
            if ready is not None:
                atomic_write_json(
                    ready,
                    {"models": names, "host": server.host, "port": server.port, "address": server.address, "pid": os.getpid()},
                )
            print(f"nonn serve: {', '.join(names)} ready on {server.address}", flush=True)
            received = stop_signals.wait()
            log.info(
                "%s received: finishing in-flight requests (up to %.1f s), then stopping",
                signal.Signals(received).name, server.grace_s,
            )  # fmt: skip
        finally:
            server.stop()
            if ready is not None:
                ready.unlink(missing_ok=True)


def load_model(path: str | os.PathLike[str], *, threads: int = 1, expected_sha256: str | None = None) -> TensorModel:
    """A model to serve: through ONNX Runtime's C library (no numpy), else its Python binding.

    The fallback (with a warning) is for an onnxruntime build without the C library; a library
    named in NONN_ORT_LIBRARY that does not load is an error instead.
    """
    try:
        return CApiModel(path, threads=threads, expected_sha256=expected_sha256)
    except OrtLibraryError as exc:
        if os.environ.get("NONN_ORT_LIBRARY"):
            raise
        log.warning("%s; serving through ONNX Runtime's Python binding instead (more memory: it loads numpy)", exc)
    from nonn.runtime.onnx_model import OnnxModel

    return OnnxModel(path, threads=threads, expected_sha256=expected_sha256)


def student_backend(
    bundle: Any,
    student: str | int,
    *,
    threads: int = 1,
    max_batch: int = DEFAULT_MAX_BATCH,
    workers: int = 1,
) -> OnnxBackend:
    """Load one student of a bundle (a Bundle or its directory) for serving.

    The model's sha256 must match the manifest (ModelIntegrityError otherwise) and its input and
    output must be the ones the manifest declares (ArtifactError otherwise).
    """
    from nonn.runtime.bundle import Bundle

    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    try:
        entry = bundle.student(student)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    path = bundle.path_of(entry)
    model = load_model(path, threads=threads, expected_sha256=entry.sha256)
    declared = (
        [TensorSpec(entry.input.name, entry.input.datatype, tuple(entry.input.shape))],
        [TensorSpec(entry.output.name, entry.output.datatype, tuple(entry.output.shape))],
    )
    if (model.inputs, model.outputs) != declared:
        raise ArtifactError(
            f"{path}: the model's inputs/outputs {[s.to_dict() for s in model.inputs + model.outputs]} "
            f"differ from the manifest's {[s.to_dict() for s in declared[0] + declared[1]]}"
        )
    return OnnxBackend(model, entry.name, max_batch=max_batch, workers=workers)


def serve(
    model_path: str | os.PathLike[str],
    name: str,
    port: int = 8001,
    host: str = "127.0.0.1",
    threads: int = 1,
    tls: ServerTLS | None = None,
    expected_sha256: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    *,
    workers: int = 1,
    ready_file: str | os.PathLike[str] | None = None,
    grace_s: float = 5.0,
) -> None:
    """Load one ONNX model (refusing a sha256 mismatch) and serve it as `name` until SIGTERM."""
    model = load_model(model_path, threads=threads, expected_sha256=expected_sha256)
    backend = OnnxBackend(model, name, max_batch=max_batch, workers=workers)
    serve_backends(backend, host=host, port=port, tls=tls, grace_s=grace_s, ready_file=ready_file)
