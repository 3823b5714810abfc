"""The device server: one model (a student, or the whole ensemble) on the Open Inference Protocol.

It implements `inference.GRPCInferenceService` (KServe v2) with the generated stubs shipped by
tritonclient, plus the standard `grpc.health.v1` service, so stock clients (tritonclient,
grpc_health_probe) and the aggregator talk to it without anything nonn-specific on the wire.

Every ModelInfer request is validated (model name, input names, datatypes, ranks, shapes, byte
lengths, batch limit) before it reaches the model; a bad request gets NOT_FOUND or
INVALID_ARGUMENT with a message naming the problem, and the server keeps serving. Health turns
SERVING only after the model is loaded and the port is bound; SIGTERM stops accepting new calls,
lets in-flight ones finish, then exits.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from nonn import __version__
from nonn.artifacts import ArtifactError, atomic_write_json
from nonn.runtime.aioloop import LoopThread
from nonn.runtime.codec import (
    TensorError,
    TensorSpec,
    bytes_per_item,
    decode_request_inputs,
    make_parameter,
    output_tensor,
    requested_outputs,
)
from nonn.runtime.onnx_model import OnnxModel
from nonn.runtime.tls import ServerTLS

__all__ = [
    "DEFAULT_MAX_BATCH",
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
]

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
DEFAULT_MAX_BATCH = 64
# Headroom for headers, names and shapes on top of the tensor bytes in one message.
_MESSAGE_SLACK = 1 << 20
# Used when a model has dynamic non-batch dimensions, so no exact bound can be derived.
_FALLBACK_MESSAGE_BYTES = 64 << 20


class BackendUnavailable(RuntimeError):
    """The backend cannot answer now (e.g. the ensemble lost a device in strict mode): UNAVAILABLE."""


@dataclass
class InferOutput:
    """What a backend returns: output arrays by name, plus response parameters (optional)."""

    arrays: dict[str, np.ndarray]
    parameters: dict[str, Any] = field(default_factory=dict)


class ModelBackend(abc.ABC):
    """One model the server hosts: its protocol description and an async infer()."""

    name: str
    version: str = "1"
    platform: str = "onnxruntime_onnx"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch: int = DEFAULT_MAX_BATCH

    @abc.abstractmethod
    async def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> InferOutput:
        """Run the model on validated inputs; return the requested outputs."""

    async def close(self) -> None:
        """Release resources (called once after the server stopped)."""


class OnnxBackend(ModelBackend):
    """An OnnxModel served under `name`; ONNX Runtime runs on a small worker pool off the event loop."""

    def __init__(self, model: OnnxModel, name: str, max_batch: int = DEFAULT_MAX_BATCH, workers: int = 1) -> None:
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
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"ort-{name}")

    async def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> InferOutput:
        loop = asyncio.get_running_loop()
        arrays = await loop.run_in_executor(self._executor, self.model.run, inputs, outputs)
        return InferOutput(arrays)

    async def close(self) -> None:
        self._executor.shutdown(wait=True)


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


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService` over a set of ModelBackends (usually exactly one)."""

    def __init__(self, backends: Sequence[ModelBackend], server_name: str = "nonn") -> None:
        self.backends = {backend.name: backend for backend in backends}
        if len(self.backends) != len(backends):
            raise ValueError(f"model names repeat: {[b.name for b in backends]}")
        self.server_name = server_name
        self.ready = False

    # -- lookup -----------------------------------------------------------------------------
    def _find(self, name: str, version: str) -> ModelBackend | None:
        backend = self.backends.get(name)
        if backend is None or (version and version != backend.version):
            return None
        return backend

    async def _get(self, name: str, version: str, context: grpc.aio.ServicerContext) -> ModelBackend:
        backend = self._find(name, version)
        if backend is None:
            known = ", ".join(sorted(self.backends)) or "none"
            what = f"model {name!r}" + (f" version {version!r}" if version else "")
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown {what}; this server hosts: {known}")
        return backend

    # -- health and metadata ----------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.ready and self._find(request.name, request.version) is not None)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=self.server_name, version=__version__, extensions=[])

    async def ModelMetadata(self, request, context):
        backend = await self._get(request.name, request.version, context)
        return pb.ModelMetadataResponse(
            name=backend.name,
            versions=[backend.version],
            platform=backend.platform,
            inputs=[spec.metadata() for spec in backend.inputs],
            outputs=[spec.metadata() for spec in backend.outputs],
        )

    async def ModelConfig(self, request, context):
        """A minimal Triton-style model configuration (batch dimension left out of dims)."""
        backend = await self._get(request.name, request.version, context)
        batched = all(spec.batched for spec in backend.inputs + backend.outputs)
        config = model_config_pb2.ModelConfig(
            name=backend.name,
            platform=backend.platform,
            max_batch_size=backend.max_batch if batched else 0,
            input=[
                model_config_pb2.ModelInput(
                    name=s.name,
                    data_type=model_config_pb2.DataType.Value("TYPE_" + s.datatype),
                    dims=_config_dims(s) if batched else list(s.shape),
                )
                for s in backend.inputs
            ],
            output=[
                model_config_pb2.ModelOutput(
                    name=s.name,
                    data_type=model_config_pb2.DataType.Value("TYPE_" + s.datatype),
                    dims=_config_dims(s) if batched else list(s.shape),
                )
                for s in backend.outputs
            ],
        )
        return pb.ModelConfigResponse(config=config)

    # -- inference --------------------------------------------------------------------------
    async def ModelInfer(self, request, context):
        backend = await self._get(request.model_name, request.model_version, context)
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"model {backend.name!r} is not ready")
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
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            result = await backend.infer(inputs, [spec.name for spec in wanted])
        except BackendUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except Exception as exc:  # the model failed on validated input: report, keep serving
            log.exception("model %s failed", backend.name)
            await context.abort(grpc.StatusCode.INTERNAL, f"model {backend.name!r} failed: {exc}")
        response = pb.ModelInferResponse(model_name=backend.name, model_version=backend.version, id=request.id)
        for spec in wanted:
            header, raw = output_tensor(spec.name, result.arrays[spec.name])
            response.outputs.append(header)
            response.raw_output_contents.append(raw)
        for key, value in result.parameters.items():
            response.parameters[key].CopyFrom(make_parameter(value))
        return response


class DeviceServer:
    """A grpc.aio server hosting ModelBackends on the inference and health services.

    Binds `host` (127.0.0.1 unless told otherwise); port 0 picks a free port, read it from
    `port` after start(). Message size limits are derived from the models' tensor shapes and
    batch limit unless `max_message_bytes` is given.
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
        self.servicer = InferenceServicer(self.backends, server_name)
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._background: LoopThread | None = None
        self._stopped = False

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("the server is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def _health_names(self) -> list[str]:
        return ["", SERVICE_NAME] + [backend.name for backend in self.backends]

    async def start(self) -> int:
        """Bind, start serving, then mark health SERVING; returns the bound port."""
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for name in self._health_names():
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        target = f"[{self.host}]:{self.requested_port}" if ":" in self.host else f"{self.host}:{self.requested_port}"
        try:
            if self.tls is not None:
                bound = server.add_secure_port(target, self.tls.credentials())
            else:
                bound = server.add_insecure_port(target)
        except RuntimeError as exc:
            raise OSError(f"cannot bind {target}: {exc}") from exc
        if not bound:
            raise OSError(f"cannot bind {target} (address in use or not available)")
        await server.start()
        self._server = server
        self.port = bound
        self.servicer.ready = True
        for name in self._health_names():
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving %s on %s%s",
            ", ".join(b.name for b in self.backends),
            self.address,
            " (mTLS)" if self.tls and self.tls.mutual else " (TLS)" if self.tls else "",
        )
        return bound

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING, refuse new calls, finish in-flight ones (up to grace_s)."""
        if self._server is None or self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        self.servicer.ready = False
        await self._server.stop(self.grace_s if grace_s is None else grace_s)
        for backend in self.backends:
            await backend.close()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    # -- running from synchronous code (tests, benchmarks, in-process fleets) ---------------
    def start_background(self, timeout: float = 30.0) -> "DeviceServer":
        """Start on a private event loop thread; returns self (read `port` / `address`)."""
        if self._background is not None:
            raise RuntimeError("the server is already running in the background")
        self._background = LoopThread(name="nonn-server")
        try:
            self._background.run(self.start(), timeout)
        except BaseException:
            self._background.stop()
            self._background = None
            raise
        return self

    def stop_background(self, grace_s: float | None = None) -> None:
        if self._background is None:
            return
        try:
            self._background.run(self.stop(grace_s))
        finally:
            self._background.stop()
            self._background = None

    def __enter__(self) -> "DeviceServer":
        return self.start_background()

    def __exit__(self, *exc: object) -> None:
        self.stop_background(0)


async def _run_until_signal(server: DeviceServer, ready_file: Path | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    names = [backend.name for backend in server.backends]
    if ready_file is not None:
        atomic_write_json(
            ready_file,
            {"models": names, "host": server.host, "port": server.port, "address": server.address, "pid": os.getpid()},
        )
    print(f"nonn serve: {', '.join(names)} ready on {server.address}", flush=True)
    try:
        await stop.wait()
        log.info("signal received: finishing in-flight requests (up to %.1f s), then stopping", server.grace_s)
        await server.stop()
    finally:
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)


def serve_backends(
    backends: ModelBackend | Sequence[ModelBackend],
    *,
    host: str = "127.0.0.1",
    port: int = 8001,
    tls: ServerTLS | None = None,
    max_message_bytes: int | None = None,
    grace_s: float = 5.0,
    ready_file: str | os.PathLike[str] | None = None,
) -> None:
    """Serve `backends` until SIGTERM or SIGINT, then stop gracefully (blocking).

    `ready_file` (optional) receives {"models", "host", "port", "address", "pid"} as JSON once
    the server is SERVING, and is removed on exit: a launcher using port 0 reads the port there.
    """
    server = DeviceServer(
        backends, host=host, port=port, tls=tls, max_message_bytes=max_message_bytes, grace_s=grace_s
    )
    asyncio.run(_run_until_signal(server, Path(ready_file) if ready_file is not None else None))


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
    model = OnnxModel(path, threads=threads, expected_sha256=entry.sha256)
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
    model = OnnxModel(model_path, threads=threads, expected_sha256=expected_sha256)
    backend = OnnxBackend(model, name, max_batch=max_batch, workers=workers)
    serve_backends(backend, host=host, port=port, tls=tls, grace_s=grace_s, ready_file=ready_file)
