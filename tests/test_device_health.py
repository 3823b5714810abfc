"""Health-aware fan-out: a device that is down is skipped at once, probed, and let back in;
replicated students answer once each; devices must serve the model the bundle names."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import time

import numpy as np
import pytest

from nonn.cli import main
from nonn.runtime.aggregator import AggregationError, Aggregator, DeviceMismatchError
from nonn.runtime.backends import InferOutput, ModelBackend, OnnxBackend
from nonn.runtime.health import DeviceHealth, DeviceState
from nonn.runtime.model_loading import load_model, student_backend
from nonn.runtime.server import DeviceServer

from runtime_testing import free_port, random_images, reference_logits, spawn_device, started, tiny_student

pytestmark = pytest.mark.timeout(120)

SHAPE = (1, 4, 4)
FEATURE_SIZES = (3, 2)


def images(n: int, seed: int = 0) -> np.ndarray:
    return random_images(n, SHAPE, seed)


def assert_answer(bundle, result, x) -> None:
    missing = {k for k, ok in enumerate(result.contributed) if not ok}
    np.testing.assert_allclose(result.logits, reference_logits(bundle, x, missing=missing), rtol=1e-5, atol=1e-5)


def wait_until(condition, timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.05)


# --------------------------------------------------------------------------- the breaker itself


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_goes_down_after_failures_in_a_row_and_back_through_one_trial():
    clock, events = Clock(), []
    health = DeviceHealth("student_1 at d:1", failures_to_down=3, clock=clock, on_event=events.append)
    assert health.admit() and not health.failed("DEADLINE_EXCEEDED") and health.state is DeviceState.SUSPECT
    health.succeeded()  # a success in between resets the count
    assert health.state is DeviceState.HEALTHY and health.failures == 0
    assert [health.failed("DEADLINE_EXCEEDED") for _ in range(3)] == [False, False, True]
    assert health.state is DeviceState.DOWN and not health.admit() and health.skipped == 1
    clock.now += 2.0
    assert "down since 2.0 s ago (DEADLINE_EXCEEDED)" in health.why_skipped()
    health.serving_again()  # a health check said SERVING: one trial request, the others still skip
    assert health.state is DeviceState.HALF_OPEN and health.admit() and not health.admit()
    assert health.failed("UNAVAILABLE: connection refused")  # the trial failed: down again
    health.serving_again()
    assert health.admit()
    health.succeeded()
    assert health.state is DeviceState.HEALTHY and health.admit()
    assert [e.state for e in events] == ["suspect", "healthy", "suspect", "down", "half-open", "down", "half-open", "healthy"]
    # A device that cannot be reached at all goes down on the first failure.
    assert DeviceHealth("d", failures_to_down=3).failed("UNAVAILABLE", unreachable=True)


# --------------------------------------------------------------------------- down, probed, back


def test_a_dead_device_is_skipped_at_once_probed_and_used_again_after_a_restart(bundle, devices, caplog):
    port = free_port()
    device = started(DeviceServer(student_backend(bundle, "student_1"), port=port))
    endpoints = [devices[0].address, device.address]
    caplog.set_level(logging.WARNING)
    try:
        with Aggregator(bundle, endpoints, deadline_s=2.0, retries=2) as agg:
            assert agg.infer_sync(images(1)).contributed == [True, True]
            device.stop(0)
            first = agg.infer_sync(images(1, 1))  # finds the device gone
            assert not first.contributed[1] and agg.devices[1].health.down
            skipped = [agg.infer_sync(images(1, seed)) for seed in range(2, 6)]
            for result in skipped:  # not called at all while it is down
                assert result.skipped == [False, True] and result.attempts[1] == 0 and result.bytes_sent[1] == 0
                assert "skipped: the device is down" in result.errors[1]
            device = started(DeviceServer(student_backend(bundle, "student_1"), port=port))
            wait_until(lambda: agg.infer_sync(images(1, 7)).contributed[1], what="the device's return")
            result = agg.infer_sync(images(2, 8))
            assert_answer(bundle, result, images(2, 8))
            assert result.contributed == [True, True]
            states = [e.state for e in agg.health_events if e.device.startswith("student_1")]
    finally:
        device.stop(0)
    assert states[-3:] == ["down", "half-open", "healthy"] and states.count("down") == 1
    for r, seed in [(first, 1), *zip(skipped, range(2, 6))]:
        assert_answer(bundle, r, images(1, seed))
    lost = [r for r in caplog.records if "lost" in r.getMessage()]
    back = [r for r in caplog.records if "is back" in r.getMessage()]
    assert len(lost) == 1 and len(back) == 1 and "student_1" in lost[0].getMessage()
    assert all(r.levelno == logging.WARNING for r in lost + back)


def test_strict_mode_fails_at_once_while_a_device_is_down(bundle, devices):
    endpoints = [devices[0].address, f"127.0.0.1:{free_port()}"]
    with Aggregator(bundle, endpoints, deadline_s=2.0, retries=0, strict=True) as agg:
        with pytest.raises(AggregationError, match="student_1"):
            agg.infer_sync(images(1))
        with pytest.raises(AggregationError, match=r"strict mode: student_1 at 127\.0\.0\.1:\d+: skipped: the device is down"):
            agg.infer_sync(images(1))  # refused before any call: nothing waits for the deadline
        assert agg.devices[1].health.skipped == 1 and agg.devices[1].in_flight == 0


def test_cli_strict_infer_with_a_device_down_is_one_error_line(bundle, devices, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((2, *SHAPE[1:]), np.uint8))
    code = main(["infer", "--bundle", str(bundle.root), "--devices", f"{devices[0].address},127.0.0.1:{free_port()}",
                 "--input", str(tmp_path / "x.npy"), "--strict", "--retries", "0"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("nonn: error:")]
    assert len(errors) == 1 and "strict mode" in errors[0] and "student_1" in errors[0]


def test_a_device_killed_mid_stream_leaves_no_traceback_and_one_line_each_way(bundle, devices, tmp_path):
    """A real device process killed (SIGKILL) and restarted under a stream of requests: the
    client's output has one line when it is lost, one when it is back, and nothing else of it."""
    script = (
        "import asyncio, logging, sys, time, numpy as np\n"
        "from nonn.runtime.aggregator import Aggregator\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "async def main():\n"
        "    async with Aggregator(sys.argv[1], sys.argv[2:], deadline_s=1.0) as agg:\n"
        "        health, went_down, give_up = agg.devices[1].health, False, time.monotonic() + 60\n"
        "        print('streaming', flush=True)\n"
        "        while time.monotonic() < give_up and not (went_down and health.state.value == 'healthy'):\n"
        "            await asyncio.gather(*(agg.infer(np.zeros((1, 1, 4, 4), np.float32)) for _ in range(4)))\n"
        "            went_down = went_down or health.down\n"
        "            await asyncio.sleep(0.01)\n"
        "asyncio.run(main())\n"
    )
    ready = tmp_path / "ready.json"
    device = spawn_device(bundle, "student_1", ready)
    address = json.loads(ready.read_text())["address"]
    client = subprocess.Popen([sys.executable, "-c", script, str(bundle.root), devices[0].address, address],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    restarted = None
    try:
        assert client.stdout.readline().strip() == "streaming"
        time.sleep(0.5)
        device.kill()
        device.wait()
        restarted = spawn_device(bundle, "student_1", ready, port=int(address.rsplit(":", 1)[1]))
        output, _ = client.communicate(timeout=90)
    finally:
        for proc in (client, device, restarted):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert client.returncode == 0, output
    assert "Traceback" not in output and "never retrieved" not in output, output
    lines = output.splitlines()
    assert len([line for line in lines if "student_1" in line and "lost" in line]) == 1, output
    assert len([line for line in lines if "student_1" in line and "is back" in line]) == 1, output


# --------------------------------------------------------------------------- which model a device serves


def test_a_device_serving_another_model_is_refused_naming_both_hashes(bundle, devices, tmp_path, capsys):
    other = tiny_student(tmp_path / "other.onnx", 2, SHAPE, seed=99)  # same name and I/O, other weights
    impostor = started(DeviceServer(OnnxBackend(load_model(other), "student_1")))
    try:
        endpoints = [devices[0].address, impostor.address]
        with Aggregator(bundle, endpoints) as agg:
            with pytest.raises(DeviceMismatchError) as err:
                agg.verify_devices_sync()
        message = str(err.value)
        assert impostor.address in message and bundle.students[1].sha256 in message
        assert impostor.backends[0].sha256 in message and bundle.students[1].sha256 != impostor.backends[0].sha256
        np.save(tmp_path / "x.npy", np.zeros((2, *SHAPE[1:]), np.uint8))
        code = main(["infer", "--bundle", str(bundle.root), "--devices", ",".join(endpoints), "--input", str(tmp_path / "x.npy")])
        err_text = capsys.readouterr().err
        assert code == 2 and "nonn: error: a device serves another model than the bundle names" in err_text
        assert "Traceback" not in err_text
    finally:
        impostor.stop(0)


def test_a_server_that_does_not_report_the_sha256_gets_a_warning_not_a_refusal(bundle, devices):
    third_party = student_backend(bundle, "student_1")
    third_party.sha256 = None  # like a server whose configuration names no sha256
    server = started(DeviceServer(third_party))
    try:
        with Aggregator(bundle, [devices[0].address, server.address]) as agg:
            warnings = agg.verify_devices_sync()
            assert len(warnings) == 1 and "does not report its model's sha256" in warnings[0]
            assert agg.infer_sync(images(1)).contributed == [True, True]
    finally:
        server.stop(0)


def test_device_servers_report_the_model_sha256_in_their_configuration(bundle, devices):
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(devices[1].address)
    try:
        config = client.get_model_config("student_1").config
    finally:
        client.close()
    assert config.parameters["sha256"].string_value == bundle.students[1].sha256


# --------------------------------------------------------------------------- replicas


class SlowBackend(ModelBackend):
    """A student_0 stand-in that answers correct features after `delay_s`."""

    def __init__(self, bundle, delay_s: float) -> None:
        inner = student_backend(bundle, "student_0")
        self.inner, self.delay_s, self.name = inner, delay_s, "student_0"
        self.inputs, self.outputs = inner.inputs, inner.outputs

    def infer(self, inputs, outputs) -> InferOutput:
        time.sleep(self.delay_s)
        return self.inner.infer(inputs, outputs)


@contextlib.contextmanager
def replicated_fleet(bundle, first_replica_of_student_0=None):
    """Two devices per student (student 0's first one may be given); endpoints student by student."""
    servers = [
        started(DeviceServer(first_replica_of_student_0 or student_backend(bundle, "student_0"))),
        started(DeviceServer(student_backend(bundle, "student_0"))),
        started(DeviceServer(student_backend(bundle, "student_1"))),
        started(DeviceServer(student_backend(bundle, "student_1"))),
    ]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop(0)


def test_replicas_answer_once_per_student_and_cover_a_lost_device_each(bundle):
    with replicated_fleet(bundle) as servers:
        with Aggregator(bundle, [s.address for s in servers], replicas=2, deadline_s=2.0) as agg:
            full = agg.infer_sync(images(3))
            servers[0].stop(0)
            servers[3].stop(0)  # one device of each pair
            results = [agg.infer_sync(images(2, seed)) for seed in range(6)]
    assert_answer(bundle, full, images(3))
    assert full.contributed == [True, True] and len(full.devices) == 4
    for seed, result in enumerate(results):
        assert result.contributed == [True, True], result.errors  # never degraded
        assert result.answered_by == [1, 2]  # the live replica of each pair
        assert_answer(bundle, result, images(2, seed))
    assert results[-1].skipped == [True, False, False, True]


@pytest.mark.parametrize("hedge", [True, False])
def test_a_slow_replica_is_hedged_to_the_other_one(bundle, hedge):
    with replicated_fleet(bundle, SlowBackend(bundle, delay_s=3.0)) as servers:
        with Aggregator(bundle, [s.address for s in servers], replicas=2, deadline_s=1.0, hedge=hedge) as agg:
            result = agg.infer_sync(images(2))
            hedges = agg.students[0].hedges
    assert_answer(bundle, result, images(2))  # one answer per student, never both replicas' features
    if hedge:  # the second replica was asked when the first had not answered in its usual time
        assert result.contributed == [True, True] and result.answered_by[0] == 1 and hedges == 1
    else:  # only the slow replica was asked, and it missed the deadline
        assert not result.contributed[0] and "DEADLINE_EXCEEDED" in result.errors[0] and hedges == 0


def test_a_replica_that_lost_to_a_hedge_still_teaches_its_answer_time(bundle):
    """The hedged-away call runs on to the deadline (its answer dropped), so the slow replica's
    estimate reaches the deadline, not just the moment the hedge won; the next request goes to
    the fast replica first, without a hedge."""
    with replicated_fleet(bundle, SlowBackend(bundle, delay_s=3.0)) as servers:
        with Aggregator(bundle, [s.address for s in servers], replicas=2, deadline_s=1.0) as agg:
            first = agg.infer_sync(images(2))
            time.sleep(1.2)  # past the first request's deadline
            slow, fast = agg.devices[0], agg.devices[1]
            learned = slow.latency_s
            second = agg.infer_sync(images(2, 1))
            hedges = agg.students[0].hedges
    assert first.answered_by[0] == 1 and second.answered_by[0] == 1
    assert learned >= 0.9, f"the slow replica's answer time was learned as {learned:.3f} s"
    assert learned > 10 * fast.latency_s
    assert hedges == 1  # the second request was not hedged: it went to the fast replica first
    assert first.bytes_sent[0] > 0  # the request the slow replica lost is still counted as sent
