"""The aggregator against real device servers on loopback: parity, degraded/strict, deadline, retry, kill."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from nonn.cli import main
from nonn.runtime.aggregator import AggregationError, Aggregator
from nonn.runtime.ensemble_backend import AggregatorBackend
from nonn.runtime.onnx_model import OnnxModel
from nonn.runtime.server import DeviceServer, InferenceServicer, InferOutput, ModelBackend, OnnxBackend, RequestError, student_backend

from runtime_testing import free_port, random_images, reference_logits, spawn_device, started, tiny_student

pytestmark = pytest.mark.timeout(90)

SHAPE = (1, 4, 4)


def batch(n: int, seed: int = 0) -> np.ndarray:
    return random_images(n, SHAPE, seed)



@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_results_equal_in_process_onnx_runtime(bundle, devices, transport):
    x = batch(5)
    with Aggregator(bundle.root, [d.address for d in devices], deadline_s=5, transport=transport) as agg:
        assert agg.check_devices_sync() == []
        result = agg.infer_sync(x)
        assert agg.transports == [transport] * 4
    np.testing.assert_allclose(result.logits, reference_logits(bundle, x), rtol=1e-5, atol=1e-5)
    assert result.contributed == [True] * 4 and not result.degraded
    assert result.attempts == [1] * 4
    # Serialized sizes: every request carries the 5 images, every reply its features.
    for size, sent, received in zip(bundle.feature_sizes, result.bytes_sent, result.bytes_received):
        assert 5 * 16 * 4 < sent < 5 * 16 * 4 + 200
        assert 5 * size * 4 < received < 5 * size * 4 + 200


def test_async_api_and_concurrent_requests(bundle, devices):
    async def run():
        async with Aggregator(bundle, [d.address for d in devices]) as agg:
            return await asyncio.gather(*(agg.infer(batch(2, seed)) for seed in range(8)))

    results = asyncio.run(run())
    for seed, result in enumerate(results):
        np.testing.assert_allclose(result.logits, reference_logits(bundle, batch(2, seed)), rtol=1e-5, atol=1e-5)


def test_down_device_degrades_or_fails_in_strict_mode(bundle, devices):
    endpoints = [d.address for d in devices]
    endpoints[2] = f"127.0.0.1:{free_port()}"  # nobody listens there
    x = batch(3)
    with Aggregator(bundle, endpoints, deadline_s=2, retries=1) as agg:
        result = agg.infer_sync(x)
        # Nobody listens: the device is down at once, not retried, and skipped from then on.
        assert "UNAVAILABLE" in result.errors[2] and "the device is down" in result.errors[2]
        again = agg.infer_sync(x)
        assert again.skipped == [False, False, True, False] and again.attempts[2] == 0
        assert "skipped: the device is down" in again.errors[2]
    for r in (result, again):
        assert r.contributed == [True, True, False, True]
        assert r.bytes_sent[2] == r.bytes_received[2] == 0  # nothing reached a server
        np.testing.assert_allclose(r.logits, reference_logits(bundle, x, missing={2}), rtol=1e-5, atol=1e-5)
    with Aggregator(bundle, endpoints, deadline_s=2, retries=0, strict=True) as agg:
        with pytest.raises(AggregationError, match="student_2"):
            agg.infer_sync(x)
        with pytest.raises(AggregationError, match="strict mode: student_2 at .*: skipped: the device is down"):
            agg.infer_sync(x)  # fails at once while the device is down


class SlowBackend(ModelBackend):
    def __init__(self, name: str, features: int, delay_s: float) -> None:
        self.name, self.delay_s = name, delay_s
        from nonn.runtime.datatypes import TensorSpec

        self.inputs = [TensorSpec("input", (-1, *SHAPE))]
        self.outputs = [TensorSpec("features", (-1, features))]

    def infer(self, inputs, outputs):
        time.sleep(self.delay_s)
        return InferOutput({"features": np.ones((inputs["input"].shape[0], self.outputs[0].shape[1]), np.float32)})


@contextlib.contextmanager
def slow_second_device(devices, delay_s: float):
    """The fleet's endpoints with student_1 served by a device that takes `delay_s` per request."""
    slow = started(DeviceServer(SlowBackend("student_1", 2, delay_s=delay_s)))
    try:
        endpoints = [d.address for d in devices]
        endpoints[1] = slow.address
        yield endpoints
    finally:
        slow.stop(0)


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_deadline_bounds_a_slow_device(bundle, devices, transport):
    with slow_second_device(devices, delay_s=2.0) as endpoints:
        with Aggregator(bundle, endpoints, deadline_s=0.3, transport=transport) as agg:
            t0 = time.perf_counter()
            result = agg.infer_sync(batch(1))
            elapsed = time.perf_counter() - t0
    assert result.contributed == [True, False, True, True]
    assert "DEADLINE_EXCEEDED" in result.errors[1]
    assert result.bytes_sent[1] == result.bytes_sent[0] and result.bytes_received[1] == 0
    assert elapsed < 1.5


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_a_caller_giving_up_is_not_turned_into_a_degraded_answer(bundle, devices, transport):
    # The request's deadline (5 s) is far off; the caller's own timeout (0.3 s) cancels it.
    # That cancellation must reach the caller, and the deadline timer must not fire later.
    with slow_second_device(devices, delay_s=1.0) as endpoints:

        async def scenario():
            async with Aggregator(bundle, endpoints, deadline_s=5, transport=transport) as agg:
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(agg.infer(batch(1)), 0.3)
                loop = asyncio.get_running_loop()
                assert not [h for h in loop._scheduled if not h.cancelled()]  # no armed deadline timer left (CPython loop)
                return await agg.infer(batch(1))

        result = asyncio.run(scenario())
    assert result.contributed == [True, True, True, True]


class FlakyServicer(InferenceServicer):
    """Refuses the first `failures` requests with UNAVAILABLE (streamed or not), then serves normally."""

    def __init__(self, backends, failures: int) -> None:
        super().__init__(backends)
        self.failures = failures
        self.calls = 0

    def infer_request(self, request):
        self.calls += 1
        if self.calls <= self.failures:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "warming up")
        return super().infer_request(request)


@pytest.mark.parametrize("transport", ["stream", "unary"])
@pytest.mark.parametrize("retries, ok", [(2, True), (1, False)])
def test_retry_on_unavailable(bundle, devices, retries, ok, transport):
    flaky = DeviceServer(student_backend(bundle, "student_0"))
    flaky.servicer = FlakyServicer(flaky.backends, failures=2)
    flaky.start()
    try:
        endpoints = [flaky.address] + [d.address for d in devices[1:]]
        with Aggregator(bundle, endpoints, deadline_s=5, retries=retries, backoff_s=0.01, transport=transport) as agg:
            result = agg.infer_sync(batch(2))
        assert result.contributed[0] is ok
        assert result.attempts[0] == retries + 1
        assert flaky.servicer.calls == retries + 1
        if ok:
            np.testing.assert_allclose(result.logits, reference_logits(bundle, batch(2)), rtol=1e-5, atol=1e-5)
        else:
            assert "UNAVAILABLE: warming up" in result.errors[0]
    finally:
        flaky.stop(0)


def test_wrong_reply_shape_is_not_used(bundle, devices, tmp_path):
    wrong = started(DeviceServer(OnnxBackend(OnnxModel(tiny_student(tmp_path / "w.onnx", 5, SHAPE)), "student_3")))
    try:
        endpoints = [d.address for d in devices[:3]] + [wrong.address]
        with Aggregator(bundle, endpoints) as agg:
            assert any("student_3" in p for p in agg.check_devices_sync())
            result = agg.infer_sync(batch(2))
        assert result.contributed == [True, True, True, False]
        assert "bad reply" in result.errors[3] and "[2, 3]" in result.errors[3]
    finally:
        wrong.stop(0)


def test_device_killed_mid_stream_gives_degraded_answers_and_loses_nothing(bundle, devices, tmp_path):
    proc = spawn_device(bundle, "student_3", tmp_path / "ready.json")
    try:
        endpoints = [d.address for d in devices[:3]] + [json.loads((tmp_path / "ready.json").read_text())["address"]]

        async def stream():
            results = []
            async with Aggregator(bundle, endpoints, deadline_s=1.0, retries=1) as agg:

                async def one(i):
                    if i == 12:
                        proc.send_signal(signal.SIGKILL)
                    return i, await agg.infer(batch(1, i))

                # 40 requests, 4 in flight at a time; the device dies during the stream.
                for start in range(0, 40, 4):
                    results += await asyncio.gather(*(one(i) for i in range(start, start + 4)))
            return results

        results = asyncio.run(stream())
    finally:
        proc.kill()
        proc.wait()
    assert [i for i, _ in results] == list(range(40))  # every request answered
    assert all(r.contributed[3] for i, r in results if i < 12)
    assert all(r.contributed == [True, True, True, False] for i, r in results[16:])
    for i, r in results:
        expected = reference_logits(bundle, batch(1, i), missing=set() if r.contributed[3] else {3})
        np.testing.assert_allclose(r.logits, expected, rtol=1e-5, atol=1e-5)


def test_ensemble_served_as_one_model_to_a_stock_client(bundle, devices):
    import tritonclient.grpc as triton

    agg = Aggregator(bundle, [d.address for d in devices[:3]] + [f"127.0.0.1:{free_port()}"], retries=0)
    front = started(DeviceServer(AggregatorBackend(agg)))
    try:
        client = triton.InferenceServerClient(front.address)
        assert client.is_model_ready("ensemble")
        meta = client.get_model_metadata("ensemble")
        assert list(meta.outputs[0].shape) == [-1, 5]
        x = batch(3)
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("ensemble", [tensor])
        np.testing.assert_allclose(result.as_numpy("logits"), reference_logits(bundle, x, missing={3}), rtol=1e-5, atol=1e-5)
        params = result.get_response().parameters
        assert params["contributed"].string_param == "1,1,1,0" and params["degraded"].bool_param
        client.close()
    finally:
        front.stop(0)


def test_cli_infer_json(bundle, devices, tmp_path, capsys):
    images = np.random.default_rng(3).integers(0, 256, size=(7, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    code = main(["infer", "--bundle", str(bundle.root), "--devices", ",".join(d.address for d in devices),
                 "--input", str(tmp_path / "images.npy"), "--batch-size", "3", "--json"])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    x = bundle.input_contract.prepare(images)
    assert report["predictions"] == reference_logits(bundle, x).argmax(1).tolist()
    assert report["batches"] == 3 and report["degraded_batches"] == 0
    assert [d["contributed_images"] for d in report["devices"]] == [7] * 4
    assert [d["transport"] for d in report["devices"]] == ["stream"] * 4


def test_bad_inputs_are_named(bundle, devices, tmp_path, capsys):
    with pytest.raises(ValueError, match="2 device endpoint"):
        Aggregator(bundle, "127.0.0.1:1,127.0.0.1:2")
    with pytest.raises(ValueError, match="not host:port"):
        Aggregator(bundle, ["a:1", "b:2", "c", "d:4"])
    with Aggregator(bundle, [d.address for d in devices]) as agg:
        with pytest.raises(ValueError, match="dimension 2 is 5"):
            agg.infer_sync(np.zeros((1, 1, 5, 4), np.float32))
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 3)))
    code = main(["infer", "--bundle", str(bundle.root), "--devices", ",".join(d.address for d in devices), "--input", str(tmp_path / "bad.npy")])
    assert code == 2 and "expected (N, 1, 4, 4)" in capsys.readouterr().err


def test_cli_serve_aggregate_front_end(bundle, devices, tmp_path):
    import tritonclient.grpc as triton

    streamed: queue.Queue = queue.Queue()
    ready = tmp_path / "front.json"
    cmd = [sys.executable, "-m", "nonn", "serve", "--bundle", str(bundle.root), "--aggregate", "--name", "nonn-ensemble",
           "--devices", ",".join(d.address for d in devices), "--port", "0", "--ready-file", str(ready),
           "--transport", "unary", "--max-streams", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client = triton.InferenceServerClient(json.loads(ready.read_text())["address"])
        x = batch(2, 7)
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("nonn-ensemble", [tensor])
        np.testing.assert_allclose(result.as_numpy("logits"), reference_logits(bundle, x), rtol=1e-5, atol=1e-5)
        assert result.get_response().parameters["contributed"].string_param == "1,1,1,1"
        # --max-streams 0: the front end offers no stream, and says so.
        client.start_stream(callback=lambda result, error: streamed.put(error))
        try:
            client.async_stream_infer("nonn-ensemble", [tensor])
        except triton.InferenceServerException:
            pass  # the refusal may have closed the stream already; it still reaches the callback
        error = streamed.get(timeout=10)
        client.stop_stream()
        assert error is not None and "open streams" in str(error), error
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_restarted_device_is_used_again(bundle, devices):
    port = free_port()
    device = started(DeviceServer(student_backend(bundle, "student_2"), port=port))
    endpoints = [d.address for d in devices]
    endpoints[2] = device.address
    # A generous deadline: the first call also connects to every device, which on a loaded machine
    # took longer than 0.5 s (all four lost, "tcp handshaker shutdown"). A stopped device answers
    # UNAVAILABLE at once, so the deadline does not slow the rest of the test.
    with Aggregator(bundle, endpoints, deadline_s=5.0, retries=1) as agg:
        assert agg.infer_sync(batch(1)).contributed[2]
        device.stop(0)
        assert not agg.infer_sync(batch(1)).contributed[2]
        device = started(DeviceServer(student_backend(bundle, "student_2"), port=port))
        try:
            deadline = time.monotonic() + 10
            while not (result := agg.infer_sync(batch(1))).contributed[2]:
                assert time.monotonic() < deadline, "the aggregator never reconnected"
                time.sleep(0.05)
            np.testing.assert_allclose(result.logits, reference_logits(bundle, batch(1)), rtol=1e-5, atol=1e-5)
        finally:
            device.stop(0)


def test_auto_transport_falls_back_to_unary_for_a_device_that_does_not_stream(bundle, devices):
    unary_only = started(DeviceServer(student_backend(bundle, "student_3"), max_streams=0))
    try:
        endpoints = [d.address for d in devices[:3]] + [unary_only.address]
        with Aggregator(bundle, endpoints, deadline_s=5, retries=0) as agg:
            for seed in range(3):
                result = agg.infer_sync(batch(2, seed))
                assert result.contributed == [True] * 4 and result.attempts == [1] * 4, result.errors
                np.testing.assert_allclose(result.logits, reference_logits(bundle, batch(2, seed)), rtol=1e-5, atol=1e-5)
            assert agg.transports == ["stream"] * 3 + ["unary"]
        with Aggregator(bundle, endpoints, deadline_s=5, retries=0, transport="stream") as agg:
            result = agg.infer_sync(batch(1))
        assert result.contributed == [True, True, True, False]
        # gRPC reports the refusal as INTERNAL when it races the first write (about 2% of the time).
        assert "RESOURCE_EXHAUSTED" in result.errors[3] or "INTERNAL: Internal error from Core" in result.errors[3]
    finally:
        unary_only.stop(0)


def test_a_restarting_device_is_skipped_until_it_serves_again_never_waited_for(bundle, devices):
    # A graceful stop says NOT_SERVING on the health service and ends the device's stream: the
    # requests in between may go without it (never with a wrong answer), and it is back soon.
    port = free_port()
    device = started(DeviceServer(student_backend(bundle, "student_1"), port=port))
    endpoints = [devices[0].address, device.address] + [d.address for d in devices[2:]]
    try:
        with Aggregator(bundle, endpoints, deadline_s=5, retries=5, backoff_s=0.05) as agg:
            assert agg.infer_sync(batch(1)).contributed == [True] * 4  # the stream is open
            device.stop(0)
            device = started(DeviceServer(student_backend(bundle, "student_1"), port=port))
            results = [agg.infer_sync(batch(2))]
            deadline = time.monotonic() + 10
            while not results[-1].contributed[1]:
                assert time.monotonic() < deadline, f"the restarted device was not used again: {results[-1].errors}"
                time.sleep(0.05)
                results.append(agg.infer_sync(batch(2)))
        for result in results:
            assert result.contributed[0] and result.contributed[2:] == [True, True]
            missing = set() if result.contributed[1] else {1}
            np.testing.assert_allclose(result.logits, reference_logits(bundle, batch(2), missing=missing), rtol=1e-5, atol=1e-5)
    finally:
        device.stop(0)


def test_coalescing_merges_queued_requests_and_keeps_answers_apart(bundle, devices):
    counted = DeviceServer(student_backend(bundle, "student_0"))
    counted.servicer = FlakyServicer(counted.backends, failures=0)
    counted.start()
    try:
        endpoints = [counted.address] + [d.address for d in devices[1:]]

        async def run():
            async with Aggregator(bundle, endpoints, coalesce=8, pipeline=1) as agg:
                return await asyncio.gather(*(agg.infer(batch(1 + seed % 2, seed)) for seed in range(16)))

        results = asyncio.run(run())
        for seed, result in enumerate(results):
            assert result.logits.shape == (1 + seed % 2, 5)
            np.testing.assert_allclose(result.logits, reference_logits(bundle, batch(1 + seed % 2, seed)), rtol=1e-5, atol=1e-5)
            assert result.contributed == [True] * 4
        assert counted.servicer.calls < 16  # fewer device calls than requests
        total_sent = sum(r.bytes_sent[0] for r in results)
        assert 24 * 16 * 4 < total_sent < 24 * 16 * 4 + 200 * counted.servicer.calls  # 24 images in all
    finally:
        counted.stop(0)


def test_a_batch_of_64_rgb_96x96_float_images_passes_grpcs_default_4_mb(tmp_path):
    """64 x 3 x 96 x 96 float32 is 7 MB, over gRPC's default 4 MB message limit: servers and
    channels size their limits from the bundle's input shape and the largest batch."""
    from runtime_testing import device_servers, make_bundle

    big = make_bundle(tmp_path / "big", feature_sizes=(2, 3), input_shape=(3, 96, 96), classes=4)
    x = random_images(64, (3, 96, 96), seed=5)
    assert x.nbytes > 4 << 20
    with device_servers(big) as servers, Aggregator(big, [s.address for s in servers], deadline_s=30, max_batch=64) as agg:
        result = agg.infer_sync(x)
    assert result.contributed == [True, True]
    np.testing.assert_allclose(result.logits, reference_logits(big, x), rtol=1e-4, atol=1e-3)
