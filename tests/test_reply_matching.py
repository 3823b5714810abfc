"""Every answer the aggregator returns is computed from the request's own image.

A device that answers late, out of order, or without echoing request ids must never make one
request's features stand in for another's: a late reply is dropped (and counted), the request
it would have answered gets its own reply or is marked missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading

import grpc
import numpy as np
import pytest

from nonn.runtime.aggregator import Aggregator
from nonn.runtime.protocol import pb
from nonn.runtime.server import DeviceServer, InferenceServicer, student_backend

from runtime_testing import random_images, reference_logits

pytestmark = pytest.mark.timeout(90)

SHAPE = (1, 4, 4)
SCRIPTED = 1  # the student whose device answers as the test scripts it


class ScriptedStreamServicer(InferenceServicer):
    """ModelStreamInfer as scripted: hold replies until `hold` requests have arrived, send
    those in `order` (indices into the held ones), then answer every later request at once.
    `echo_ids=False` leaves every reply's id empty, as a server that does not echo ids would."""

    def __init__(self, backends, hold: int, order: list[int], echo_ids: bool = True) -> None:
        super().__init__(backends)
        assert sorted(order) == list(range(hold))
        self.hold, self.order, self.echo_ids = hold, order, echo_ids

    def _reply(self, request) -> pb.ModelStreamInferResponse:
        response = self.infer_request(request)
        if not self.echo_ids:
            response.id = ""
        return pb.ModelStreamInferResponse(infer_response=response)

    def ModelStreamInfer(self, request_iterator, context):
        arrived: queue.Queue = queue.Queue()

        def read() -> None:
            with contextlib.suppress(grpc.RpcError):  # the stream ended
                for request in request_iterator:
                    arrived.put(request)

        threading.Thread(target=read, daemon=True).start()
        held: list = []
        while context.is_active():
            try:
                request = arrived.get(timeout=0.05)
            except queue.Empty:
                continue
            if len(held) == self.hold:
                yield self._reply(request)
                continue
            held.append(request)
            if len(held) == self.hold:
                for index in self.order:
                    yield self._reply(held[index])


@contextlib.contextmanager
def scripted_fleet(bundle, devices, **script):
    """The fleet's endpoints with student SCRIPTED served by a ScriptedStreamServicer."""
    server = DeviceServer(student_backend(bundle, SCRIPTED))
    server.servicer = ScriptedStreamServicer(server.backends, **script)
    server.start()
    try:
        endpoints = [d.address for d in devices]
        endpoints[SCRIPTED] = server.address
        yield endpoints
    finally:
        server.stop(0)


def image(seed: int) -> np.ndarray:
    return random_images(1, SHAPE, seed)


def assert_own_answer(bundle, result, x) -> None:
    """The logits are the ensemble's for `x`, with zeros for each student marked missing."""
    missing = {k for k, ok in enumerate(result.contributed) if not ok}
    np.testing.assert_allclose(result.logits, reference_logits(bundle, x, missing=missing), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("echo_ids", [True, False], ids=["ids-echoed", "no-ids"])
def test_a_reply_after_the_deadline_never_answers_the_next_request(bundle, devices, echo_ids):
    # The device holds its reply to request 1 until request 2 has arrived, so request 1 reaches
    # its deadline; then it answers request 1 (late) and request 2 on the same stream.
    with scripted_fleet(bundle, devices, hold=2, order=[0, 1], echo_ids=echo_ids) as endpoints:

        async def scenario():
            async with Aggregator(bundle, endpoints, deadline_s=1.0, transport="stream") as agg:
                first = await agg.infer(image(1))
                second = await agg.infer(image(2))
                third = await agg.infer(image(3))
                return first, second, third, agg

        first, second, third, agg = asyncio.run(scenario())
    for result, seed in ((first, 1), (second, 2), (third, 3)):
        assert_own_answer(bundle, result, image(seed))
    assert not first.contributed[SCRIPTED] and "DEADLINE_EXCEEDED" in first.errors[SCRIPTED]
    assert third.contributed == [True] * 4, third.errors
    assert agg.unmatched_replies[SCRIPTED] == 1 and sum(agg.unmatched_replies) == 1


def test_replies_out_of_order_with_a_late_one_among_them(bundle, devices):
    # Request 0 reaches its deadline; requests 1-4 are then in flight together, and the device
    # answers in the order 4, 0 (late), 2, 1, 3.
    with scripted_fleet(bundle, devices, hold=5, order=[4, 0, 2, 1, 3]) as endpoints:

        async def scenario():
            async with Aggregator(bundle, endpoints, deadline_s=1.0, transport="stream") as agg:
                late = await agg.infer(image(10))
                rest = await asyncio.gather(*(agg.infer(image(11 + i)) for i in range(4)))
                return [late, *rest], agg

        results, agg = asyncio.run(scenario())
    for i, result in enumerate(results):
        assert_own_answer(bundle, result, image(10 + i))
    assert not results[0].contributed[SCRIPTED]
    assert agg.unmatched_replies[SCRIPTED] == 1


class StaleUnaryServicer(InferenceServicer):
    """ModelInfer that answers each request with the reply to the one before (a stale cache)."""

    def __init__(self, backends) -> None:
        super().__init__(backends)
        self.previous = None

    def ModelInfer(self, request, context):
        reply = self.infer_request(request)
        reply, self.previous = self.previous or reply, reply
        return reply


def test_a_unary_reply_to_another_request_is_not_used(bundle, devices):
    server = DeviceServer(student_backend(bundle, SCRIPTED))
    server.servicer = StaleUnaryServicer(server.backends)
    server.start()
    try:
        endpoints = [d.address for d in devices]
        endpoints[SCRIPTED] = server.address
        with Aggregator(bundle, endpoints, deadline_s=5.0, transport="unary") as agg:
            first = agg.infer_sync(image(20))
            second = agg.infer_sync(image(21))
    finally:
        server.stop(0)
    assert_own_answer(bundle, first, image(20))
    assert_own_answer(bundle, second, image(21))
    assert first.contributed == [True] * 4
    assert not second.contributed[SCRIPTED] and "is for request '0', not '1'" in second.errors[SCRIPTED]
