"""The device server: one model (a student, or the whole ensemble) on the Open Inference Protocol.

`DeviceServer` runs `inference.GRPCInferenceService` (KServe v2, `nonn.runtime.servicer`) with
the generated stubs shipped by tritonclient, plus the standard `grpc.health.v1` service, so stock
clients (tritonclient, grpc_health_probe) and the aggregator talk to it without anything
nonn-specific on the wire. This module is the server's life cycle: bind, health SERVING only
after the model is loaded and the port is bound, and on SIGTERM stop accepting new calls, let
in-flight ones finish, then exit. Handlers run on a thread pool (ONNX Runtime releases the GIL
while it computes), which costs less per call than an asyncio server.

Where the rest lives: the service and its request validation in `servicer`, the models it can
host in `backends`, loading a bundle's student in `model_loading`, refusing undecodable bytes
in `decode_guard`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nonn.artifacts import atomic_write_json
from nonn.runtime.backends import DEFAULT_MAX_BATCH, BackendUnavailable, InferOutput, ModelBackend, OnnxBackend
from nonn.runtime.codec import bytes_per_item
from nonn.runtime.decode_guard import DecodeGuard
from nonn.runtime.health_service import HealthService
from nonn.runtime.memory import release_free_memory, tune_malloc
from nonn.runtime.model_loading import load_model, student_backend
from nonn.runtime.protocol import service_pb2_grpc
from nonn.runtime.servicer import DEFAULT_MAX_STREAMS, SERVICE_NAME, InferenceServicer, RequestError
from nonn.runtime.tls import ServerTLS

__all__ = [
    "DEFAULT_QUEUED_CALLS",
    "DeviceServer",
    "message_limit",
    "serve",
    "serve_backends",
    # Defined elsewhere, importable from here as before:
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_STREAMS",
    "SERVICE_NAME",
    "BackendUnavailable",
    "InferOutput",
    "ModelBackend",
    "OnnxBackend",
    "InferenceServicer",
    "RequestError",
    "DecodeGuard",
    "load_model",
    "student_backend",
]

log = logging.getLogger(__name__)

# Headroom for headers, names and shapes on top of the tensor bytes in one message.
_MESSAGE_SLACK = 1 << 20
# Used when a model has dynamic non-batch dimensions, so no exact bound can be derived.
_FALLBACK_MESSAGE_BYTES = 64 << 20
# Handler threads beyond the backends' concurrency, for health, metadata and queued requests.
_SPARE_HANDLERS = 4
# Calls a server holds beyond its handler threads (waiting for one) before it refuses new ones
# with RESOURCE_EXHAUSTED: each waiting call keeps its whole request in memory.
DEFAULT_QUEUED_CALLS = 64


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
        self.health = HealthService()
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
        if self.requested_port and not _can_bind(self.host, self.requested_port):
            raise OSError(cannot_bind)  # found before gRPC's core logs its own line about it
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


def _can_bind(host: str, port: int) -> bool:
    """Whether a listening TCP socket could take host:port now (as gRPC binds: SO_REUSEADDR, no SO_REUSEPORT)."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError:
                continue
            return True
    return False


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
