"""Network emulation for the simulated fleet: where each device listens, and how clients reach it.

Three choices (`choose_network`):

* ``delay`` (what ``auto`` picks): a relay in the client process (one per device, on loopback,
  `nonn.devices.relay`) sits between the aggregator and the device and applies the delay model
  (`nonn.devices.links`) to every chunk of bytes crossing it. Any gRPC client works through it
  unchanged, and nothing on the host changes.
* ``netns``, only when asked for: every device server runs in a Linux network namespace of its
  own, shaped by the kernel's netem (`nonn.devices.netns`; root, iproute2 and netem needed).
* ``none``: plain loopback without emulation.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import asdict
from typing import Any, Iterable, Sequence

from nonn.devices.links import DELAY_MODEL_TEXT, LinkModel
from nonn.devices.relay import LinkRelay

__all__ = [
    "NETWORK_MODES",
    "NetworkEmulation",
    "NoEmulation",
    "ClientDelayNetwork",
    "choose_network",
    "free_port",
    # Defined elsewhere, importable from here as before:
    "LinkModel",
    "LinkRelay",
]

NETWORK_MODES = ("auto", "netns", "delay", "none")


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
            "model": DELAY_MODEL_TEXT if self.mode == "client-delay" else None,
        }

    def __enter__(self) -> "NetworkEmulation":
        self.setup()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


NoEmulation = NetworkEmulation


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


def choose_network(mode: str, links: Iterable[LinkModel], seed: int = 0) -> NetworkEmulation:
    """The emulation for `mode` ("auto", "netns", "delay", "none").

    "auto" is the client delay model: it never changes the host's network. Namespaces only
    when "netns" asks for them, and then ValueError when they cannot be used here.
    """
    links = list(links)
    if mode not in NETWORK_MODES:
        raise ValueError(f"network emulation {mode!r} is not one of {', '.join(NETWORK_MODES)}")
    if mode == "none":
        return NetworkEmulation(links, reason="emulation switched off (--network none)")
    if mode == "auto":
        return ClientDelayNetwork(links, reason="the client delay model (--network netns for kernel namespaces)", seed=seed)
    if mode == "delay":
        return ClientDelayNetwork(links, reason="client delay model requested (--network delay)", seed=seed)
    from nonn.devices.netns import NamespaceNetwork, netns_unavailable_reason

    why_not = netns_unavailable_reason()
    if why_not is not None:
        raise ValueError(f"--network netns is not possible here: {why_not}")
    return NamespaceNetwork(links, reason="--network netns: root, iproute2 and netem available")
