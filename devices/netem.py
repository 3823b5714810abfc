"""Network emulation for the simulated fleet: each device's link as its profile describes it.

Two ways to put a device behind its link, chosen automatically (`choose_network("auto", ...)`):

* ``netns``: with root, ``ip`` and ``tc``, and a kernel that has the ``netem`` queueing
  discipline, every device server runs in its own Linux network namespace joined to this one
  by a veth pair; both ends get ``tc qdisc ... netem delay L/2 rate B loss p``, so the kernel
  shapes every packet. The aggregator talks to the namespace's address.
* ``client-delay``: otherwise, a relay in the client process (one per device, on loopback)
  sits between the aggregator and the device and applies the *delay model* below to every
  chunk of bytes crossing it. Any gRPC client works through it unchanged.

The delay model (``LinkModel``), per device link, full duplex, each direction independent:

* a chunk of ``n`` bytes takes ``n * 8 / (bandwidth_mbps * 1e6)`` seconds to transmit; chunks
  queue FIFO behind each other on the link (concurrent calls share the bandwidth);
* it arrives ``latency_ms / 2`` after its transmission ends (``latency_ms`` is the round trip);
* it is cut into TCP segments of ``mss`` bytes; each segment is lost with probability
  ``loss`` and every lost segment delays the chunk by one retransmission timeout,
  ``rto_ms = 200 + latency_ms`` (Linux's minimum RTO plus one round trip);
* bytes are delivered in order (a delayed chunk holds back the ones behind it, as TCP does).

So an idle link answers a call with ``q`` request bytes and ``r`` response bytes after
``latency_ms + (q + r) * 8 / bandwidth`` plus the expected loss penalty
(``LinkModel.call_time_s``). ``none`` runs plain loopback without emulation.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import math
import os
import random
import shutil
import socket
import subprocess
import threading
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

__all__ = [
    "LinkModel",
    "LinkRelay",
    "NetworkEmulation",
    "NoEmulation",
    "ClientDelayNetwork",
    "NamespaceNetwork",
    "NETWORK_MODES",
    "choose_network",
    "netns_unavailable_reason",
    "free_port",
]

log = logging.getLogger(__name__)

NETWORK_MODES = ("auto", "netns", "delay", "none")
DEFAULT_MSS = 1448  # TCP payload per segment on a 1500-byte MTU with timestamps


@dataclass(frozen=True)
class LinkModel:
    """One device's link: bandwidth (Mbit/s, each direction), round-trip latency (ms), loss."""

    bandwidth_mbps: float | None = None  # None or <= 0: unlimited
    latency_ms: float = 0.0
    loss: float = 0.0  # probability that one segment is lost
    mss: int = DEFAULT_MSS

    def __post_init__(self) -> None:
        if self.latency_ms < 0 or not math.isfinite(self.latency_ms):
            raise ValueError(f"link latency_ms must be a finite number >= 0, got {self.latency_ms!r}")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"link loss must be a fraction in [0, 1), got {self.loss!r}")
        if self.bandwidth_mbps is not None and not math.isfinite(self.bandwidth_mbps):
            raise ValueError(f"link bandwidth_mbps must be finite, got {self.bandwidth_mbps!r}")
        if self.mss < 1:
            raise ValueError(f"mss must be >= 1, got {self.mss!r}")

    @classmethod
    def from_profile(cls, profile: Any) -> "LinkModel":
        """The link of a DeviceProfile or profile dict (its `link`), or of a link itself."""
        if isinstance(profile, dict):
            link = profile["link"] if "link" in profile else profile
        else:
            link = getattr(profile, "link", profile)
        if link is None:
            return cls()

        def get(name: str, default: float | None) -> Any:
            value = link.get(name, default) if isinstance(link, dict) else getattr(link, name, default)
            return default if value is None else value

        bandwidth = get("bandwidth_mbps", None)
        return cls(
            bandwidth_mbps=float(bandwidth) if bandwidth is not None else None,
            latency_ms=float(get("latency_ms", 0.0)),
            loss=float(get("loss", 0.0)),
        )

    @property
    def unlimited(self) -> bool:
        return self.bandwidth_mbps is None or self.bandwidth_mbps <= 0

    @property
    def one_way_s(self) -> float:
        return self.latency_ms / 2000.0

    @property
    def rto_s(self) -> float:
        """Retransmission timeout charged per lost segment."""
        return (200.0 + self.latency_ms) / 1000.0

    def transmit_s(self, nbytes: int) -> float:
        """Seconds to put `nbytes` on the wire at the link's bandwidth."""
        return 0.0 if self.unlimited else nbytes * 8.0 / (float(self.bandwidth_mbps) * 1e6)  # type: ignore[arg-type]

    def segments(self, nbytes: int) -> int:
        return max(1, math.ceil(nbytes / self.mss))

    def call_time_s(self, request_bytes: int, response_bytes: int, expected_loss: bool = True) -> float:
        """Time of one call on an idle link: round trip + transmission (+ expected loss penalty)."""
        t = self.latency_ms / 1000.0 + self.transmit_s(request_bytes) + self.transmit_s(response_bytes)
        if expected_loss and self.loss > 0:
            lost = (self.segments(request_bytes) + self.segments(response_bytes)) * self.loss
            t += lost * self.rto_s
        return t

    def netem_args(self) -> list[str]:
        """`tc qdisc ... netem` arguments for one direction of this link."""
        args = ["netem", "delay", f"{self.latency_ms / 2:.3f}ms"]
        if not self.unlimited:
            args += ["rate", f"{float(self.bandwidth_mbps) * 1000:.0f}kbit"]  # type: ignore[arg-type]
        if self.loss > 0:
            args += ["loss", f"{self.loss * 100:.4f}%"]
        return args


class _LinkDirection:
    """One direction of a link: FIFO transmission queue, propagation delay, segment loss."""

    def __init__(self, model: LinkModel, rng: random.Random) -> None:
        self.model = model
        self.rng = rng
        self.free_at = 0.0
        self.bytes = 0
        self.lost_segments = 0

    def schedule(self, nbytes: int, now: float) -> float:
        """Arrival time of a chunk of `nbytes` handed to the link at `now` (before ordering)."""
        start = max(now, self.free_at)
        self.free_at = start + self.model.transmit_s(nbytes)
        arrival = self.free_at + self.model.one_way_s
        if self.model.loss > 0:
            lost = sum(1 for _ in range(self.model.segments(nbytes)) if self.rng.random() < self.model.loss)
            self.lost_segments += lost
            arrival += lost * self.model.rto_s
        self.bytes += nbytes
        return arrival


class LinkRelay:
    """A TCP relay on loopback that applies a LinkModel to all traffic to one upstream server.

    Runs its own asyncio loop in a daemon thread so it works beside any client (sync or
    async). When the upstream is down, a new connection is closed at once, so clients see
    UNAVAILABLE rather than a hang; a live connection is closed on both sides when either
    side closes it.
    """

    def __init__(self, upstream: tuple[str, int], model: LinkModel, listen_host: str = "127.0.0.1", seed: int = 0) -> None:
        self.upstream = upstream
        self.model = model
        self.listen_host = listen_host
        rng = random.Random(seed)
        self.up = _LinkDirection(model, random.Random(rng.random()))  # client -> device
        self.down = _LinkDirection(model, random.Random(rng.random()))  # device -> client
        self.port: int | None = None
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.port}"

    def start(self) -> "LinkRelay":
        self._thread = threading.Thread(target=self._run, name=f"link-relay-{self.upstream[1]}", daemon=True)
        self._thread.start()
        self._started.wait(10.0)
        if self._error is not None:
            raise self._error
        if self.port is None:
            raise RuntimeError("link relay did not start within 10 s")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(asyncio.start_server(self._handle, self.listen_host, 0))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.close()
            return
        writers = (client_writer, server_writer)
        self._writers.update(writers)
        try:
            await asyncio.gather(
                self._pump(client_reader, server_writer, self.up),
                self._pump(server_reader, client_writer, self.down),
                return_exceptions=True,
            )
        except asyncio.CancelledError:
            pass  # the relay is stopping
        finally:
            for w in writers:
                self._writers.discard(w)
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: _LinkDirection) -> None:
        """Read chunks as they come, deliver each at its scheduled arrival time, in order."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                arrival, data = item
                delay = arrival - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        last_arrival = 0.0
        try:
            while True:
                data = await reader.read(65536)
                if not data or sender.done():
                    break
                last_arrival = max(last_arrival, direction.schedule(len(data), loop.time()))
                queue.put_nowait((last_arrival, data))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait(None)
            with contextlib.suppress(BaseException):
                await sender
            # One side is gone: close the other so the peer notices (the gRPC channel reconnects).
            writer.close()

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        if loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5.0)
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(5.0)
        self._thread = None

    def stats(self) -> dict[str, Any]:
        return {
            "bytes_up": self.up.bytes,
            "bytes_down": self.down.bytes,
            "lost_segments": self.up.lost_segments + self.down.lost_segments,
            "connections": self.connections,
        }


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class NetworkEmulation:
    """Where each device server listens, how it is started, and where the client connects.

    This base class is "none": plain loopback, no emulation.
    """

    mode = "none"

    def __init__(self, links: Sequence[LinkModel], reason: str = "") -> None:
        self.links = list(links)
        self.reason = reason

    def setup(self) -> None:
        """Create whatever the emulation needs (namespaces, qdiscs); idempotent."""

    def server_host(self, index: int) -> str:
        return "127.0.0.1"

    def server_port(self, index: int) -> int:
        return free_port(self.server_host(index))

    def command_prefix(self, index: int) -> list[str]:
        """Prepended to the device server's command line (e.g. `ip netns exec NS`)."""
        return []

    def client_endpoint(self, index: int, host: str, port: int) -> str:
        """The host:port the aggregator and the health check connect to for device `index`."""
        return f"{host}:{port}"

    def link_stats(self, index: int) -> dict[str, Any] | None:
        return None

    def close(self) -> None:
        """Undo setup(): stop relays, delete namespaces. Safe to call twice."""

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "reason": self.reason,
            "links": [asdict(link) for link in self.links],
            "model": _DELAY_MODEL_TEXT if self.mode == "client-delay" else None,
        }

    def __enter__(self) -> "NetworkEmulation":
        self.setup()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


NoEmulation = NetworkEmulation

_DELAY_MODEL_TEXT = (
    "per device link, each direction: chunks queue FIFO at bandwidth_mbps, arrive latency_ms/2 after "
    "transmission, each lost TCP segment (probability loss) adds 200 ms + latency_ms; in-order delivery"
)


class ClientDelayNetwork(NetworkEmulation):
    """The delay model in the client: a LinkRelay per device between the aggregator and it."""

    mode = "client-delay"

    def __init__(self, links: Sequence[LinkModel], reason: str = "", seed: int = 0) -> None:
        super().__init__(links, reason)
        self.seed = seed
        self.relays: dict[int, LinkRelay] = {}
        self._lock = threading.Lock()

    def client_endpoint(self, index: int, host: str, port: int) -> str:
        with self._lock:
            relay = self.relays.get(index)
            if relay is None or relay.upstream != (host, port):
                if relay is not None:
                    relay.stop()
                relay = LinkRelay((host, port), self.links[index], seed=self.seed + index).start()
                self.relays[index] = relay
            return relay.address

    def link_stats(self, index: int) -> dict[str, Any] | None:
        relay = self.relays.get(index)
        return relay.stats() if relay is not None else None

    def close(self) -> None:
        with self._lock:
            for relay in self.relays.values():
                relay.stop()
            self.relays.clear()


def _run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=20)
    if check and out.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {(out.stderr or out.stdout).strip()}")
    return out


_probe_cache: dict[str, str | None] = {}


def netns_unavailable_reason() -> str | None:
    """None when namespaces + veth + netem work here, else why not (checked once, then cached)."""
    if "netns" in _probe_cache:
        return _probe_cache["netns"]
    reason: str | None = None
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        reason = "network namespaces need root"
    elif not shutil.which("ip") or not shutil.which("tc"):
        reason = "the `ip` and `tc` commands (iproute2) are not installed"
    else:
        tag = f"nnp{os.getpid() % 100000}"
        try:
            _run(["ip", "link", "add", f"{tag}a", "type", "veth", "peer", "name", f"{tag}b"])
            try:
                _run(["tc", "qdisc", "add", "dev", f"{tag}a", "root", *LinkModel(10.0, 1.0, 0.0).netem_args()])
            finally:
                _run(["ip", "link", "del", f"{tag}a"], check=False)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            reason = f"veth/netem not usable here: {exc}"
    _probe_cache["netns"] = reason
    return reason


class NamespaceNetwork(NetworkEmulation):
    """One network namespace per device, joined by a veth pair shaped with netem at both ends."""

    mode = "netns"

    def __init__(self, links: Sequence[LinkModel], reason: str = "") -> None:
        super().__init__(links, reason)
        pid = os.getpid()
        self._tag = f"{pid % 10000}"
        self._octet = 128 + pid % 64
        self.namespaces: list[str] = []
        self._host_veths: list[str] = []
        self._set_up = False

    def _ns(self, index: int) -> str:
        return f"nonn{self._tag}d{index}"

    def server_host(self, index: int) -> str:
        return f"10.{self._octet}.{index}.2"

    def server_port(self, index: int) -> int:
        return 8001  # each namespace has its own port space

    def command_prefix(self, index: int) -> list[str]:
        return ["ip", "netns", "exec", self._ns(index)]

    def qdisc_args(self, link: LinkModel) -> list[str]:
        """The queueing discipline put on both ends of a device's veth pair."""
        return link.netem_args()

    def setup(self) -> None:
        if self._set_up:
            return
        self._set_up = True
        _live_networks.add(self)
        try:
            for i, link in enumerate(self.links):
                ns, host_if, dev_if = self._ns(i), f"nnh{self._tag}x{i}", f"nnd{self._tag}x{i}"
                _run(["ip", "netns", "add", ns])
                self.namespaces.append(ns)
                _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", dev_if])
                self._host_veths.append(host_if)
                _run(["ip", "link", "set", dev_if, "netns", ns])
                _run(["ip", "addr", "add", f"10.{self._octet}.{i}.1/30", "dev", host_if])
                _run(["ip", "link", "set", host_if, "up"])
                _run(["ip", "-n", ns, "addr", "add", f"{self.server_host(i)}/30", "dev", dev_if])
                _run(["ip", "-n", ns, "link", "set", dev_if, "up"])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
                _run(["tc", "qdisc", "add", "dev", host_if, "root", *self.qdisc_args(link)])
                _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev_if, "root", *self.qdisc_args(link)])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for host_if in self._host_veths:
            _run(["ip", "link", "del", host_if], check=False)
        for ns in self.namespaces:
            _run(["ip", "netns", "del", ns], check=False)
        self._host_veths.clear()
        self.namespaces.clear()
        _live_networks.discard(self)


_live_networks: set[NamespaceNetwork] = set()


@atexit.register
def _remove_leftover_namespaces() -> None:
    for net in list(_live_networks):
        with contextlib.suppress(Exception):
            net.close()


def choose_network(mode: str, links: Iterable[LinkModel], seed: int = 0) -> NetworkEmulation:
    """The emulation for `mode` ("auto", "netns", "delay", "none"); "auto" prefers netns.

    "netns" raises when namespaces cannot be used here; "auto" falls back to the client delay
    model and records why in `reason`.
    """
    links = list(links)
    if mode not in NETWORK_MODES:
        raise ValueError(f"network emulation {mode!r} is not one of {', '.join(NETWORK_MODES)}")
    if mode == "none":
        return NetworkEmulation(links, reason="emulation switched off (--network none)")
    if mode == "delay":
        return ClientDelayNetwork(links, reason="client delay model requested (--network delay)", seed=seed)
    why_not = netns_unavailable_reason()
    if why_not is None:
        return NamespaceNetwork(links, reason="root, iproute2 and netem available")
    if mode == "netns":
        raise ValueError(f"--network netns is not possible here: {why_not}")
    return ClientDelayNetwork(links, reason=f"fell back to the client delay model: {why_not}", seed=seed)
