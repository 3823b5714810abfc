"""Request bytes that do not parse are refused from inside the handler, not by grpcio.

Left to itself, grpcio answers such a request with INTERNAL and (1.85) keeps about 19 KB of
server memory for every one: a peer sending garbage could grow a device until it runs out of
memory. With DecodeGuard decoding never fails inside gRPC; the handler aborts instead, which
releases the call like any other refused request.
"""

from __future__ import annotations

from typing import Any

import grpc

__all__ = ["UndecodableRequest", "DecodeGuard"]


class UndecodableRequest:
    """Stands in for request bytes that do not parse as the RPC's message."""

    def __init__(self, message_type: str, error: Exception) -> None:
        self.message_type = message_type
        self.error = error

    def message(self) -> str:
        return f"the request bytes are not a valid {self.message_type} message ({self.error})"


class DecodeGuard(grpc.ServerInterceptor):
    """Answer request bytes that do not parse with INVALID_ARGUMENT from inside the handler.

    A streaming handler marked `handles_undecodable` gets the UndecodableRequest in its request
    iterator and answers it in-stream; every other handler aborts with INVALID_ARGUMENT.
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
                return UndecodableRequest(message_name, exc)

        def guarded(behavior):
            def call(request, context, *callbacks):
                if isinstance(request, UndecodableRequest):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
                return behavior(request, context, *callbacks)

            # A handler that sends its responses through a callback (grpc.health.v1 Watch) stays
            # one: it then holds no server thread for as long as a client watches.
            for name in ("experimental_non_blocking", "experimental_thread_pool"):
                if hasattr(behavior, name):
                    setattr(call, name, getattr(behavior, name))
            return call

        def guarded_stream(behavior):
            # A streaming handler marked `handles_undecodable` answers bad messages in-stream.
            if getattr(behavior, "handles_undecodable", False):
                return behavior

            def call(request_iterator, context):
                def checked():
                    for request in request_iterator:
                        if isinstance(request, UndecodableRequest):
                            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
                        yield request

                return behavior(checked(), context)

            return call

        # Rebuilt with grpc's public constructors: the request deserializer never fails.
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(guarded(handler.unary_unary), safe_deserialize, handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(guarded(handler.unary_stream), safe_deserialize, handler.response_serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(guarded_stream(handler.stream_unary), safe_deserialize, handler.response_serializer)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(guarded_stream(handler.stream_stream), safe_deserialize, handler.response_serializer)
        return handler
