"""The device's health service pushes status changes without holding its lock.

A Watch stream's send waits for gRPC's completion-queue thread, and that thread runs a cancelled
Watch's close callback, which takes the servicer's lock. grpc_health's own servicer sends while
holding the lock, so a Watch cancelled as the server stops deadlocked `DeviceServer.stop()` (seen
as a 60 s test timeout on a loaded machine). The fake stream below completes its send only after
another thread has taken the lock, as the queue thread must.
"""

from __future__ import annotations

import threading

import pytest
from grpc_health.v1 import health, health_pb2

from nonn.runtime.health_service import HealthService

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class QueueBoundStream:
    """A Watch stream whose send returns once another thread could take the servicer's lock."""

    def __init__(self, servicer: health.HealthServicer) -> None:
        self.servicer = servicer
        self.received: list[int] = []
        self.stuck = False

    def send(self, response) -> None:
        if response is None:
            return
        taken = threading.Event()

        def queue_thread() -> None:
            with self.servicer._lock:  # what a Watch's close callback does on the queue thread
                taken.set()

        threading.Thread(target=queue_thread, daemon=True).start()
        if not taken.wait(2.0):
            self.stuck = True
        self.received.append(response.status)


def watch(servicer: health.HealthServicer) -> QueueBoundStream:
    stream = QueueBoundStream(servicer)

    class Context:
        def add_callback(self, callback) -> None:
            pass

    servicer.Watch(health_pb2.HealthCheckRequest(service="student_0"), Context(), stream.send)
    return stream


@pytest.mark.parametrize("change", ["set", "enter_graceful_shutdown"])
def test_status_pushes_do_not_hold_the_lock(change):
    servicer = HealthService()
    servicer.set("student_0", SERVING)
    stream = watch(servicer)
    assert servicer.flush(5.0)
    assert stream.received == [SERVING] and not stream.stuck  # Watch's first reply, off the lock too
    if change == "set":
        servicer.set("student_0", NOT_SERVING)
        assert servicer.flush(5.0)
    else:
        servicer.enter_graceful_shutdown()  # waits for its pushes
    assert stream.received == [SERVING, NOT_SERVING]
    assert not stream.stuck, "the status was pushed while the servicer's lock was held"
    if change == "enter_graceful_shutdown":
        servicer.set("student_0", SERVING)  # ignored for good
        assert servicer.flush(5.0) and stream.received == [SERVING, NOT_SERVING]


def test_grpc_health_servicer_sends_under_its_lock():
    """What HealthService is for: the stock servicer's push waits on a thread that needs its lock."""
    servicer = health.HealthServicer()
    servicer.set("student_0", SERVING)
    stream = watch(servicer)
    assert stream.stuck  # Watch's own first reply
    stream.stuck = False
    servicer.set("student_0", NOT_SERVING)
    assert stream.stuck and stream.received == [SERVING, NOT_SERVING]


def test_pushes_keep_their_order_per_stream():
    servicer = HealthService()
    received: list[int] = []

    class Context:
        def add_callback(self, callback) -> None:
            pass

    servicer.Watch(health_pb2.HealthCheckRequest(service="s"), Context(), lambda r: r is not None and received.append(r.status))
    statuses = [SERVING, NOT_SERVING] * 50
    for status in statuses:
        servicer.set("s", status)
    assert servicer.flush(5.0)
    assert received == [health_pb2.HealthCheckResponse.SERVICE_UNKNOWN, *statuses]
