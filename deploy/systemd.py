"""systemd units for boards without Kubernetes: one per student (on its device) and one for the aggregator.

Each unit runs the fleet's `nonn serve` command line (nonn.deploy.spec) from a virtual
environment, restarts it on failure, caps its memory at the plan's estimate with headroom
(MemoryMax), and sandboxes it: a dynamic user, a read-only system, no new privileges, no
devices, IPv4/IPv6 sockets only, native system calls only. Under TLS the certificate and key
come in as systemd credentials (LoadCredential=), which the dynamic user can read and nobody
else. A README beside the units gives the exact install steps per host, and bundle/ holds the
files each host needs.
"""

from __future__ import annotations

import re
from pathlib import Path

from nonn.deploy.spec import FleetSpec, ServerSpec
from nonn.deploy.writer import write_tree

__all__ = ["DEFAULT_NONN_BIN", "unit_name", "unit_text", "write_systemd"]

DEFAULT_NONN_BIN = "/opt/nonn/venv/bin/nonn"
_PLAIN = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


def unit_name(server: ServerSpec) -> str:
    return f"{server.name}.service"


def _exec_arg(arg: str) -> str:
    """One ExecStart= word: '%' and '$' escaped for systemd, quoted when it holds anything else."""
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if _PLAIN.match(arg):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _server_args(spec: FleetSpec, server: ServerSpec) -> list[str]:
    """The server's arguments, with the TLS files read from the unit's credentials directory (%d)."""
    tls_dir = spec.options.tls_dir + "/"
    return [("%d/" + a[len(tls_dir):]) if a.startswith(tls_dir) else a for a in server.args]


def unit_text(spec: FleetSpec, server: ServerSpec, nonn_bin: str = DEFAULT_NONN_BIN) -> str:
    """The [Unit]/[Service]/[Install] text of one server."""
    words = [_exec_arg(nonn_bin), *(a if a.startswith("%d/") else _exec_arg(a) for a in _server_args(spec, server))]
    what = f"student {server.student} (device {server.device})" if server.student else "aggregator"
    credentials = []
    if spec.options.tls != "none":
        credentials = [f"LoadCredential={name}:{spec.options.tls_dir}/{name}" for name in ("tls.crt", "tls.key", "ca.crt")]
    return "\n".join([
        "[Unit]",
        f"Description=nonn fleet {spec.options.fleet}: {what}",
        "Documentation=man:systemd.exec(5)",
        "Wants=network-online.target",
        "After=network-online.target",
        "StartLimitIntervalSec=60",
        "StartLimitBurst=10",
        "",
        "[Service]",
        "Type=exec",
        f"ExecStart={' '.join(words)}",
        "Restart=on-failure",
        "RestartSec=2",
        "TimeoutStopSec=15",
        "KillSignal=SIGTERM",
        "Environment=PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1",
        f"Environment=OMP_NUM_THREADS={server.threads}",
        f"MemoryMax={server.memory_limit_mb}M",
        "MemorySwapMax=0",
        *credentials,
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "NoNewPrivileges=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "ProtectProc=invisible",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=",
        "UMask=0077",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])  # fmt: skip


def _readme(spec: FleetSpec, nonn_bin: str) -> str:
    o = spec.options
    venv = str(Path(nonn_bin).parent.parent)
    lines = [
        f"# Fleet `{o.fleet}` with systemd",
        "",
        f"Bundle manifest sha256 `{spec.plan.bundle.manifest_sha256 if spec.plan.bundle else '?'}`. "
        f"Every host needs Python 3.10+, nonn's core in `{venv}` and the bundle files in `{o.bundle_path}`.",
        "",
        "| unit | runs on | student | MemoryMax |",
        "|---|---|---|---|",
    ]
    for s in spec.servers:
        host = s.node or (s.device and f"the device {s.device}") or "the aggregating node"
        lines.append(f"| {unit_name(s)} | {host} | {s.student or '(aggregator)'} | {s.memory_limit_mb} MiB |")
    lines += [
        "",
        "On every host, once: nonn's core (no torch) in a virtual environment, from a nonn wheel:",
        "",
        "```bash",
        f"sudo python3 -m venv {venv} && sudo {venv}/bin/pip install nonn-*.whl",
        "```",
    ]
    if o.tls != "none":
        lines += [
            "",
            f"Under TLS each host also needs its certificate, key and CA in {o.tls_dir} (tls.crt, tls.key, ca.crt; the "
            "aggregator's certificate for serverAuth and, under mtls, clientAuth; the devices' for the names or "
            "addresses the aggregator calls). systemd hands them to the service as credentials.",
        ]
    for s in spec.servers:
        host = (s.node or f"the device {s.device}") if s.student else "the aggregating node"
        lines += [
            "",
            f"On {host} ({s.student or 'aggregator'}), from this directory:",
            "",
            "```bash",
            f"sudo install -d -m 0755 {o.bundle_path}",
            f"sudo install -m 0644 {' '.join('bundle/' + f for f in s.files)} {o.bundle_path}/",
            *([f"sudo install -d -m 0700 {o.tls_dir} && sudo install -m 0600 tls.crt tls.key ca.crt {o.tls_dir}/"] if o.tls != "none" else []),
            f"sudo install -m 0644 {unit_name(s)} /etc/systemd/system/",
            f"sudo systemctl daemon-reload && sudo systemctl enable --now {unit_name(s)}",
            f"systemctl status {unit_name(s)}; journalctl -u {unit_name(s)} -f",
            "```",
        ]
    lines.append("")
    if not all(s.node for s in spec.students):
        lines += [
            "The aggregator calls the devices by the host names in its ExecStart (`--devices`); "
            "give the real ones with `nonn deploy systemd --nodes`.",
            "",
        ]
    return "\n".join(lines)


def write_systemd(spec: FleetSpec, out: str | Path, *, nonn_bin: str = DEFAULT_NONN_BIN, overwrite: bool = False) -> list[Path]:
    """Write one unit per server and the README into `out` (atomically); returns the files."""
    if not nonn_bin.startswith("/"):
        raise ValueError(f"--nonn-bin {nonn_bin!r}: systemd needs an absolute path")
    files: dict[str, str | Path] = {unit_name(s): unit_text(spec, s, nonn_bin) for s in spec.servers}
    for name in dict.fromkeys(n for s in spec.servers for n in s.files):
        files[f"bundle/{name}"] = spec.bundle.root / name
    files["README.md"] = _readme(spec, nonn_bin)
    return write_tree(out, files, overwrite=overwrite)
