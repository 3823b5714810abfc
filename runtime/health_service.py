"""A device's grpc.health.v1 service: grpc_health's servicer, with status pushes off its lock.

grpc_health's `HealthServicer` sends a status to a Watch stream while holding its lock, and each
send waits for gRPC's completion-queue thread. That same thread runs a cancelled Watch's close
callback, which takes the lock. A client cancelling a Watch just as the server stops (every
aggregator watches its devices) therefore deadlocked `stop()`: the send waited for the queue
thread, the queue thread for the lock. Here, state changes happen under the lock and only queue
the pushes; one sender thread makes them, in order, without the lock.
"""

from __future__ import annotations

import queue
import threading

from grpc_health.v1 import health, health_pb2

__all__ = ["HealthService"]

# How long stopping waits for NOT_SERVING to reach the watchers before the server goes down.
SHUTDOWN_PUSH_S = 1.0


class HealthService(health.HealthServicer):
    """grpc.health.v1 Check and Watch (non-blocking: a Watch holds no handler thread)."""

    def __init__(self) -> None:
        super().__init__()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="nonn-health-push", daemon=True)
        self._sender.start()

    def Watch(self, request, context, send_response_callback=None):
        if send_response_callback is None:  # a server without non-blocking handlers
            return super().Watch(request, context)
        service = request.service
        with self._lock:
            status = self._server_status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            self._send_response_callbacks.setdefault(service, set()).add(send_response_callback)
            self._outbox.put((send_response_callback, status))
            context.add_callback(self._on_close_callback(send_response_callback, service))
        return None

    def set(self, service: str, status: int) -> None:
        with self._lock:
            if self._gracefully_shutting_down:
                return
            self._server_status[service] = status
            for callback in self._send_response_callbacks.get(service, ()):
                self._outbox.put((callback, status))

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good (later `set` calls are ignored); waits briefly for the pushes."""
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        with self._lock:
            if self._gracefully_shutting_down:
                return
            for service in self._server_status:
                self._server_status[service] = not_serving
                for callback in self._send_response_callbacks.get(service, ()):
                    self._outbox.put((callback, not_serving))
            self._gracefully_shutting_down = True
        self.flush(SHUTDOWN_PUSH_S)

    def flush(self, timeout_s: float) -> bool:
        """Wait until every push queued so far was made; False if that took longer than timeout_s."""
        done = threading.Event()
        self._outbox.put((lambda _: done.set(), None))
        return done.wait(timeout_s)

    def _send_loop(self) -> None:
        while True:
            callback, status = self._outbox.get()
            try:
                callback(None if status is None else health_pb2.HealthCheckResponse(status=status))
            except Exception:  # a stream that ended between queueing and sending
                pass
