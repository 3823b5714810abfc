"""Helpers for the runtime tests: tiny ONNX models built with onnx.helper (no torch) and certificates."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def tiny_student(path: Path, features: int, input_shape=(1, 4, 4), seed: int = 0, input_name: str = "input", output_name: str = "features") -> Path:
    """input (N, C, H, W) -> flatten -> matmul -> relu -> (N, features): a stand-in student."""
    rng = np.random.default_rng(seed)
    flat = int(np.prod(input_shape))
    weight = numpy_helper.from_array(rng.normal(size=(flat, features)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Flatten", [input_name], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["pre"]),
        helper.make_node("Relu", ["pre"], [output_name]),
    ]
    graph = helper.make_graph(
        nodes,
        "student",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", *input_shape])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", features])],
        initializer=[weight],
    )
    return _save(graph, path)


def tiny_head(path: Path, in_features: int, classes: int, seed: int = 1) -> Path:
    """features (N, F) -> linear -> logits (N, classes): a stand-in for the ensemble's head."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.normal(size=(in_features, classes)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.normal(size=(classes,)).astype(np.float32), "b")
    nodes = [helper.make_node("MatMul", ["features", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["logits"])]
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=[weight, bias],
    )
    return _save(graph, path)


def make_certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate, a rogue CA's client
    certificate, and an expired server and client certificate from the good CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def key_pair():
        return ec.generate_private_key(ec.SECP256R1())

    def build(subject, issuer, public_key, signing_key, ca: bool, usage=None, san=None, expired: bool = False):
        # An expired certificate was valid for a day that ended an hour ago.
        end = now - datetime.timedelta(hours=1) if expired else now + datetime.timedelta(days=1)
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(end - datetime.timedelta(days=1, minutes=5))
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(signing_key, hashes.SHA256())

    def write(stem: str, cert, key) -> None:
        (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            (directory / f"{stem}.key").write_bytes(
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            )

    ca_key = key_pair()
    ca = build(name("nonn test CA"), name("nonn test CA"), ca_key.public_key(), ca_key, ca=True)
    write("ca", ca, None)
    server_key = key_pair()
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    write("server", build(name("localhost"), ca.subject, server_key.public_key(), ca_key, False, [ExtendedKeyUsageOID.SERVER_AUTH], san), server_key)
    client_key = key_pair()
    write("client", build(name("aggregator"), ca.subject, client_key.public_key(), ca_key, False, [ExtendedKeyUsageOID.CLIENT_AUTH]), client_key)
    rogue_key = key_pair()
    rogue_ca = build(name("rogue CA"), name("rogue CA"), rogue_key.public_key(), rogue_key, ca=True)
    write("rogue_ca", rogue_ca, None)
    rogue_client_key = key_pair()
    write("rogue_client", build(name("intruder"), rogue_ca.subject, rogue_client_key.public_key(), rogue_key, False, [ExtendedKeyUsageOID.CLIENT_AUTH]), rogue_client_key)
    expired_server_key = key_pair()
    write("expired_server", build(name("localhost"), ca.subject, expired_server_key.public_key(), ca_key, False, [ExtendedKeyUsageOID.SERVER_AUTH], san, expired=True), expired_server_key)
    expired_client_key = key_pair()
    write("expired_client", build(name("aggregator"), ca.subject, expired_client_key.public_key(), ca_key, False, [ExtendedKeyUsageOID.CLIENT_AUTH], expired=True), expired_client_key)
    stems = ("server", "client", "rogue_client", "expired_server", "expired_client")
    return {stem: directory / f"{stem}.pem" for stem in ("ca", "rogue_ca", *stems)} | {
        f"{stem}_key": directory / f"{stem}.key" for stem in stems
    }


def make_bundle(directory: Path, feature_sizes=(3, 2, 4, 3), input_shape=(1, 4, 4), classes: int = 5, *,
                seed: int = 0, mean: float = 0.5, std: float = 0.25, teacher=None):
    """A complete nonn.bundle/1 directory of tiny models; returns the loaded Bundle.

    Student k's weights come from seed + k, the head's from seed + 1; `teacher` is an optional
    TeacherSummary for the planner's comparisons.
    """
    from nonn.artifacts import sha256_file
    from nonn.runtime.bundle import Bundle, ModelEntry, StudentEntry, TensorSpec
    from nonn.runtime.input_contract import InputContract

    directory.mkdir(parents=True, exist_ok=True)
    students = []
    offset = 0
    for k, size in enumerate(feature_sizes):
        path = tiny_student(directory / f"student_{k}.onnx", size, input_shape, seed=seed + k)
        students.append(
            StudentEntry(
                name=f"student_{k}",
                file=path.name,
                sha256=sha256_file(path),
                input=TensorSpec("input", [-1, *input_shape]),
                output=TensorSpec("features", [-1, size]),
                params=int(np.prod(input_shape)) * size,
                flops=2 * int(np.prod(input_shape)) * size,
                size_bytes=path.stat().st_size,
                feature_size=size,
                group=list(range(offset, offset + size)),
                index=k,
            )
        )
        offset += size
    head_path = tiny_head(directory / "head.onnx", offset, classes, seed=seed + 1)
    head = ModelEntry(
        name="head",
        file=head_path.name,
        sha256=sha256_file(head_path),
        input=TensorSpec("features", [-1, offset]),
        output=TensorSpec("logits", [-1, classes]),
        params=offset * classes + classes,
        flops=2 * offset * classes,
        size_bytes=head_path.stat().st_size,
    )
    c = input_shape[0]
    bundle = Bundle(
        students=students,
        head=head,
        input_contract=InputContract(tuple(input_shape), (mean,) * c, (std,) * c, normalize="explicit"),
        class_names=[f"class{i}" for i in range(classes)],
        teacher=teacher,
        triton_repository_dir=None,
        root=directory,
    )
    bundle.save()
    return Bundle.load(directory)


def reference_logits(bundle, batch: np.ndarray, missing=()) -> np.ndarray:
    """The ensemble's answer computed in-process with ONNX Runtime (zeros for `missing` students)."""
    import onnxruntime as ort

    parts = []
    for k, s in enumerate(bundle.students):
        if k in missing:
            parts.append(np.zeros((len(batch), s.feature_size), np.float32))
        else:
            sess = ort.InferenceSession(str(bundle.path_of(s)), providers=["CPUExecutionProvider"])
            parts.append(sess.run(None, {s.input.name: batch})[0])
    head = ort.InferenceSession(str(bundle.path_of(bundle.head)), providers=["CPUExecutionProvider"])
    return head.run(None, {bundle.head.input.name: np.concatenate(parts, axis=1)})[0]


def started(server):
    """Start a DeviceServer and return it (its `address` is then known)."""
    server.start()
    return server


@contextlib.contextmanager
def device_servers(bundle) -> Iterator[list]:
    """One started DeviceServer per student of `bundle`, stopped on exit."""
    from nonn.runtime.server import DeviceServer, student_backend

    servers = [started(DeviceServer(student_backend(bundle, s.name))) for s in bundle.students]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop(0)


def random_images(n: int, shape, seed: int = 0) -> np.ndarray:
    """A seeded float32 batch of `n` inputs of `shape` (C, H, W)."""
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def free_port() -> int:
    """A loopback port nobody listens on (at the moment of asking)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_live(address: str, credentials=None) -> bool:
    """ServerLive over a fresh channel; False when the server or the client refuses the connection."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            return service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=3).live
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            return False


def spawn_device(bundle, student: str, ready: Path, port: int = 0):
    """`nonn serve` of one student of `bundle` as its own process; returns once its ready file exists."""
    import os
    import subprocess
    import sys
    import time

    ready.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "nonn", "serve", "--bundle", str(bundle.root), "--student", student,
           "--port", str(port), "--ready-file", str(ready)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode())
        assert time.monotonic() < deadline, "device did not start"
        time.sleep(0.05)
    return proc
