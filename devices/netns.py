"""Network namespaces for the simulated fleet (`--network netns` only; needs root, iproute2, netem).

Each device server runs in a Linux network namespace of its own, joined to this one by a veth
pair; both ends get ``tc qdisc ... netem delay L/2 rate B loss p`` so the kernel shapes every
packet. The host's network is touched as little as can be:

* addresses come from 198.18.0.0/15, the range RFC 2544 sets aside for benchmarking, one /30
  per device, in a block no other interface on this host uses;
* every namespace and link carries the owner's process id in its name (``nonn<PID>d<K>``,
  ``nnh<PID>x<K>``, ``nnd<PID>x<K>``), and is deleted when the fleet stops or its process exits;
* whatever a killed owner (SIGKILL) left behind is deleted at the next start, by any owner:
  names whose process id no longer runs.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import logging
import os
import re
import shutil
import subprocess
from typing import Sequence

from nonn.devices.links import LinkModel
from nonn.devices.netem import NetworkEmulation

__all__ = ["ADDRESS_RANGE", "NamespaceNetwork", "netns_unavailable_reason", "remove_leftovers", "owned_names"]

log = logging.getLogger(__name__)

ADDRESS_RANGE = ipaddress.ip_network("198.18.0.0/15")
_BLOCK = 64  # addresses per fleet: 16 devices of a /30 each
_MAX_DEVICES = _BLOCK // 4
_NAMESPACE_RE = re.compile(r"^nonn(\d+)d\d+$")
_LINK_RE = re.compile(r"^nn[hd](\d+)x\d+$")


def _run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=20)
    if check and out.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {(out.stderr or out.stdout).strip()}")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owned_names() -> dict[str, list[tuple[str, int]]]:
    """nonn's namespaces and links on this host, each with the process id in its name."""
    namespaces = []
    for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if m := _NAMESPACE_RE.match(name):
            namespaces.append((name, int(m.group(1))))
    links = []
    for line in _run(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        parts = line.split(":", 2)
        name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        if m := _LINK_RE.match(name):
            links.append((name, int(m.group(1))))
    return {"namespaces": namespaces, "links": links}


def remove_leftovers() -> list[str]:
    """Delete the namespaces and links of owners that no longer run; returns their names."""
    removed = []
    owned = owned_names()
    for name, pid in owned["links"]:
        if not _pid_alive(pid) and _run(["ip", "link", "del", name], check=False).returncode == 0:
            removed.append(name)
    for name, pid in owned["namespaces"]:
        if not _pid_alive(pid) and _run(["ip", "netns", "del", name], check=False).returncode == 0:
            removed.append(name)
    if removed:
        log.warning("removed network namespaces and links left by stopped simulations: %s", ", ".join(removed))
    return removed


_probe_cache: dict[str, str | None] = {}


def netns_unavailable_reason() -> str | None:
    """None when namespaces + veth + netem work here, else why not (checked once, then cached).

    The check creates and deletes one veth pair named after this process.
    """
    if "netns" in _probe_cache:
        return _probe_cache["netns"]
    reason: str | None = None
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        reason = "network namespaces need root"
    elif not shutil.which("ip") or not shutil.which("tc"):
        reason = "the `ip` and `tc` commands (iproute2) are not installed"
    else:
        probe = f"nnh{os.getpid()}x999"
        try:
            _run(["ip", "link", "add", probe, "type", "veth", "peer", "name", f"nnd{os.getpid()}x999"])
            try:
                _run(["tc", "qdisc", "add", "dev", probe, "root", *LinkModel(10.0, 1.0, 0.0).netem_args()])
            finally:
                _run(["ip", "link", "del", probe], check=False)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            reason = f"veth/netem not usable here: {exc}"
    _probe_cache["netns"] = reason
    return reason


def _addresses_in_use() -> set[ipaddress.IPv4Address]:
    out = _run(["ip", "-o", "-4", "addr", "show"], check=False).stdout
    used = set()
    for token in out.split():
        with contextlib.suppress(ValueError):
            used.add(ipaddress.ip_interface(token).ip)
    return used


def _free_block(pid: int) -> int:
    """The first address offset in ADDRESS_RANGE, from a pid-chosen start, that nothing here uses."""
    blocks = ADDRESS_RANGE.num_addresses // _BLOCK
    used = {int(a) - int(ADDRESS_RANGE.network_address) for a in _addresses_in_use() if a in ADDRESS_RANGE}
    for step in range(blocks):
        offset = ((pid + step) % blocks) * _BLOCK
        if not any(offset <= u < offset + _BLOCK for u in used):
            return offset
    raise RuntimeError(f"no free block of {_BLOCK} addresses left in {ADDRESS_RANGE}")


class NamespaceNetwork(NetworkEmulation):
    """One network namespace per device, joined by a veth pair shaped with netem at both ends."""

    mode = "netns"

    def __init__(self, links: Sequence[LinkModel], reason: str = "") -> None:
        super().__init__(links, reason)
        if len(self.links) > _MAX_DEVICES:
            raise ValueError(f"--network netns supports up to {_MAX_DEVICES} devices, got {len(self.links)}")
        self.owner = os.getpid()
        self._offset: int | None = None
        self.namespaces: list[str] = []
        self._host_veths: list[str] = []
        self._set_up = False

    def _ns(self, index: int) -> str:
        return f"nonn{self.owner}d{index}"

    def host_link(self, index: int) -> str:
        return f"nnh{self.owner}x{index}"

    def _address(self, index: int, host: int) -> ipaddress.IPv4Address:
        if self._offset is None:
            raise RuntimeError("the namespaces are not set up yet")
        return ADDRESS_RANGE.network_address + self._offset + 4 * index + host

    def server_host(self, index: int) -> str:
        return str(self._address(index, 2))

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
        remove_leftovers()
        _live_networks.add(self)
        try:
            self._offset = _free_block(self.owner)
            for i, link in enumerate(self.links):
                ns, host_if, dev_if = self._ns(i), self.host_link(i), f"nnd{self.owner}x{i}"
                _run(["ip", "netns", "add", ns])
                self.namespaces.append(ns)
                _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", dev_if])
                self._host_veths.append(host_if)
                _run(["ip", "link", "set", dev_if, "netns", ns])
                _run(["ip", "addr", "add", f"{self._address(i, 1)}/30", "dev", host_if])
                _run(["ip", "link", "set", host_if, "up"])
                _run(["ip", "-n", ns, "addr", "add", f"{self._address(i, 2)}/30", "dev", dev_if])
                _run(["ip", "-n", ns, "link", "set", dev_if, "up"])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
                _run(["tc", "qdisc", "add", "dev", host_if, "root", *self.qdisc_args(link)])
                _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev_if, "root", *self.qdisc_args(link)])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Delete every link and namespace this network made. Safe to call twice."""
        for host_if in self._host_veths:
            _run(["ip", "link", "del", host_if], check=False)
        for ns in self.namespaces:
            _run(["ip", "netns", "del", ns], check=False)
        self._host_veths.clear()
        self.namespaces.clear()
        _live_networks.discard(self)


_live_networks: set[NamespaceNetwork] = set()


@atexit.register
def _remove_own_namespaces() -> None:
    for net in list(_live_networks):
        with contextlib.suppress(Exception):
            net.close()
