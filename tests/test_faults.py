"""Faults around the aggregator: restarts of the front end and of devices under load, hung and lying devices.

Covered elsewhere and not repeated here: a device that is down or slow (deadline), retries on
UNAVAILABLE, a reply with the wrong feature count, a device killed mid-stream (test_aggregator);
kill and restart inside `nonn simulate` (test_simulate).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from nonn.runtime.aggregator import Aggregator
from nonn.runtime.datatypes import TensorSpec
from nonn.runtime.server import DEFAULT_MAX_STREAMS, DEFAULT_QUEUED_CALLS, DeviceServer, InferenceServicer, InferOutput, ModelBackend, RequestError, student_backend

from runtime_testing import free_port, random_images, reference_logits, started

pytestmark = pytest.mark.timeout(90)

SHAPE = (1, 4, 4)
FEATURE_SIZES = (3, 2, 4)
# A client that notices a restarted server quickly (gRPC's default first backoff is 1 s).
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]


def images(n: int, seed: int = 0) -> np.ndarray:
    return random_images(n, SHAPE, seed)



def infer_request(x: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="ensemble")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def start_front_end(bundle, endpoints: list[str], port: int, ready: Path) -> subprocess.Popen:
    ready.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "nonn", "serve", "--bundle", str(bundle.root), "--aggregate", "--port", str(port),
           "--devices", ",".join(endpoints), "--deadline", "1.0", "--retries", "2", "--ready-file", str(ready)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the front end did not start"
        time.sleep(0.05)
    return proc


class Stream:
    """Client threads sending batch-1 requests back to back; records (start time, image seed, outcome)."""

    def __init__(self, address: str, clients: int = 2) -> None:
        self.address = address
        self.results: list[tuple[float, int, str, pb.ModelInferResponse | None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]
        self._count = 0

    def _run(self, client: int) -> None:
        with grpc.insecure_channel(self.address, FAST_RECONNECT) as channel:
            infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            while not self._stop.is_set():
                with self._lock:
                    seed = self._count
                    self._count += 1
                started_at = time.monotonic()
                try:
                    reply, code = infer(infer_request(images(1, seed)), timeout=3), "OK"
                except grpc.RpcError as exc:
                    reply, code = None, exc.code().name
                    time.sleep(0.02)  # a refused call returns at once; do not spin
                with self._lock:
                    self.results.append((started_at, seed, code, reply))

    def __enter__(self) -> "Stream":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def wait_for(self, count: int, timeout_s: float = 30) -> None:
        """Wait until `count` more requests were answered OK."""
        deadline = time.monotonic() + timeout_s
        since = time.monotonic()

        def answered() -> int:
            with self._lock:
                return sum(1 for t, _, code, _ in self.results if code == "OK" and t >= since)

        while answered() < count:
            assert time.monotonic() < deadline, f"only {answered()} of {count} answers arrived"
            time.sleep(0.02)


def check_answer(bundle, seed: int, reply: pb.ModelInferResponse) -> str:
    """Assert the reply's logits are the ensemble's for the devices that contributed; return the flags."""
    contributed = reply.parameters["contributed"].string_param
    missing = {k for k, flag in enumerate(contributed.split(",")) if flag == "0"}
    logits = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(1, -1)
    np.testing.assert_allclose(logits, reference_logits(bundle, images(1, seed), missing=missing), rtol=1e-5, atol=1e-5)
    return contributed


def test_restarted_front_end_is_unavailable_briefly_then_answers_again(bundle, devices, tmp_path):
    port = free_port()
    ready = tmp_path / "front.json"
    endpoints = [d.address for d in devices]
    front = start_front_end(bundle, endpoints, port, ready)
    try:
        with Stream(f"127.0.0.1:{port}") as stream:
            stream.wait_for(20)
            front.send_signal(signal.SIGKILL)  # a crash, not a clean stop
            front.wait()
            killed_at = time.monotonic()
            time.sleep(0.5)
            front = start_front_end(bundle, endpoints, port, ready)
            back_at = time.monotonic()
            stream.wait_for(20)
        codes = [code for _, _, code, _ in stream.results]
        assert set(codes) <= {"OK", "UNAVAILABLE"}, sorted(set(codes))
        assert "UNAVAILABLE" in codes
        unavailable = [t for t, _, code, _ in stream.results if code == "UNAVAILABLE"]
        # Refusals only around the outage; the clients reconnect on their own within a few seconds.
        assert min(unavailable) >= killed_at - 3.5 and max(unavailable) < back_at + 3
        last_refusal = max(unavailable)
        answered_after = [(seed, reply) for t, seed, code, reply in stream.results if code == "OK" and t > last_refusal]
        assert len(answered_after) >= 10
        for seed, reply in answered_after:
            assert check_answer(bundle, seed, reply) == "1,1,1"
    finally:
        front.terminate()
        front.wait(15)


@pytest.mark.slow
def test_device_killed_and_restarted_under_load_through_the_front_end(bundle, tmp_path):
    """Every request is answered: full, then degraded while a device is down, then full again."""
    from nonn.devices.fleet import LocalFleet

    from fleet_testing import tiny_profile

    with LocalFleet(bundle.root, [tiny_profile()] * 3, log_dir=tmp_path / "logs") as fleet:
        front = start_front_end(bundle, fleet.endpoints, 0, tmp_path / "front.json")
        try:
            address = json.loads((tmp_path / "front.json").read_text())["address"]
            with Stream(address, clients=3) as stream:
                stream.wait_for(15)
                fleet.kill(1)
                killed_at = time.monotonic()
                stream.wait_for(15)
                fleet.restart(1)  # same port, waits until it reports SERVING
                serving_at = time.monotonic()
                time.sleep(1.5)  # the front end's channel reconnects within its 1 s maximum backoff
                stream.wait_for(15)
        finally:
            front.terminate()
            front.wait(15)
    assert [code for _, _, code, _ in stream.results] == ["OK"] * len(stream.results)  # none lost
    flags = [(t, check_answer(bundle, seed, reply)) for t, seed, _, reply in stream.results]
    assert all(f == "1,1,1" for t, f in flags if t < killed_at - 0.5)
    assert any(f == "1,0,1" for _, f in flags)
    assert set(f for _, f in flags) <= {"1,1,1", "1,0,1"}
    after = [f for t, f in flags if t > serving_at + 1.5]
    assert len(after) >= 10 and all(f == "1,1,1" for f in after)


class BlackHole:
    """Accepts TCP connections and never says a word: a hung device (or a firewall eating packets)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_a_hung_device_is_bounded_by_the_deadline(bundle, devices):
    hole = BlackHole()
    try:
        endpoints = [d.address for d in devices]
        endpoints[1] = hole.address
        with Aggregator(bundle, endpoints, deadline_s=0.4, retries=2) as agg:
            for seed in range(3):
                t0 = time.perf_counter()
                result = agg.infer_sync(images(2, seed))
                elapsed = time.perf_counter() - t0
                assert result.contributed == [True, False, True]
                assert "DEADLINE_EXCEEDED" in result.errors[1] or "UNAVAILABLE" in result.errors[1], result.errors[1]
                assert elapsed < 1.5
                np.testing.assert_allclose(result.logits, reference_logits(bundle, images(2, seed), missing={1}), rtol=1e-5, atol=1e-5)
        assert hole.held, "the aggregator never reached the hung device"
    finally:
        hole.close()


class LyingServicer(InferenceServicer):
    """Serves the model, then damages each reply the way `kind` says."""

    def __init__(self, backends, kind: str) -> None:
        super().__init__(backends)
        self.kind = kind

    def infer_request(self, request):
        reply = super().infer_request(request)
        out = reply.outputs[0]
        if self.kind == "datatype":
            out.datatype = "FP64"
        elif self.kind == "name":
            out.name = "logits"
        elif self.kind == "truncated":
            reply.raw_output_contents[0] = reply.raw_output_contents[0][:-4]
        elif self.kind == "rows":
            out.shape[0] += 1
            reply.raw_output_contents[0] += reply.raw_output_contents[0][: out.shape[1] * 4]
        elif self.kind == "no contents":
            del reply.raw_output_contents[:]
        elif self.kind == "huge":
            reply.raw_output_contents.append(bytes(3 << 20))
        elif self.kind == "error":
            raise RequestError(grpc.StatusCode.INTERNAL, "the model crashed")
        return reply


@pytest.mark.parametrize(
    "kind, words",
    [
        ("datatype", "datatype FP64"),
        ("name", "no output 'features'"),
        ("truncated", "bytes of raw contents"),
        ("rows", "shape [3, 2]"),
        ("no contents", "values in fp32_contents"),
        ("huge", "RESOURCE_EXHAUSTED"),
        ("error", "INTERNAL: the model crashed"),
    ],
)
@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_a_device_with_a_bad_reply_is_counted_missing(bundle, devices, kind, words, transport):
    liar = DeviceServer(student_backend(bundle, "student_1"))
    liar.servicer = LyingServicer(liar.backends, kind)
    liar.start()
    try:
        endpoints = [d.address for d in devices]
        endpoints[1] = liar.address
        with Aggregator(bundle, endpoints, deadline_s=2, retries=2, transport=transport) as agg:
            result = agg.infer_sync(images(2))
            assert agg.infer_sync(images(1, 5)).contributed == [True, False, True]  # and it stays that way
        assert result.contributed == [True, False, True]
        assert result.attempts[1] == 1  # only UNAVAILABLE is retried
        assert words in result.errors[1], result.errors[1]
        np.testing.assert_allclose(result.logits, reference_logits(bundle, images(2), missing={1}), rtol=1e-5, atol=1e-5)
    finally:
        liar.stop(0)


class SleepyBackend(ModelBackend):
    """Answers zeros after `delay_s`: a device that is busy with every call."""

    def __init__(self, delay_s: float) -> None:
        self.name = "student_0"
        self.inputs = [TensorSpec("input", (-1, *SHAPE))]
        self.outputs = [TensorSpec("features", (-1, 3))]
        self.delay_s = delay_s
        self.concurrency = 2

    def infer(self, inputs, outputs):
        time.sleep(self.delay_s)
        return InferOutput({"features": np.zeros((inputs["input"].shape[0], 3), np.float32)})


def test_a_flood_of_calls_is_refused_beyond_the_cap_instead_of_queued_in_memory():
    assert DeviceServer(SleepyBackend(0)).max_concurrent_rpcs == 2 + 4 + DEFAULT_MAX_STREAMS + DEFAULT_QUEUED_CALLS
    server = started(DeviceServer(SleepyBackend(0.5), handler_threads=2, max_concurrent_rpcs=5, max_streams=0))
    try:
        request = pb.ModelInferRequest(model_name="student_0")
        request.inputs.add(name="input", datatype="FP32", shape=[1, *SHAPE])
        request.raw_input_contents.append(images(1).tobytes())
        with grpc.insecure_channel(server.address) as channel:
            infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            calls = [infer.future(request, timeout=10) for _ in range(20)]
            codes = [call.code() for call in calls]
            assert codes.count(grpc.StatusCode.OK) == 5
            assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 15
            assert list(infer(request, timeout=10).outputs[0].shape) == [1, 3]  # and it serves again
    finally:
        server.stop(0)
