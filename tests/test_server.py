"""The device server on loopback: protocol cycle, stock client, validation, limits, shutdown, integrity."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from nonn.cli import main
from nonn.runtime.datatypes import TensorSpec
from nonn.runtime.onnx_model import ModelIntegrityError, OnnxModel
from nonn.runtime.server import DeviceServer, InferOutput, ModelBackend, OnnxBackend

from runtime_testing import started, make_bundle, tiny_student

pytestmark = pytest.mark.timeout(60)

FEATURES = 3
SHAPE = (1, 4, 4)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return tiny_student(tmp_path_factory.mktemp("model") / "student.onnx", FEATURES, SHAPE)


@pytest.fixture(scope="module")
def server(model_path):
    srv = started(DeviceServer(OnnxBackend(OnnxModel(model_path), "student_0", max_batch=4)))
    yield srv
    srv.stop(0)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def good_request(batch: np.ndarray, model: str = "student_0") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id="req")
    request.inputs.add(name="input", datatype="FP32", shape=list(batch.shape))
    request.raw_input_contents.append(batch.astype(np.float32).tobytes())
    return request


def test_stock_tritonclient_health_metadata_and_infer(server, model_path):
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(server.address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("student_0")
    assert not client.is_model_ready("student_9")
    assert client.get_server_metadata().name == "nonn"
    meta = client.get_model_metadata("student_0")
    assert meta.versions == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, *SHAPE])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("features", "FP32", [-1, FEATURES])]
    config = client.get_model_config("student_0").config
    assert config.max_batch_size == 4 and list(config.input[0].dims) == list(SHAPE)

    x = np.random.default_rng(0).random((3, *SHAPE), dtype=np.float32)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("student_0", [tensor], outputs=[triton.InferRequestedOutput("features")])
    expected = OnnxModel(model_path).run({"input": x})["features"]
    np.testing.assert_array_equal(result.as_numpy("features"), expected)
    client.close()


def test_grpc_health_serving(server):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "student_0"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="other"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_watches_hold_no_handler_thread(model_path):
    """Clients that watch a device's health (every aggregator does) must not use up its threads."""
    server = started(DeviceServer(OnnxBackend(OnnxModel(model_path), "student_0"), handler_threads=2, max_streams=1))
    try:
        with grpc.insecure_channel(server.address) as channel:
            watches = [health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=20) for _ in range(8)]
            assert all(next(w).status == health_pb2.HealthCheckResponse.SERVING for w in watches)
            reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(good_request(np.ones((1, *SHAPE), np.float32)), timeout=10)
            assert list(reply.outputs[0].shape) == [1, FEATURES]
            for w in watches:
                w.cancel()
    finally:
        server.stop(0)


def test_typed_contents_are_accepted(stub, model_path):
    x = np.random.default_rng(1).random((2, *SHAPE), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="student_0")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    reply = stub.ModelInfer(request, timeout=5)
    got = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).reshape(list(reply.outputs[0].shape))
    np.testing.assert_allclose(got, OnnxModel(model_path).run({"input": x})["features"], rtol=1e-6)


def _mutate(kind: str) -> pb.ModelInferRequest:
    x = np.zeros((2, *SHAPE), np.float32)
    request = good_request(x)
    if kind == "unknown model":
        request.model_name = "student_7"
    elif kind == "unknown version":
        request.model_version = "2"
    elif kind == "wrong input name":
        request.inputs[0].name = "image"
    elif kind == "wrong datatype":
        request.inputs[0].datatype = "FP64"
    elif kind == "wrong rank":
        del request.inputs[0].shape[:]
        request.inputs[0].shape.extend([2, 16])
    elif kind == "wrong shape":
        request.inputs[0].shape[2] = 5
    elif kind == "byte length":
        request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    elif kind == "batch above limit":
        request = good_request(np.zeros((5, *SHAPE), np.float32))
    elif kind == "negative dimension":
        request.inputs[0].shape[0] = -2
    elif kind == "missing input":
        del request.inputs[:]
        del request.raw_input_contents[:]
    elif kind == "duplicate input":
        request.inputs.add().CopyFrom(request.inputs[0])
        request.raw_input_contents.append(request.raw_input_contents[0])
    elif kind == "raw count":
        request.raw_input_contents.append(b"")
    elif kind == "unknown output":
        request.outputs.add(name="logits")
    elif kind == "typed count":
        del request.raw_input_contents[:]
        request.inputs[0].contents.fp32_contents.extend([0.0] * 7)
    elif kind == "shared memory":
        request.inputs[0].parameters["shared_memory_region"].string_param = "region"
    elif kind == "unsupported datatype":
        request.inputs[0].datatype = "BYTES"
    return request


@pytest.mark.parametrize(
    "kind, code, words",
    [
        ("unknown model", grpc.StatusCode.NOT_FOUND, "student_7"),
        ("unknown version", grpc.StatusCode.NOT_FOUND, "version '2'"),
        ("wrong input name", grpc.StatusCode.INVALID_ARGUMENT, "unknown input 'image'"),
        ("wrong datatype", grpc.StatusCode.INVALID_ARGUMENT, "datatype FP64"),
        ("wrong rank", grpc.StatusCode.INVALID_ARGUMENT, "rank 2"),
        ("wrong shape", grpc.StatusCode.INVALID_ARGUMENT, "dimension 2 is 5, expected 4"),
        ("byte length", grpc.StatusCode.INVALID_ARGUMENT, "124 bytes"),
        ("batch above limit", grpc.StatusCode.INVALID_ARGUMENT, "batch size 5 is above"),
        ("negative dimension", grpc.StatusCode.INVALID_ARGUMENT, "negative dimension"),
        ("missing input", grpc.StatusCode.INVALID_ARGUMENT, "missing input 'input'"),
        ("duplicate input", grpc.StatusCode.INVALID_ARGUMENT, "repeat"),
        ("raw count", grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents"),
        ("unknown output", grpc.StatusCode.INVALID_ARGUMENT, "unknown output 'logits'"),
        ("typed count", grpc.StatusCode.INVALID_ARGUMENT, "7 values"),
        ("shared memory", grpc.StatusCode.INVALID_ARGUMENT, "shared memory"),
        ("unsupported datatype", grpc.StatusCode.INVALID_ARGUMENT, "datatype BYTES"),
    ],
)
def test_malformed_request_is_refused_and_server_keeps_serving(stub, kind, code, words):
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(_mutate(kind), timeout=5)
    assert err.value.code() == code, err.value.details()
    assert words in err.value.details()
    reply = stub.ModelInfer(good_request(np.ones((1, *SHAPE), np.float32)), timeout=5)
    assert list(reply.outputs[0].shape) == [1, FEATURES]


def test_stream_infer_answers_each_request_and_refusals_keep_the_stream_open(stub, model_path):
    """ModelStreamInfer: one reply per request, by id; a bad request gets error_message, not a dead stream."""
    x = np.random.default_rng(1).random((2, *SHAPE), dtype=np.float32)
    expected = OnnxModel(model_path).run({"input": x})["features"]
    requests = [good_request(x), _mutate("wrong shape"), _mutate("unknown model"), good_request(x)]
    for index, request in enumerate(requests):
        request.id = f"r{index}"
    replies = list(stub.ModelStreamInfer(iter(requests), timeout=10))
    assert [r.infer_response.id for r in replies] == ["r0", "r1", "r2", "r3"]
    for reply in (replies[0], replies[3]):
        assert reply.error_message == ""
        out = reply.infer_response
        assert list(out.outputs[0].shape) == [2, FEATURES]
        np.testing.assert_array_equal(np.frombuffer(out.raw_output_contents[0], np.float32).reshape(2, FEATURES), expected)
    assert replies[1].error_message.startswith("INVALID_ARGUMENT: ") and "dimension 2 is 5, expected 4" in replies[1].error_message
    assert replies[2].error_message.startswith("NOT_FOUND: ") and "student_7" in replies[2].error_message


def test_stream_with_undecodable_bytes_answers_invalid_argument_in_stream(server):
    with grpc.insecure_channel(server.address) as channel:
        raw_stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=None,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        good = good_request(np.ones((1, *SHAPE), np.float32)).SerializeToString()
        replies = list(raw_stream(iter([b"\xff\xff\xff garbage", good]), timeout=10))
    assert "not a valid inference.ModelInferRequest message" in replies[0].error_message
    assert replies[1].error_message == "" and list(replies[1].infer_response.outputs[0].shape) == [1, FEATURES]


def test_stock_tritonclient_streams(server, model_path):
    import tritonclient.grpc as triton

    x = np.random.default_rng(2).random((1, *SHAPE), dtype=np.float32)
    results: queue.Queue = queue.Queue()
    client = triton.InferenceServerClient(server.address)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    for request_id in ("a", "b"):
        client.async_stream_infer("student_0", [tensor], request_id=request_id)
    answers = [results.get(timeout=10) for _ in range(2)]
    client.stop_stream()
    client.close()
    expected = OnnxModel(model_path).run({"input": x})["features"]
    for result, error in answers:
        assert error is None
        np.testing.assert_array_equal(result.as_numpy("features"), expected)
    assert sorted(result.get_response().id for result, _ in answers) == ["a", "b"]


def test_streams_beyond_the_limit_are_refused_and_stop_ends_idle_streams(model_path):
    server = started(DeviceServer(OnnxBackend(OnnxModel(model_path), "student_0"), max_streams=1, grace_s=10))
    request = good_request(np.ones((1, *SHAPE), np.float32))
    feed: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
    feed.put(request)
    channel = grpc.insecure_channel(server.address)
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        first = stub.ModelStreamInfer(iter(feed.get, None), timeout=20)
        assert next(first).error_message == ""  # the one stream is open and idle now
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ModelStreamInfer(iter([request]), timeout=5))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "ModelInfer" in err.value.details()
        assert stub.ModelInfer(request, timeout=5).outputs  # unary calls still served
        started_at = time.perf_counter()
        server.stop()  # grace 10 s, but an idle stream is no in-flight request: it ends now
        assert time.perf_counter() - started_at < 3
        with pytest.raises(grpc.RpcError) as err:
            next(first)
        assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)  # GOAWAY may come first
    finally:
        feed.put(None)
        channel.close()
        server.stop(0)


def test_message_size_limit(server, stub):
    # max_batch 4 of 64-byte images: the limit is far below 4 MiB.
    assert server.max_message_bytes < 2 << 20
    request = good_request(np.zeros((2, *SHAPE), np.float32))
    request.id = "x" * (4 << 20)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.ModelInfer(good_request(np.ones((1, *SHAPE), np.float32)), timeout=5).outputs


def test_cli_serve_on_a_port_in_use_is_a_clean_error(server, model_path, capsys):
    assert main(["serve", "--model", str(model_path), "--name", "other", "--port", str(server.port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot bind 127.0.0.1:{server.port}: the port is in use" in err and "Traceback" not in err


def test_metadata_for_unknown_model_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


class SlowBackend(ModelBackend):
    """Echo-free stand-in: answers zeros after `delay_s` (to test in-flight handling)."""

    def __init__(self, delay_s: float) -> None:
        self.name = "slow"
        self.inputs = [TensorSpec("input", (-1, *SHAPE))]
        self.outputs = [TensorSpec("features", (-1, FEATURES))]
        self.delay_s = delay_s

    def infer(self, inputs, outputs):
        time.sleep(self.delay_s)
        return InferOutput({"features": np.zeros((inputs["input"].shape[0], FEATURES), np.float32)})


def test_graceful_stop_finishes_in_flight_request():
    server = started(DeviceServer(SlowBackend(0.5)))
    outcome: dict[str, object] = {}

    def call():
        with grpc.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            try:
                outcome["reply"] = stub.ModelInfer(good_request(np.zeros((1, *SHAPE)), "slow"), timeout=5)
            except grpc.RpcError as exc:
                outcome["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.2)  # the request is now in flight
    address = server.address
    server.stop(grace_s=3)
    thread.join(5)
    assert "error" not in outcome, outcome.get("error")
    assert list(outcome["reply"].outputs[0].shape) == [1, FEATURES]
    with grpc.insecure_channel(address) as channel:  # and the port no longer answers
        with pytest.raises(grpc.RpcError):
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=1)


def test_tampered_model_is_refused(tmp_path, model_path, capsys):
    bundle = make_bundle(tmp_path / "bundle")
    student = bundle.path_of(bundle.students[1])
    with pytest.raises(ModelIntegrityError, match="sha256"):
        OnnxModel(model_path, expected_sha256="0" * 64)
    data = bytearray(student.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in a weight
    student.write_bytes(bytes(data))
    code = main(["serve", "--bundle", str(tmp_path / "bundle"), "--student", "student_1", "--port", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "sha256" in err and "refusing" in err
    # The untouched student still loads.
    from nonn.runtime.server import student_backend

    assert student_backend(tmp_path / "bundle", "student_0").name == "student_0"


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_cli_serve_without_torch_until_stopped(tmp_path, model_path, stop_signal):
    """SIGTERM and SIGINT (Ctrl-C) both stop the server gracefully: exit 0, no traceback."""
    ready = tmp_path / "ready.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The device side runs without torch: block it, as on a device that does not have it.
    argv = ["serve", "--model", str(model_path), "--name", "dev", "--port", "0", "--ready-file", str(ready)]
    code = f"import sys; sys.modules['torch'] = None; from nonn.cli import main; sys.exit(main({argv!r}))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert info["host"] == "127.0.0.1" and info["models"] == ["dev"]
        with grpc.insecure_channel(info["address"]) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            reply = stub.ModelInfer(good_request(np.ones((2, *SHAPE)), "dev"), timeout=5)
            assert list(reply.outputs[0].shape) == [2, FEATURES]
        proc.send_signal(stop_signal)
        assert proc.wait(timeout=15) == 0
        assert not ready.exists()
        out = proc.stdout.read().decode()
        assert f"{signal.Signals(stop_signal).name} received: finishing in-flight requests" in out
        assert "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()



def test_a_port_in_use_is_one_line_without_grpc_core_logging(model_path):
    """`nonn serve` on a taken port: our one error line, and nothing from gRPC's C core before it."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "nonn", "serve", "--model", str(model_path), "--name", "student_0", "--port", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"nonn: error: cannot bind 127.0.0.1:{port}: the port is in use or the address is not available here"
    ]
