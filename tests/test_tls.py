"""TLS and mutual TLS between clients, device servers and the aggregator (certificates made here)."""

from __future__ import annotations

import numpy as np
import pytest

from nonn.runtime.aggregator import AggregationError, Aggregator
from nonn.runtime.server import DeviceServer, student_backend
from nonn.runtime.tls import ClientTLS, ServerTLS

from runtime_testing import reference_logits, server_live, started

pytestmark = pytest.mark.timeout(60)

FEATURE_SIZES = (2, 3)


def test_tls_server_needs_a_tls_client(bundle, certs):
    tls = ServerTLS(certs["server"], certs["server_key"])
    with DeviceServer(student_backend(bundle, 0), tls=tls) as server:
        assert server_live(server.address, ClientTLS(ca=certs["ca"]).credentials())
        assert not server_live(server.address, None)  # plaintext client
        assert not server_live(server.address, ClientTLS(ca=certs["rogue_ca"]).credentials())  # untrusted server cert


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(bundle, certs):
    tls = ServerTLS(certs["server"], certs["server_key"], client_ca=certs["ca"])
    with DeviceServer(student_backend(bundle, 0), tls=tls) as server:
        good = ClientTLS(ca=certs["ca"], cert=certs["client"], key=certs["client_key"])
        assert server_live(server.address, good.credentials())
        assert not server_live(server.address, ClientTLS(ca=certs["ca"]).credentials())  # no client certificate
        rogue = ClientTLS(ca=certs["ca"], cert=certs["rogue_client"], key=certs["rogue_client_key"])
        assert not server_live(server.address, rogue.credentials())  # certificate from another CA


def test_stock_client_and_aggregator_over_mutual_tls(bundle, certs):
    import tritonclient.grpc as triton

    tls = ServerTLS(certs["server"], certs["server_key"], client_ca=certs["ca"])
    servers = [started(DeviceServer(student_backend(bundle, s.name), tls=tls)) for s in bundle.students]
    try:
        client = triton.InferenceServerClient(
            servers[0].address,
            ssl=True,
            root_certificates=str(certs["ca"]),
            private_key=str(certs["client_key"]),
            certificate_chain=str(certs["client"]),
        )
        assert client.is_model_ready("student_0")
        client.close()
        x = np.random.default_rng(0).normal(size=(2, 1, 4, 4)).astype(np.float32)
        good = ClientTLS(ca=certs["ca"], cert=certs["client"], key=certs["client_key"])
        with Aggregator(bundle, [s.address for s in servers], tls=good) as agg:
            result = agg.infer_sync(x)
        assert result.contributed == [True, True]
        np.testing.assert_allclose(result.logits, reference_logits(bundle, x), rtol=1e-5, atol=1e-5)
        # Without a client certificate every device refuses the handshake: no answer at all.
        with Aggregator(bundle, [s.address for s in servers], tls=ClientTLS(ca=certs["ca"]), retries=0) as agg:
            with pytest.raises(AggregationError, match="student_0 .*UNAVAILABLE.*student_1 .*UNAVAILABLE"):
                agg.infer_sync(x)
    finally:
        for server in servers:
            server.stop(0)


def test_tls_arguments_are_checked(tmp_path, certs):
    assert ServerTLS.from_args(None, None, None) is None
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        ServerTLS.from_args(certs["server"], None)
    with pytest.raises(FileNotFoundError, match="server private key"):
        ServerTLS(certs["server"], tmp_path / "missing.key").credentials()
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="not a PEM file"):
        ClientTLS(ca=tmp_path / "junk.pem").credentials()
    with pytest.raises(ValueError, match="both the certificate and its key"):
        ClientTLS(ca=certs["ca"], cert=certs["client"])


def test_cli_infer_over_mutual_tls(bundle, certs, tmp_path, capsys):
    import json

    from nonn.cli import main

    tls = ServerTLS(certs["server"], certs["server_key"], client_ca=certs["ca"])
    servers = [started(DeviceServer(student_backend(bundle, s.name), tls=tls)) for s in bundle.students]
    try:
        images = np.random.default_rng(0).random((3, 1, 4, 4), dtype=np.float32)
        np.save(tmp_path / "x.npy", images)
        base = ["infer", "--bundle", str(bundle.root), "--devices", ",".join(s.address for s in servers),
                "--input", str(tmp_path / "x.npy"), "--json", "--device-tls-ca", str(certs["ca"])]  # fmt: skip
        assert main(base + ["--device-tls-cert", str(certs["client"]), "--device-tls-key", str(certs["client_key"])]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["degraded_batches"] == 0 and len(report["predictions"]) == 3
        assert main(base + ["--device-tls-cert", str(certs["client"])]) == 2
        assert "--device-tls-cert and --device-tls-key go together" in capsys.readouterr().err
    finally:
        for server in servers:
            server.stop(0)
