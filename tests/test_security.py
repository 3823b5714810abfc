"""Security: mutual TLS on every link, expired certificates, tampered bundles, pickled code, bind addresses."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from nonn.cli import main
from nonn.runtime.aggregator import Aggregator
from nonn.runtime.onnx_model import ModelIntegrityError
from nonn.runtime.server import DeviceServer, student_backend
from nonn.runtime.tls import ClientTLS, ServerTLS

from runtime_testing import reference_logits, server_live, started, tiny_student

pytestmark = pytest.mark.timeout(90)

SHAPE = (1, 4, 4)
FEATURE_SIZES = (2, 3)


def wait_ready_file(proc: subprocess.Popen, ready: Path) -> dict:
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else proc.returncode
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.05)
    return json.loads(ready.read_text())


def listening_addresses(pid: int, port: int) -> set[str]:
    """The local IP addresses process `pid` listens on at `port` (TCP; IPv4-mapped IPv6 as IPv4)."""
    found = set()
    for conn in psutil.Process(pid).net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
            ip = ipaddress.ip_address(conn.laddr.ip)
            mapped = getattr(ip, "ipv4_mapped", None)
            found.add(str(mapped or ip))
    return found


# -- TLS -------------------------------------------------------------------------------------------


def test_expired_certificates_are_refused(bundle, certs):
    good_client = ClientTLS(ca=certs["ca"], cert=certs["client"], key=certs["client_key"])
    # A device presenting an expired certificate: the client refuses it although the CA is right.
    expired = ServerTLS(certs["expired_server"], certs["expired_server_key"], client_ca=certs["ca"])
    with DeviceServer(student_backend(bundle, 0), tls=expired) as server:
        assert not server_live(server.address, good_client.credentials())
    # A client presenting an expired certificate to a mutual-TLS device: the device refuses it.
    mutual = ServerTLS(certs["server"], certs["server_key"], client_ca=certs["ca"])
    with DeviceServer(student_backend(bundle, 0), tls=mutual) as server:
        assert server_live(server.address, good_client.credentials())
        stale = ClientTLS(ca=certs["ca"], cert=certs["expired_client"], key=certs["expired_client_key"])
        assert not server_live(server.address, stale.credentials())
        assert not server_live(server.address, ClientTLS(ca=certs["ca"]).credentials())  # no certificate
        rogue = ClientTLS(ca=certs["ca"], cert=certs["rogue_client"], key=certs["rogue_client_key"])
        assert not server_live(server.address, rogue.credentials())  # wrong CA
        assert not server_live(server.address, None)  # plaintext


def test_mutual_tls_on_every_link_of_the_served_ensemble(bundle, certs, tmp_path):
    """Client -> `nonn serve --aggregate` -> devices, each link mutual TLS; default bind is loopback."""
    import tritonclient.grpc as triton

    device_tls = ServerTLS(certs["server"], certs["server_key"], client_ca=certs["ca"])
    devices = [started(DeviceServer(student_backend(bundle, s.name), tls=device_tls)) for s in bundle.students]
    ready = tmp_path / "front.json"
    cmd = [sys.executable, "-m", "nonn", "serve", "--bundle", str(bundle.root), "--aggregate", "--port", "0",
           "--devices", ",".join(d.address for d in devices), "--ready-file", str(ready), "--retries", "0",
           "--tls-cert", str(certs["server"]), "--tls-key", str(certs["server_key"]), "--tls-client-ca", str(certs["ca"]),
           "--device-tls-ca", str(certs["ca"]), "--device-tls-cert", str(certs["client"]),
           "--device-tls-key", str(certs["client_key"])]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        info = wait_ready_file(proc, ready)
        assert info["host"] == "127.0.0.1"
        assert listening_addresses(proc.pid, info["port"]) == {"127.0.0.1"}
        client = triton.InferenceServerClient(
            info["address"], ssl=True, root_certificates=str(certs["ca"]),
            private_key=str(certs["client_key"]), certificate_chain=str(certs["client"]),
        )  # fmt: skip
        x = np.random.default_rng(0).normal(size=(3, *SHAPE)).astype(np.float32)
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("ensemble", [tensor])
        # Both device links carried the request: every student contributed.
        assert result.get_response().parameters["contributed"].string_param == "1,1"
        np.testing.assert_allclose(result.as_numpy("logits"), reference_logits(bundle, x), rtol=1e-5, atol=1e-5)
        client.close()
        # The front end refuses clients without a certificate from the CA, or in plaintext.
        assert not server_live(info["address"], ClientTLS(ca=certs["ca"]).credentials())
        stale = ClientTLS(ca=certs["ca"], cert=certs["expired_client"], key=certs["expired_client_key"])
        assert not server_live(info["address"], stale.credentials())
        assert not server_live(info["address"], None)
        # The devices refuse anyone but a holder of a client certificate, the front end included.
        for device in devices:
            assert not server_live(device.address, None)
            assert not server_live(device.address, ClientTLS(ca=certs["ca"]).credentials())
    finally:
        proc.terminate()
        proc.wait(15)
        for device in devices:
            device.stop(0)


# -- integrity of bundles ----------------------------------------------------------------------------


def test_a_changed_head_is_refused_by_serve_infer_and_verify(fresh_bundle, tmp_path, capsys):
    bundle = fresh_bundle
    head = bundle.path_of(bundle.head)
    data = bytearray(head.read_bytes())
    data[-1] ^= 0x01
    head.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        Aggregator(bundle.root, ["127.0.0.1:1", "127.0.0.1:2"])
    code = main(["serve", "--bundle", str(bundle.root), "--aggregate", "--devices", "127.0.0.1:1,127.0.0.1:2", "--port", "0"])
    assert code == 2 and "head.onnx: sha256" in capsys.readouterr().err
    np.save(tmp_path / "x.npy", np.zeros((1, *SHAPE), np.float32))
    code = main(["infer", "--bundle", str(bundle.root), "--devices", "127.0.0.1:1,127.0.0.1:2", "--input", str(tmp_path / "x.npy")])
    assert code == 2 and "refusing to load" in capsys.readouterr().err
    assert main(["bundle", "verify", str(bundle.root), "--no-run"]) == 1
    assert "bundle verify: head:" in capsys.readouterr().err


def test_a_swapped_student_model_is_refused_by_serve_and_verify(fresh_bundle, tmp_path, capsys):
    bundle = fresh_bundle
    """A valid ONNX model with the same interface, but not the one the manifest names."""
    student = bundle.path_of(bundle.students[1])
    tiny_student(student, 3, SHAPE, seed=99)
    code = main(["serve", "--bundle", str(bundle.root), "--student", "student_1", "--port", "0"])
    assert code == 2 and "sha256" in capsys.readouterr().err
    assert main(["bundle", "verify", str(bundle.root)]) == 1
    out = capsys.readouterr()
    assert "student_1" in out.out + out.err


# -- pickled code -------------------------------------------------------------------------------------


class _WritesMarker:
    """Unpickling this object runs code: it writes `marker` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def _malicious_checkpoint(path: Path, marker: Path, fmt: str) -> Path:
    import torch

    torch.save({"format": fmt, "state_dict": {"w": torch.ones(2)}, "extra": _WritesMarker(marker)}, path)
    return path


def test_pickled_code_in_checkpoints_is_refused_and_never_runs(tmp_path, capsys):
    import torch

    from nonn.artifacts import ArtifactError
    from nonn.students.checkpoint import load_checkpoint
    from nonn.students.teacher_loading import TEACHER_FORMAT, load_teacher
    from nonn.students.train import load_students

    # The payload is live: an unsafe load runs it.
    control = tmp_path / "control-marker"
    torch.load(_malicious_checkpoint(tmp_path / "control.pt", control, TEACHER_FORMAT), weights_only=False)
    assert control.read_text() == "code ran"

    marker = tmp_path / "marker"
    teacher = _malicious_checkpoint(tmp_path / "teacher.pt", marker, TEACHER_FORMAT)
    students = _malicious_checkpoint(tmp_path / "students.pt", marker, "nonn.students/1")
    with pytest.raises(ArtifactError, match="teacher.pt: refused to load"):
        load_checkpoint(teacher, TEACHER_FORMAT)
    with pytest.raises(ArtifactError, match="teacher.pt: refused to load"):
        load_teacher(teacher)
    with pytest.raises(ArtifactError, match="students.pt: refused to load"):
        load_students(students)
    # Bring-your-own weights for a factory go through the same safe loader.
    with pytest.raises(ArtifactError, match="teacher.pt: refused to load"):
        load_teacher(factory="torch.nn:Identity", weights=teacher)
    # And so do the command-line tools.
    assert main(["export", "--students", str(students), "--out", str(tmp_path / "bundle")]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert main(["eval-teacher", "--teacher", str(teacher), "--dataset", "digits"]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "bundle").exists()


def test_pickled_code_in_a_cifar_batch_is_refused(tmp_path):
    """CIFAR ships as Python pickles: they are read with an unpickler that only rebuilds arrays."""
    import pickle

    from nonn.students.data import DataError, load_dataset

    marker = tmp_path / "marker"
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"]:
        (root / name).write_bytes(pickle.dumps({b"data": _WritesMarker(marker), b"labels": [0]}))
    with pytest.raises(DataError, match="data_batch_1: not a readable CIFAR python batch .*refusing to load builtins.exec"):
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert not marker.exists()


# -- bind addresses ------------------------------------------------------------------------------------


def test_servers_bind_loopback_unless_asked(bundle, tmp_path):
    server = started(DeviceServer(student_backend(bundle, 0)))
    try:
        assert listening_addresses(os.getpid(), server.port) == {"127.0.0.1"}
    finally:
        server.stop(0)
    # `nonn serve` without --host: loopback only.
    ready = tmp_path / "ready.json"
    cmd = [sys.executable, "-m", "nonn", "serve", "--bundle", str(bundle.root), "--student", "0", "--port", "0", "--ready-file", str(ready)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        info = wait_ready_file(proc, ready)
        assert listening_addresses(proc.pid, info["port"]) == {"127.0.0.1"}
    finally:
        proc.terminate()
        proc.wait(15)
    # Asked for every interface, it binds every interface.
    server = started(DeviceServer(student_backend(bundle, 0), host="0.0.0.0"))
    try:
        bound = listening_addresses(os.getpid(), server.port)
        assert bound and all(ipaddress.ip_address(ip).is_unspecified for ip in bound), bound
    finally:
        server.stop(0)


def test_a_simulated_fleet_listens_on_loopback_only(bundle):
    from nonn.devices.fleet import LocalFleet

    from fleet_testing import tiny_profile

    with LocalFleet(bundle.root, [tiny_profile(), tiny_profile()]) as fleet:
        for device, pid in zip(fleet.devices, fleet.pids()):
            assert listening_addresses(pid, device.port) == {"127.0.0.1"}
