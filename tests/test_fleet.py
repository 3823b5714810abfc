"""Network emulation (delay model, link relay) and the local fleet of device server processes."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from nonn.devices import netns
from nonn.devices.links import LinkDirection, LinkModel
from nonn.devices.netem import ClientDelayNetwork, NetworkEmulation, choose_network, free_port
from nonn.devices.netns import NamespaceNetwork
from nonn.devices.relay import LinkRelay

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- delay model


def test_link_model_call_time_is_latency_plus_bytes_over_bandwidth():
    link = LinkModel(bandwidth_mbps=8.0, latency_ms=20.0)
    # 8 Mbit/s = 1 byte per microsecond: 1000 + 3000 bytes take 4 ms on top of the 20 ms round trip.
    assert link.call_time_s(1000, 3000) == pytest.approx(0.024)
    assert LinkModel(bandwidth_mbps=None, latency_ms=5.0).call_time_s(10**9, 10**9) == pytest.approx(0.005)
    lossy = LinkModel(bandwidth_mbps=8.0, latency_ms=20.0, loss=0.01)
    # 1 + 3 segments, 1% each, each loss costs 200 ms + one round trip.
    assert lossy.call_time_s(1000, 3000) == pytest.approx(0.024 + 4 * 0.01 * 0.220)
    assert lossy.call_time_s(1000, 3000, expected_loss=False) == pytest.approx(0.024)


def test_link_model_rejects_bad_figures():
    with pytest.raises(ValueError, match="loss"):
        LinkModel(loss=1.5)
    with pytest.raises(ValueError, match="latency_ms"):
        LinkModel(latency_ms=-1)


def test_link_model_from_profile_reads_object_or_dict():
    class Link:
        bandwidth_mbps, latency_ms, loss = 50.0, 3.0, 0.001

    class Profile:
        link = Link()

    assert LinkModel.from_profile(Profile()) == LinkModel(50.0, 3.0, 0.001)
    assert LinkModel.from_profile({"link": None}) == LinkModel()
    assert LinkModel.from_profile({"name": "x", "link": {"bandwidth_mbps": 5, "latency_ms": 7, "loss": 0.1}}) == LinkModel(5.0, 7.0, 0.1)
    assert LinkModel.from_profile({"bandwidth_mbps": 10, "latency_ms": 1}) == LinkModel(10.0, 1.0, 0.0)
    assert LinkModel(10.0, 4.0, 0.02).netem_args() == ["netem", "delay", "2.000ms", "rate", "10000kbit", "loss", "2.0000%"]


def test_link_direction_queues_chunks_fifo_and_charges_lost_segments():
    link = LinkModel(bandwidth_mbps=8.0, latency_ms=10.0)
    d = LinkDirection(link, random.Random(0))
    # Two 1000-byte chunks handed over at t=0: the second waits for the first (1 ms each).
    assert d.schedule(1000, 0.0) == pytest.approx(0.001 + 0.005)
    assert d.schedule(1000, 0.0) == pytest.approx(0.002 + 0.005)
    # An idle link later: no queueing.
    assert d.schedule(1000, 1.0) == pytest.approx(1.006)

    class AlwaysLose(random.Random):
        def random(self) -> float:
            return 0.0

    lossy = LinkDirection(LinkModel(bandwidth_mbps=None, latency_ms=10.0, loss=0.5), AlwaysLose())
    # 3000 bytes = 3 segments, all lost: 3 retransmission timeouts of 210 ms.
    assert lossy.schedule(3000, 0.0) == pytest.approx(0.005 + 3 * 0.210)
    assert lossy.lost_segments == 3


def _rpc_server() -> tuple[socket.socket, int]:
    """A tiny request/response server: reads a length-prefixed request, answers `reply` bytes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return

            def handle(conn: socket.socket = conn) -> None:
                with conn:
                    while True:
                        head = conn.recv(8, socket.MSG_WAITALL)
                        if len(head) < 8:
                            return
                        n, reply = struct.unpack("!II", head)
                        got = 0
                        while got < n:
                            chunk = conn.recv(n - got)
                            if not chunk:
                                return
                            got += len(chunk)
                        conn.sendall(b"r" * reply)

            threading.Thread(target=handle, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def _call(sock: socket.socket, request: int, reply: int) -> float:
    t0 = time.perf_counter()
    sock.sendall(struct.pack("!II", request, reply) + b"q" * request)
    got = 0
    while got < reply:
        chunk = sock.recv(1 << 20)
        assert chunk, "connection closed"
        got += len(chunk)
    return time.perf_counter() - t0


def test_link_relay_delays_calls_as_the_model_says():
    srv, port = _rpc_server()
    link = LinkModel(bandwidth_mbps=4.0, latency_ms=30.0)
    relay = LinkRelay(("127.0.0.1", port), link).start()
    try:
        direct = socket.create_connection(("127.0.0.1", port))
        via = socket.create_connection(("127.0.0.1", relay.port))
        with direct, via:
            for request, reply in [(10, 10), (20000, 400)]:
                base = min(_call(direct, request, reply) for _ in range(2))
                expected = link.call_time_s(request + 8, reply)
                measured = min(_call(via, request, reply) for _ in range(2))
                assert measured >= expected * 0.97, (request, measured, expected)
                assert measured <= expected + base + 0.2, (request, measured, expected)  # slack for a loaded machine
        stats = relay.stats()
        assert stats["bytes_up"] == 2 * (18 + 20008) and stats["bytes_down"] == 2 * (10 + 400)
    finally:
        relay.stop()
        srv.close()


def test_link_relay_closes_client_when_device_is_down():
    dead_port = free_port()
    relay = LinkRelay(("127.0.0.1", dead_port), LinkModel(latency_ms=1.0)).start()
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
            s.sendall(b"hello")
            assert s.recv(10) == b""  # closed at once, not left hanging
    finally:
        relay.stop()


def test_choose_network_modes(monkeypatch):
    links = [LinkModel(10.0, 2.0), LinkModel(20.0, 4.0)]

    def probe():
        raise AssertionError("only --network netns may look at (or change) the host's network")

    monkeypatch.setattr(netns, "netns_unavailable_reason", probe)
    assert choose_network("none", links).mode == "none"
    delay = choose_network("delay", links)
    assert isinstance(delay, ClientDelayNetwork) and delay.describe()["model"]
    auto = choose_network("auto", links)
    assert isinstance(auto, ClientDelayNetwork) and "--network netns" in auto.reason
    monkeypatch.setattr(netns, "netns_unavailable_reason", lambda: "network namespaces need root")
    with pytest.raises(ValueError, match="netns is not possible here: network namespaces need root"):
        choose_network("netns", links)
    monkeypatch.setattr(netns, "netns_unavailable_reason", lambda: None)
    assert isinstance(choose_network("netns", links), NamespaceNetwork)
    with pytest.raises(ValueError, match="not one of"):
        choose_network("wifi", links)
    assert isinstance(NetworkEmulation(links).server_port(0), int)


# --------------------------------------------------------------------------- local fleet


def _require_namespaces() -> None:
    """Skip unless NONN_TEST_NETNS=1 asks for tests that change this host's network, and they can run."""
    if os.environ.get("NONN_TEST_NETNS") != "1":
        pytest.skip("changes the host's network (namespaces, veth links): set NONN_TEST_NETNS=1 to run")
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        pytest.skip("needs root and iproute2")


class _TokenBucketNamespaces(NamespaceNetwork):
    """Namespaces shaped with tbf (bandwidth only): runs where the kernel lacks netem."""

    def qdisc_args(self, link: LinkModel) -> list[str]:
        return ["tbf", "rate", f"{link.bandwidth_mbps:g}mbit", "burst", "32kbit", "latency", "50ms"]


@pytest.mark.slow
def test_fleet_in_network_namespaces_serves_and_cleans_up(tmp_path):
    import ipaddress
    import sys

    import numpy as np

    from fleet_testing import ensemble_predictions, make_bundle, tiny_images, tiny_profile
    from nonn.devices.fleet import LocalFleet
    from nonn.runtime.aggregator import Aggregator

    _require_namespaces()
    # What a SIGKILLed owner leaves behind: a namespace and a link named after a dead process.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead = int(gone.stdout)
    subprocess.run(["ip", "netns", "add", f"nonn{dead}d0"], check=True)
    subprocess.run(["ip", "link", "add", f"nnh{dead}x0", "type", "veth", "peer", "name", f"nnd{dead}x0"], check=True)
    bundle = make_bundle(tmp_path / "bundle", feature_sizes=(2, 2))
    network = _TokenBucketNamespaces([LinkModel(bandwidth_mbps=50.0)] * 2, reason="test")
    x = tiny_images(8)
    with LocalFleet(bundle.root, [tiny_profile()] * 2, network) as fleet:
        owned = netns.owned_names()
        assert (f"nonn{dead}d0", dead) not in owned["namespaces"] and (f"nnh{dead}x0", dead) not in owned["links"]
        namespaces = list(network.namespaces)
        assert len(namespaces) == 2 and all(str(os.getpid()) in ns for ns in namespaces)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert all(ns in listed for ns in namespaces)
        # Each server listens on its namespace's address in the benchmarking range, over the veth pair.
        assert [e.rsplit(":", 1)[0] for e in fleet.endpoints] == [network.server_host(0), network.server_host(1)]
        assert all(ipaddress.ip_address(network.server_host(i)) in netns.ADDRESS_RANGE for i in range(2))
        assert all(fleet.is_serving(i) for i in range(2))
        with Aggregator(bundle, fleet.endpoints, deadline_s=5.0) as agg:
            result = agg.infer_sync(bundle.input_contract.prepare(x))
        assert all(result.contributed)
        assert np.array_equal(result.logits.argmax(axis=1), ensemble_predictions(bundle, x))
        pids = fleet.pids()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in namespaces)
    links = subprocess.run(["ip", "link", "show"], capture_output=True, text=True).stdout
    assert network.host_link(0) not in links
    import psutil

    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_devices_die_with_a_killed_launcher(tmp_path):
    """Even SIGKILL of the launching process (no atexit, no finally) leaves no device server behind."""
    import signal
    import sys

    import psutil

    from fleet_testing import make_bundle

    make_bundle(tmp_path / "bundle", feature_sizes=(2, 2))
    script = (
        "import sys, time\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from fleet_testing import tiny_profile\n"
        "from nonn.devices.fleet import LocalFleet\n"
        "fleet = LocalFleet(sys.argv[1], [tiny_profile()] * 2, log_dir=sys.argv[3])\n"
        "fleet.start()\n"
        "print(*fleet.pids(), flush=True)\n"
        "time.sleep(60)\n"
    )
    tests_dir = str(Path(__file__).parent)
    launcher = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "bundle"), tests_dir, str(tmp_path / "logs")], stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        pids = [int(p) for p in launcher.stdout.readline().split()]
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(10)
        deadline = time.monotonic() + 10
        alive = pids
        while alive and time.monotonic() < deadline:
            alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
            time.sleep(0.1)
        assert alive == [], f"device servers outlived their launcher: {alive}"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in pids:  # only if the test failed: do not leave its servers running
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
