"""Fuzzing the device server: seeded malformed requests, each answered with a proper status.

The generator and runner are tests/fuzz_testing.py (benchmarks/fuzz_server.py sends 10,000
requests with them by default); here a smaller seeded run (2,000) keeps the suite fast.
"""

from __future__ import annotations

import random

import fuzz_testing as fuzz
import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

pytestmark = pytest.mark.timeout(120)


def test_generator_is_deterministic_and_covers_every_kind():
    limit = fuzz.message_limit_bytes()
    first = [(c.method, c.payload, c.kind) for c in fuzz.generate(5, 400, limit)]
    again = [(c.method, c.payload, c.kind) for c in fuzz.generate(5, 400, limit)]
    assert first == again
    assert first != [(c.method, c.payload, c.kind) for c in fuzz.generate(6, 400, limit)]
    kinds = {kind for _, _, kind in first}
    assert kinds == {"random_bytes", "mutated", "wrong_fields", "huge_or_empty", "nan_inf", "other_rpc", "good"}


def test_seeded_fuzz_every_request_gets_a_status_and_the_server_survives(tmp_path):
    report = fuzz.run(seed=1, count=2000, workdir=tmp_path, stream_count=1000)
    assert report["requests"] == 2000
    assert report["failures"] == 0, report["failure_examples"]
    streamed = report["stream"]
    assert streamed["failures"] == 0, streamed["failure_examples"]
    assert streamed["statuses"].get("OK", 0) > 0 and streamed["statuses"].get("STREAM_ERROR", 0) > 0, streamed["statuses"]
    assert report["server_alive"] and report["good_request_after"]
    # The run reached the server's validation, its size limit, lookups, and the model itself.
    statuses = report["statuses"]
    for code in ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"):
        assert statuses.get(code, 0) > 0, statuses
    assert report["by_kind"]["nan_inf"] == {"OK": report["by_kind"]["nan_inf"]["OK"]}
    assert report["rss_growth"] < 0.10, (report["rss_mb_before"], report["rss_mb_after"])


def test_undecodable_bytes_are_refused_as_invalid_argument_without_keeping_memory(tmp_path):
    """grpcio on its own answers INTERNAL and keeps ~19 KB per such request; the server must not."""
    model = fuzz.tiny_model(tmp_path / "m.onnx")
    rng = random.Random(0)
    with fuzz.ServerProcess(model, tmp_path) as server:
        with grpc.insecure_channel(server.address) as channel:
            infer = channel.unary_unary(fuzz.SERVICE + "ModelInfer", request_serializer=None, response_deserializer=None)
            health = channel.unary_unary(fuzz.HEALTH_CHECK, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as err:
                infer(b"\xff\xff\xff", timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid inference.ModelInferRequest message" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                health(b"\xff\xff\xff", timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            for _ in range(50):  # warm-up
                with pytest.raises(grpc.RpcError):
                    infer(b"\xff" + rng.randbytes(200), timeout=5)
            before = server.rss_mb()
            for i in range(2000):
                future = infer.future(b"\xff\xff\xff" + rng.randbytes(200), timeout=10)
                assert future.code() == grpc.StatusCode.INVALID_ARGUMENT
            grown = server.rss_mb() - before
            probe = np.ones((2, *fuzz.INPUT_SHAPE), np.float32)
            reply = pb.ModelInferResponse.FromString(infer(fuzz.good_request(probe).SerializeToString(), timeout=5))
            assert list(reply.outputs[0].shape) == [2, fuzz.FEATURES]
        assert server.alive()
    # 2000 requests at ~19 KB each would be ~37 MB.
    assert grown < 10, f"RSS grew {grown:.1f} MB over 2000 undecodable requests"


def test_unsupported_methods_answer_unimplemented_without_flooding_the_log(tmp_path):
    """Each call to a method the server does not offer must not leave a traceback in its log."""
    from tritonclient.grpc import service_pb2_grpc

    model = fuzz.tiny_model(tmp_path / "m.onnx")
    with fuzz.ServerProcess(model, tmp_path) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            calls = [
                (stub.ModelStatistics, pb.ModelStatisticsRequest(name=fuzz.MODEL_NAME)),
                (stub.RepositoryIndex, pb.RepositoryIndexRequest()),
                (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=fuzz.MODEL_NAME)),
                (stub.SystemSharedMemoryRegister, pb.SystemSharedMemoryRegisterRequest(name="x", key="/x", byte_size=1 << 30)),
                (stub.LogSettings, pb.LogSettingsRequest()),
            ]
            for _ in range(20):
                for call, request in calls:
                    with pytest.raises(grpc.RpcError) as err:
                        call(request, timeout=5)
                    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
                    assert "not supported by this server" in err.value.details()
        assert server.alive()
    log = server.log.read_text()
    assert "Traceback" not in log and "NotImplementedError" not in log, log[-2000:]
