"""What every deployment target runs: one `nonn serve` per placed student and the aggregator.

`FleetSpec.build(bundle, plan, options)` checks that the plan was made for the bundle, then
fixes for each student its device, the node (Kubernetes) or host (systemd) that device is, its
memory request and limit (the plan's estimate, and that with headroom, capped at what the
device has), its thread count, and the exact `nonn serve` arguments; and the same for the
aggregator (`nonn serve --aggregate`). The Kubernetes, systemd and container generators all
write these arguments, so every target runs the same commands.

Pure standard library and the runtime's manifest: no torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from nonn.devices.plan_file import Plan, PlanError
from nonn.devices.cost_model import RUNTIME_FOOTPRINT_MB, model_memory_mb
from nonn.runtime.bundle import Bundle

__all__ = [
    "DEFAULT_BUNDLE_PATH",
    "DEFAULT_PORT",
    "DEFAULT_AGGREGATOR_PORT",
    "TLS_MODES",
    "DeployOptions",
    "ServerSpec",
    "FleetSpec",
    "dns_label",
    "parse_nodes",
]

DEFAULT_BUNDLE_PATH = "/opt/nonn/bundle"
DEFAULT_PORT = 8001  # every student's server
DEFAULT_AGGREGATOR_PORT = 8000
TLS_MODES = ("none", "tls", "mtls")
# Resident memory of `nonn serve --aggregate` beyond its head model (the Python ONNX Runtime
# binding, numpy, grpc's asyncio client): 86.4 MiB peak RSS measured with psutil and VmHWM on
# x86-64 (Python 3.11, onnxruntime 1.32) serving a 4-student fleet batches of 1, 8 and 64.
AGGREGATOR_FOOTPRINT_MB = 90.0


@dataclass(frozen=True)
class DeployOptions:
    """Choices shared by every target (the CLI's flags)."""

    fleet: str = "nonn"  # name prefix of every object, so several fleets can share a cluster
    nodes: Mapping[str, str] = field(default_factory=dict)  # plan device name -> node / host name
    bundle_path: str = DEFAULT_BUNDLE_PATH  # where the bundle is on a device / in a pod
    port: int = DEFAULT_PORT
    aggregator_port: int = DEFAULT_AGGREGATOR_PORT
    memory_headroom: float = 1.5  # limit = estimated need x this, capped at the device's memory
    tls: str = "none"  # none | tls | mtls
    tls_dir: str = "/etc/nonn/tls"  # where a server finds tls.crt, tls.key, ca.crt
    max_batch: int = 64

    def __post_init__(self) -> None:
        if not dns_label(self.fleet) == self.fleet:
            raise ValueError(f"fleet name {self.fleet!r}: expected a DNS label (lowercase letters, digits, '-'; starts with a letter), e.g. {dns_label(self.fleet)!r}")
        if self.tls not in TLS_MODES:
            raise ValueError(f"tls {self.tls!r}: expected one of {', '.join(TLS_MODES)}")
        if not self.memory_headroom >= 1.0:
            raise ValueError(f"memory headroom {self.memory_headroom}: expected a factor >= 1")
        for name, port in (("port", self.port), ("aggregator port", self.aggregator_port)):
            if not 1 <= port <= 65535:
                raise ValueError(f"{name} {port}: expected 1..65535")
        if not self.bundle_path.startswith("/"):
            raise ValueError(f"bundle path {self.bundle_path!r}: expected an absolute path")


@dataclass
class ServerSpec:
    """One server process of the fleet: a student on its device, or the aggregator."""

    name: str  # DNS-label name of its objects: "<fleet>-student-0", "<fleet>-aggregator"
    component: str  # "student" | "aggregator"
    student: str | None  # the bundle's student name (None for the aggregator)
    device: str | None  # the plan's device name
    node: str | None  # node (Kubernetes) / host (systemd) the device is; None: not given
    profile: str | None
    threads: int
    memory_request_mb: int
    memory_limit_mb: int
    port: int
    args: list[str]  # after the `nonn` program name: ["serve", "--bundle", ...]
    files: list[str]  # the bundle files this server reads

    def address(self, host: str | None = None) -> str:
        return f"{host or self.name}:{self.port}"


@dataclass
class FleetSpec:
    bundle: Bundle
    plan: Plan
    options: DeployOptions
    students: list[ServerSpec]
    aggregator: ServerSpec

    @property
    def servers(self) -> list[ServerSpec]:
        return [*self.students, self.aggregator]

    @classmethod
    def build(cls, bundle: Bundle, plan: Plan, options: DeployOptions, device_hosts: Sequence[str] | None = None) -> "FleetSpec":
        """The fleet for `bundle` as `plan` places it. `device_hosts` (one per student, in student
        order) are the addresses the aggregator calls; default: each student's server name."""
        plan.check_bundle(bundle)
        unknown = sorted(set(options.nodes) - {d.device for d in plan.devices})
        if unknown:
            raise PlanError(f"--nodes names device(s) {', '.join(unknown)} that the plan does not have; it has {', '.join(d.device for d in plan.devices)}")
        o = options
        students = []
        for entry in bundle.students:
            devices = plan.devices_of(entry.name)
            if len(devices) != 1:
                raise PlanError(f"{entry.name} is placed on {len(devices)} devices ({', '.join(devices)}); deployment files take one device per student")
            row = plan.device(devices[0])
            need = row.memory_mb
            args = ["serve", "--bundle", o.bundle_path, "--student", entry.name, "--host", "0.0.0.0", "--port", str(o.port),
                    "--threads", str(max(1, row.threads)), "--max-batch", str(o.max_batch)]  # fmt: skip
            if o.tls != "none":
                args += ["--tls-cert", f"{o.tls_dir}/tls.crt", "--tls-key", f"{o.tls_dir}/tls.key"]
            if o.tls == "mtls":
                args += ["--tls-client-ca", f"{o.tls_dir}/ca.crt"]
            students.append(
                ServerSpec(
                    name=f"{o.fleet}-{dns_label(entry.name)}",
                    component="student",
                    student=entry.name,
                    device=row.device,
                    node=o.nodes.get(row.device),
                    profile=row.profile,
                    threads=max(1, row.threads),
                    memory_request_mb=math.ceil(need),
                    memory_limit_mb=_limit(need, row.available_mb, o.memory_headroom),
                    port=o.port,
                    args=args,
                    files=["manifest.json", entry.file],
                )
            )
        names = [s.name for s in students]
        if len(set(names)) != len(names):
            raise ValueError(f"student names {[s.student for s in students]} give clashing object names {names}")
        hosts = list(device_hosts) if device_hosts is not None else [s.name for s in students]
        head = bundle.head
        need = model_memory_mb(head.size_bytes, head.activation_bytes, RUNTIME_FOOTPRINT_MB) - RUNTIME_FOOTPRINT_MB + AGGREGATOR_FOOTPRINT_MB
        args = ["serve", "--bundle", o.bundle_path, "--aggregate", "--devices", ",".join(s.address(h) for s, h in zip(students, hosts)),
                "--host", "0.0.0.0", "--port", str(o.aggregator_port)]  # fmt: skip
        if o.tls != "none":
            args += ["--tls-cert", f"{o.tls_dir}/tls.crt", "--tls-key", f"{o.tls_dir}/tls.key", "--device-tls-ca", f"{o.tls_dir}/ca.crt"]
        if o.tls == "mtls":
            args += ["--device-tls-cert", f"{o.tls_dir}/tls.crt", "--device-tls-key", f"{o.tls_dir}/tls.key"]
        aggregator = ServerSpec(
            name=f"{o.fleet}-aggregator",
            component="aggregator",
            student=None,
            device=None,
            node=None,
            profile=plan.aggregator,
            threads=1,
            memory_request_mb=math.ceil(need),
            memory_limit_mb=math.ceil(need * o.memory_headroom),
            port=o.aggregator_port,
            args=args,
            files=["manifest.json", head.file],
        )
        return cls(bundle, plan, options, students, aggregator)


def _limit(need_mb: float, available_mb: float, headroom: float) -> int:
    """The memory limit: the need with headroom, but no more than the device has (and never below the need)."""
    return math.ceil(max(need_mb, min(need_mb * headroom, available_mb)))


def dns_label(text: str) -> str:
    """`text` as an RFC 1123 DNS label (Kubernetes object names, host names): lowercase, [a-z0-9-]."""
    label = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if not label or not label[0].isalpha():
        label = f"n-{label}".rstrip("-")
    return label[:63].rstrip("-")


def parse_nodes(text: str | None, plan: Plan) -> dict[str, str]:
    """--nodes: `NODE,NODE,...` (one per plan device, in the plan's device order) or `DEVICE=NODE,...`."""
    if not text:
        return {}
    items = [item.strip() for item in text.split(",")]
    if any(not item for item in items):
        raise ValueError(f"--nodes {text!r}: an empty item; expected NODE,NODE,... or DEVICE=NODE,...")
    devices = [d.device for d in plan.devices]
    if all("=" in item for item in items):
        pairs = [item.split("=", 1) for item in items]
        nodes = {device.strip(): node.strip() for device, node in pairs}
        if len(nodes) != len(pairs):
            raise ValueError(f"--nodes {text!r}: a device is named twice")
    elif any("=" in item for item in items):
        raise ValueError(f"--nodes {text!r}: mix of NODE and DEVICE=NODE items; use one form")
    else:
        if len(items) != len(devices):
            raise ValueError(
                f"--nodes {text!r}: {len(items)} node(s) for the plan's {len(devices)} devices ({', '.join(devices)}); "
                "give one per device in that order, or DEVICE=NODE pairs"
            )
        nodes = dict(zip(devices, items))
    for device, node in nodes.items():
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?", node):
            raise ValueError(f"--nodes: {node!r} (for {device}) is not a node or host name")
    return nodes
