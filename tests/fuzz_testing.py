"""Fuzzing a device server (`nonn serve`): seeded malformed requests, each must get a proper status.

Used by tests/test_fuzz.py (a small seeded run) and by benchmarks/fuzz_server.py (10,000
requests by default). `run()` starts `nonn serve --model tiny.onnx` as its own process on
loopback, then sends requests built from a seed, raw bytes over a generic unary-unary call
(identity serializers, so nothing on the client side can tidy them up):
- random bytes, and valid ModelInferRequests with bytes flipped, inserted, cut or repeated;
- valid messages with wrong fields: unknown model/version/input/output names, wrong
  datatypes, ranks, shapes (zero, negative, huge), raw contents of the wrong length, typed
  contents of the wrong kind, shared-memory parameters, duplicate inputs;
- huge tensors (some above the server's message limit) and empty ones;
- well-formed tensors full of NaN, +Inf and -Inf (these must be answered: the values are legal);
- random bytes to the other RPCs (metadata, readiness, config, grpc.health.v1 Check) and to
  methods that do not exist;
- then the ModelInfer cases of a second seed as messages on ModelStreamInfer streams, where a
  refused message must get an error_message reply and leave its stream open.
Every request must end with a well-formed gRPC status from the server: OK with a reply that
parses, or a refusal the server chose (INVALID_ARGUMENT, also for bytes that do not decode as
the request message; NOT_FOUND; RESOURCE_EXHAUSTED for a message over the limit;
UNIMPLEMENTED for a method that does not exist). INTERNAL or UNKNOWN (a failure or an
exception inside the server), UNAVAILABLE or DEADLINE_EXCEEDED (the server is gone or stuck)
count as failures. Afterwards the server must still be alive and a good request
must return exactly what ONNX Runtime computes in-process. The report gives the count, the
status distribution (overall and per kind of request) and the server's RSS before and after.
"""

from __future__ import annotations

import collections
import json
import os
import random
import string
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import numpy as np
from grpc_health.v1 import health_pb2
from tritonclient.grpc import service_pb2 as pb

SERVICE = "/inference.GRPCInferenceService/"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
MODEL_NAME = "student_0"
INPUT_NAME = "input"
OUTPUT_NAME = "features"
INPUT_SHAPE = (1, 4, 4)
FEATURES = 3
MAX_BATCH = 8
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES", "BF16", "", "fp32", "FP32\x00", "\u00e9\u00e9"]  # fmt: skip
# The statuses a healthy server may answer with; anything else is a failure.
ACCEPTED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNIMPLEMENTED"}
# The fuzzing client sends anything and reads replies of any size: the server's limits are under test.
_CLIENT_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 64 << 20)]
# Requests that are fine on the wire and must be answered OK (and correctly).
MUST_ANSWER = {"nan_inf", "good"}


@dataclass
class FuzzCase:
    """One request: which RPC, the exact bytes sent, what kind of damage it carries."""

    method: str
    payload: bytes
    kind: str
    expect_ok: bool = False
    images: np.ndarray | None = None  # for requests that must be answered: the input


@dataclass
class FuzzReport:
    """What the fuzz run saw: counts per status, per kind, and every failure (first 20 kept)."""

    requests: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    by_kind: dict[str, collections.Counter] = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    failures: list[str] = field(default_factory=list)
    failure_count: int = 0
    seconds: float = 0.0

    def record(self, kind: str, code: str) -> None:
        self.requests += 1
        self.statuses[code] += 1
        self.by_kind[kind][code] += 1

    def fail(self, message: str) -> None:
        self.failure_count += 1
        if len(self.failures) < 20:
            self.failures.append(message)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "statuses": dict(self.statuses.most_common()),
            "by_kind": {kind: dict(counter.most_common()) for kind, counter in sorted(self.by_kind.items())},
            "failures": self.failure_count,
            "failure_examples": self.failures,
            "seconds": round(self.seconds, 2),
        }


def good_request(images: np.ndarray, request_id: str = "fuzz") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL_NAME, id=request_id)
    request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=list(images.shape))
    request.outputs.add(name=OUTPUT_NAME)
    request.raw_input_contents.append(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    return request


def _random_text(rng: random.Random, longest: int = 40) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz_0123456789 -./\u00e9\u4e2d\U0001f600\x00\n"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))


def _random_shape(rng: random.Random) -> list[int]:
    choice = rng.random()
    if choice < 0.25:  # right rank, one dimension off
        shape = [rng.randint(1, MAX_BATCH), *INPUT_SHAPE]
        shape[rng.randrange(4)] = rng.choice([0, -1, -2, 2, 5, 1 << 31, (1 << 62), -(1 << 63)])
        return shape
    if choice < 0.45:  # wrong rank
        return [rng.randint(0, 8) for _ in range(rng.choice([0, 1, 2, 3, 5, 6, 16]))]
    if choice < 0.6:  # batch above the limit, or zero
        return [rng.choice([0, MAX_BATCH + 1, 1000, (1 << 40)]), *INPUT_SHAPE]
    return [rng.randint(1, MAX_BATCH), *INPUT_SHAPE]


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        if not buf:
            buf.extend(rng.randbytes(rng.randint(1, 16)))
        elif op < 0.35:  # flip bits
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op < 0.55:  # overwrite a byte with something interesting
            buf[rng.randrange(len(buf))] = rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x0A, 0x12, 0x1A, 0x22, 0x32, 0x3A])
        elif op < 0.7:  # insert random bytes
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op < 0.8:  # cut
            del buf[rng.randrange(len(buf)) :]
        elif op < 0.9:  # delete a span
            i = rng.randrange(len(buf))
            del buf[i : i + rng.randint(1, 16)]
        else:  # repeat a span (duplicates fields)
            i = rng.randrange(len(buf))
            buf[i:i] = buf[i : i + rng.randint(1, 32)]
    return bytes(buf)


def _wrong_fields(rng: random.Random) -> pb.ModelInferRequest:
    """A request that parses, with one or more fields wrong."""
    batch = rng.randint(1, MAX_BATCH)
    request = good_request(np.zeros((batch, *INPUT_SHAPE), np.float32))
    for _ in range(rng.randint(1, 3)):
        what = rng.randrange(14)
        tensor = request.inputs[0] if request.inputs else request.inputs.add(name=INPUT_NAME, datatype="FP32")
        if what == 0:
            request.model_name = rng.choice(["", "student_1", MODEL_NAME.upper(), _random_text(rng)])
        elif what == 1:
            request.model_version = rng.choice(["0", "2", "-1", "latest", _random_text(rng)])
        elif what == 2:
            tensor.name = rng.choice(["", "image", INPUT_NAME + " ", _random_text(rng)])
        elif what == 3:
            tensor.datatype = rng.choice(DATATYPES)
        elif what == 4:
            del tensor.shape[:]
            tensor.shape.extend(_random_shape(rng))
        elif what == 5 and request.raw_input_contents:
            raw = request.raw_input_contents[0]
            request.raw_input_contents[0] = rng.choice([b"", raw[:-1], raw + b"\x00", raw[: len(raw) // 2], raw * 2])
        elif what == 6:
            del request.raw_input_contents[:]
            contents = tensor.contents
            field_name = rng.choice(["fp32_contents", "fp64_contents", "int_contents", "int64_contents",
                                     "uint_contents", "bool_contents", "bytes_contents"])  # fmt: skip
            values = getattr(contents, field_name)
            n = rng.choice([0, 1, batch * 16 - 1, batch * 16, batch * 16 + 1])
            if field_name == "bytes_contents":
                values.extend(rng.randbytes(4) for _ in range(n))
            elif field_name == "bool_contents":
                values.extend(rng.random() < 0.5 for _ in range(n))
            elif field_name.startswith("uint"):
                values.extend(rng.randint(0, 1000) for _ in range(n))
            elif field_name.startswith("int"):
                values.extend(rng.randint(-1000, 1000) for _ in range(n))
            else:
                values.extend(rng.uniform(-1e30, 1e30) for _ in range(n))
        elif what == 7:
            request.inputs.add().CopyFrom(tensor)
            if request.raw_input_contents and rng.random() < 0.7:
                request.raw_input_contents.append(request.raw_input_contents[0])
        elif what == 8:
            del request.inputs[:]
            if rng.random() < 0.5:
                del request.raw_input_contents[:]
        elif what == 9:
            request.outputs.add(name=rng.choice([OUTPUT_NAME, "logits", "", _random_text(rng)]))
        elif what == 10:
            key = rng.choice(["shared_memory_region", "shared_memory_byte_size", "sequence_id", "priority", _random_text(rng, 12)])
            param = rng.choice([request.parameters, tensor.parameters])[key]
            choice = rng.randrange(4)
            if choice == 0:
                param.int64_param = rng.randint(-(1 << 63), (1 << 63) - 1)
            elif choice == 1:
                param.string_param = _random_text(rng)
            elif choice == 2:
                param.bool_param = True
            else:
                param.double_param = rng.choice([float("nan"), float("inf"), -0.0, 1e308])
        elif what == 11:
            request.raw_input_contents.append(rng.randbytes(rng.randint(0, 64)))
        elif what == 12:
            request.id = _random_text(rng, 200)
        else:  # both raw and typed contents
            tensor.contents.fp32_contents.extend([0.0] * (batch * 16))
    return request


def _huge_or_empty(rng: random.Random, limit_bytes: int) -> pb.ModelInferRequest:
    """A request with a very large tensor (some above the message limit) or an empty one."""
    choice = rng.random()
    request = pb.ModelInferRequest(model_name=MODEL_NAME)
    tensor = request.inputs.add(name=INPUT_NAME, datatype="FP32")
    if choice < 0.3:  # claims a huge shape, carries little
        tensor.shape.extend([rng.choice([1 << 20, 1 << 31, 1 << 62]), *INPUT_SHAPE])
        request.raw_input_contents.append(rng.randbytes(64))
    elif choice < 0.55:  # carries more bytes than the server accepts in one message
        size = rng.randint(limit_bytes + 1, limit_bytes * 3)
        tensor.shape.extend([size // 64, *INPUT_SHAPE])
        request.raw_input_contents.append(bytes(size))
    elif choice < 0.75:  # a large but legal-sized message with a shape that does not match
        size = rng.randint(limit_bytes // 4, limit_bytes // 2)
        tensor.shape.extend([MAX_BATCH, *INPUT_SHAPE])
        request.raw_input_contents.append(bytes(size))
    else:  # empty tensors
        tensor.shape.extend(rng.choice([[0, *INPUT_SHAPE], [], [0], [1, 0, 4, 4]]))
        request.raw_input_contents.append(b"")
    return request


def _other_rpc(rng: random.Random) -> FuzzCase:
    """Random or mutated bytes to the metadata, readiness, config and health RPCs."""
    method, valid = rng.choice(
        [
            (SERVICE + "ServerLive", pb.ServerLiveRequest()),
            (SERVICE + "ServerReady", pb.ServerReadyRequest()),
            (SERVICE + "ModelReady", pb.ModelReadyRequest(name=MODEL_NAME, version="1")),
            (SERVICE + "ServerMetadata", pb.ServerMetadataRequest()),
            (SERVICE + "ModelMetadata", pb.ModelMetadataRequest(name=MODEL_NAME)),
            (SERVICE + "ModelConfig", pb.ModelConfigRequest(name=MODEL_NAME)),
            (SERVICE + "ModelStatistics", pb.ModelStatisticsRequest(name=MODEL_NAME)),
            (HEALTH_CHECK, health_pb2.HealthCheckRequest(service="")),
            (SERVICE + "NoSuchMethod", pb.ServerLiveRequest()),
            ("/" + "".join(rng.choice(string.ascii_letters + ".") for _ in range(rng.randint(1, 20))) + "/Call", pb.ServerLiveRequest()),
        ]
    )
    data = valid.SerializeToString()
    payload = rng.randbytes(rng.randint(0, 64)) if rng.random() < 0.5 else _mutate_bytes(rng, data + b"\x0a\x03abc")
    return FuzzCase(method, payload, "other_rpc")


def generate(seed: int, count: int, limit_bytes: int) -> Iterator[FuzzCase]:
    """`count` fuzz cases from `seed` (the same seed gives the same bytes)."""
    rng = random.Random(seed)
    template = good_request(np.zeros((2, *INPUT_SHAPE), np.float32)).SerializeToString()
    for i in range(count):
        r = rng.random()
        if r < 0.15:
            yield FuzzCase(SERVICE + "ModelInfer", rng.randbytes(rng.randint(0, 512)), "random_bytes")
        elif r < 0.45:
            base = template if rng.random() < 0.7 else _wrong_fields(rng).SerializeToString()
            yield FuzzCase(SERVICE + "ModelInfer", _mutate_bytes(rng, base), "mutated")
        elif r < 0.75:
            yield FuzzCase(SERVICE + "ModelInfer", _wrong_fields(rng).SerializeToString(), "wrong_fields")
        elif r < 0.78:
            yield FuzzCase(SERVICE + "ModelInfer", _huge_or_empty(rng, limit_bytes).SerializeToString(), "huge_or_empty")
        elif r < 0.86:
            batch = rng.randint(1, MAX_BATCH)
            images = np.asarray(
                [rng.choice([float("nan"), float("inf"), -float("inf"), 0.0, 1e38, -1e38]) for _ in range(batch * 16)],
                np.float32,
            ).reshape(batch, *INPUT_SHAPE)
            yield FuzzCase(SERVICE + "ModelInfer", good_request(images, str(i)).SerializeToString(), "nan_inf", True, images)
        elif r < 0.92:
            yield _other_rpc(rng)
        else:
            batch = rng.randint(1, MAX_BATCH)
            images = np.asarray([rng.uniform(-2, 2) for _ in range(batch * 16)], np.float32).reshape(batch, *INPUT_SHAPE)
            yield FuzzCase(SERVICE + "ModelInfer", good_request(images, str(i)).SerializeToString(), "good", True, images)


def _check_reply(case: FuzzCase, reply: bytes | pb.ModelInferResponse, reference: Callable[[np.ndarray], np.ndarray]) -> str | None:
    """None when an OK reply is right; otherwise what is wrong with it."""
    if case.method != SERVICE + "ModelInfer":
        return None
    response = pb.ModelInferResponse.FromString(reply) if isinstance(reply, bytes) else reply
    if case.images is None:
        return None
    if len(response.outputs) != 1 or list(response.outputs[0].shape) != [len(case.images), FEATURES]:
        return f"{case.kind}: reply outputs {[(o.name, list(o.shape)) for o in response.outputs]}"
    got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(len(case.images), FEATURES)
    want = reference(case.images)
    if not np.allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True):
        return f"{case.kind}: reply differs from ONNX Runtime in-process"
    return None


def fuzz(
    address: str,
    seed: int,
    count: int,
    reference: Callable[[np.ndarray], np.ndarray],
    *,
    limit_bytes: int,
    timeout_s: float = 10.0,
    window: int = 8,
    progress: bool = False,
) -> FuzzReport:
    """Send `count` seeded fuzz cases to the server at `address`; check every answer.

    Up to `window` calls are in flight at once (futures on one channel), so the server also sees
    concurrent bad requests.
    """
    report = FuzzReport()
    started = time.perf_counter()
    with grpc.insecure_channel(address, _CLIENT_OPTIONS) as channel:
        calls: dict[str, grpc.UnaryUnaryMultiCallable] = {}

        def settle(case: FuzzCase, future: grpc.Future) -> None:
            try:
                reply = future.result()
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
                reply = None
            report.record(case.kind, code)
            if code not in ACCEPTED:
                report.fail(f"{case.kind} to {case.method.rsplit('/', 1)[-1]}: {code}: {future.exception().details()!r}")
            elif case.expect_ok and code != "OK":
                report.fail(f"{case.kind}: a legal request was refused: {code}: {future.exception().details()!r}")
            elif reply is not None:
                problem = _check_reply(case, reply, reference)
                if problem:
                    report.fail(problem)

        pending: collections.deque[tuple[FuzzCase, grpc.Future]] = collections.deque()
        for i, case in enumerate(generate(seed, count, limit_bytes)):
            call = calls.get(case.method)
            if call is None:
                # Identity serializers: the bytes go out exactly as generated.
                call = calls[case.method] = channel.unary_unary(case.method, request_serializer=None, response_deserializer=None)
            pending.append((case, call.future(case.payload, timeout=timeout_s)))
            while len(pending) >= window:
                settle(*pending.popleft())
            if progress and (i + 1) % 1000 == 0:
                print(f"  {i + 1} requests, {report.failure_count} failures", file=sys.stderr, flush=True)
        while pending:
            settle(*pending.popleft())
    report.seconds = time.perf_counter() - started
    return report


def fuzz_stream(
    address: str,
    seed: int,
    count: int,
    reference: Callable[[np.ndarray], np.ndarray],
    *,
    limit_bytes: int,
    timeout_s: float = 10.0,
    per_stream: int = 50,
) -> FuzzReport:
    """The ModelInfer cases of `generate` as messages on ModelStreamInfer streams.

    Up to `per_stream` messages share a stream. Every message must get exactly one reply, in
    order: a correct answer, or an error_message (counted as STREAM_ERROR) for a refused one;
    requests that must be answered must not be refused. A message over the size limit may end
    its stream with RESOURCE_EXHAUSTED, so such a message travels on a stream of its own; any
    other way for a stream to end is a failure.
    """
    report = FuzzReport()
    started = time.perf_counter()
    cases = [case for case in generate(seed, count, limit_bytes) if case.method == SERVICE + "ModelInfer"]
    chunks: list[list[FuzzCase]] = []
    for case in cases:
        if case.kind == "huge_or_empty":
            chunks.append([case])
        elif not chunks or len(chunks[-1]) >= per_stream or chunks[-1][0].kind == "huge_or_empty":
            chunks.append([case])
        else:
            chunks[-1].append(case)
    with grpc.insecure_channel(address, _CLIENT_OPTIONS) as channel:
        stream = channel.stream_stream(
            SERVICE + "ModelStreamInfer", request_serializer=None, response_deserializer=pb.ModelStreamInferResponse.FromString
        )
        for chunk in chunks:
            replies: list[pb.ModelStreamInferResponse] = []
            ended = "OK"
            try:
                for reply in stream(iter([case.payload for case in chunk]), timeout=timeout_s):
                    replies.append(reply)
            except grpc.RpcError as exc:
                ended = exc.code().name
            if ended != "OK" and not (ended == "RESOURCE_EXHAUSTED" and chunk[0].kind == "huge_or_empty"):
                report.fail(f"a stream of {[c.kind for c in chunk]} ended with {ended}")
            if ended == "OK" and len(replies) != len(chunk):
                report.fail(f"{len(chunk)} messages on a stream got {len(replies)} replies")
            for index, case in enumerate(chunk):
                code = ended if index >= len(replies) else "STREAM_ERROR" if replies[index].error_message else "OK"
                report.record(case.kind, code)
                if code == "STREAM_ERROR" and case.expect_ok:
                    report.fail(f"{case.kind}: a legal request was refused: {replies[index].error_message!r}")
                elif code == "OK":
                    problem = _check_reply(case, replies[index].infer_response, reference)
                    if problem:
                        report.fail("stream: " + problem)
    report.seconds = time.perf_counter() - started
    return report


def tiny_model(path: Path, seed: int = 0) -> Path:
    """The served stand-in student: flatten -> matmul -> relu, (N, 1, 4, 4) -> (N, 3)."""
    from runtime_testing import tiny_student

    return tiny_student(path, FEATURES, INPUT_SHAPE, seed=seed, input_name=INPUT_NAME, output_name=OUTPUT_NAME)


class ServerProcess:
    """`nonn serve --model` in its own process on a free loopback port (a context manager)."""

    def __init__(self, model: Path, workdir: Path, max_batch: int = MAX_BATCH) -> None:
        self.ready = workdir / "ready.json"
        self.log = workdir / "server.log"
        cmd = [sys.executable, "-m", "nonn", "serve", "--model", str(model), "--name", MODEL_NAME,
               "--port", "0", "--max-batch", str(max_batch), "--ready-file", str(self.ready)]  # fmt: skip
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.monotonic() + 60
        while not self.ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the server did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        self.address = json.loads(self.ready.read_text())["address"]

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss / (1 << 20)

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def message_limit_bytes() -> int:
    """The server's message limit for the tiny model (computed the way the server computes it)."""
    from nonn.runtime.datatypes import TensorSpec
    from nonn.runtime.server import OnnxBackend, message_limit

    backend = OnnxBackend.__new__(OnnxBackend)
    backend.inputs = [TensorSpec(INPUT_NAME, (-1, *INPUT_SHAPE))]
    backend.outputs = [TensorSpec(OUTPUT_NAME, (-1, FEATURES))]
    backend.max_batch = MAX_BATCH
    return message_limit([backend])


def run(seed: int, count: int, workdir: Path, window: int = 8, progress: bool = False, stream_count: int = 0) -> dict[str, Any]:
    """Start a server, warm it up, fuzz it, then check it is alive and still right; returns the report.

    `stream_count` more cases (their ModelInfer part) then go over ModelStreamInfer streams;
    their report is under "stream".
    """
    from nonn.runtime.onnx_model import OnnxModel

    model_path = tiny_model(workdir / "student.onnx")
    model = OnnxModel(model_path)

    def reference(images: np.ndarray) -> np.ndarray:
        return model.run({INPUT_NAME: images})[OUTPUT_NAME]

    probe = np.random.default_rng(seed).normal(size=(3, *INPUT_SHAPE)).astype(np.float32)
    with ServerProcess(model_path, workdir) as server:
        with grpc.insecure_channel(server.address) as channel:
            infer = channel.unary_unary(SERVICE + "ModelInfer", request_serializer=None, response_deserializer=None)
            for _ in range(200):  # warm-up, so the RSS baseline includes a used server
                infer(good_request(probe).SerializeToString(), timeout=10)
        rss_before = server.rss_mb()
        report = fuzz(server.address, seed, count, reference, limit_bytes=message_limit_bytes(), window=window, progress=progress)
        streamed = (
            fuzz_stream(server.address, seed + 1, stream_count, reference, limit_bytes=message_limit_bytes())
            if stream_count
            else None
        )
        alive = server.alive()
        with grpc.insecure_channel(server.address) as channel:
            infer = channel.unary_unary(SERVICE + "ModelInfer", request_serializer=None, response_deserializer=None)
            reply = pb.ModelInferResponse.FromString(infer(good_request(probe).SerializeToString(), timeout=10))
        answer = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(3, FEATURES)
        still_right = bool(np.array_equal(answer, reference(probe)))
        rss_after = server.rss_mb()
        alive = alive and server.alive()
    out = report.to_dict()
    if streamed is not None:
        out["stream"] = streamed.to_dict()
    out.update(
        seed=seed,
        server_alive=alive,
        good_request_after=still_right,
        rss_mb_before=round(rss_before, 1),
        rss_mb_after=round(rss_after, 1),
        rss_growth=round(rss_after / rss_before - 1, 4),
    )
    return out
