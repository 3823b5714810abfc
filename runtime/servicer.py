"""The inference service itself: `inference.GRPCInferenceService` (KServe v2) over ModelBackends.

Every ModelInfer request is validated (model name, input names, datatypes, ranks, shapes, byte
lengths, batch limit) before it reaches the model; a bad request gets NOT_FOUND or
INVALID_ARGUMENT with a message naming the problem, and the server keeps serving. The same
path answers messages on ModelStreamInfer streams (Triton's streaming extension).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

import grpc

from nonn import __version__
from nonn.runtime.backends import BackendUnavailable, ModelBackend
from nonn.runtime.checks import at_least
from nonn.runtime.codec import TensorError, decode_request_inputs, make_parameter, output_tensor, requested_outputs, tensor_metadata
from nonn.runtime.datatypes import TensorSpec
from nonn.runtime.decode_guard import UndecodableRequest
from nonn.runtime.protocol import model_config_pb2, pb, service_pb2_grpc

__all__ = ["SERVICE_NAME", "SHA256_PARAMETER", "DEFAULT_MAX_STREAMS", "RequestError", "InferenceServicer"]

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
# The model configuration parameter that carries the sha256 of the served model file.
SHA256_PARAMETER = "sha256"
# Open ModelStreamInfer streams a server accepts at once; each holds a handler thread.
DEFAULT_MAX_STREAMS = 8


class RequestError(Exception):
    """A request the server refuses: the gRPC status and a message naming the problem."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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
        at_least(0, max_streams=max_streams)
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
            inputs=[tensor_metadata(spec) for spec in backend.inputs],
            outputs=[tensor_metadata(spec) for spec in backend.outputs],
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
        if backend.sha256:  # which model file this is: a client can check it against its bundle
            config.parameters[SHA256_PARAMETER].string_value = backend.sha256
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
                if isinstance(request, UndecodableRequest):
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


# The optional parts of the protocol this server does not offer: UNIMPLEMENTED, with a message.
for _method in (
    "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
    "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings",
):  # fmt: skip
    setattr(InferenceServicer, _method, _not_supported(_method))
del _method
