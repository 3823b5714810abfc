"""A placement plan as the terminal shows it: per device, the device order, then the fleet
against the teacher on one device and a model-parallel split (the plan itself: nonn.devices.planner)."""

from __future__ import annotations

from nonn.devices.plan_file import Plan
from nonn.runtime.traffic import DEVICE_FIELDS, FIELDS, column, describe

__all__ = ["format_plan", "format_device_order"]


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _num(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def format_device_order(p: Plan) -> str:
    """Which device serves each student, in the student order `serve --aggregate` and `infer` take."""
    width = max(len(s.student) for s in p.placement)
    lines = [f"  {s.student.ljust(width)}  {', '.join(s.devices)}" for s in p.placement]
    return "device order (student order: give the devices' host:port in this order to serve --aggregate / infer --devices):\n" + "\n".join(lines)


def format_plan(p: Plan) -> str:
    """The plan as terminal tables: per device, the device order, then NoNN vs teacher vs model-parallel."""
    device_rows = [
        [
            r.device,
            r.student or "(unused)",
            _num(r.memory_mb),
            _num(r.available_mb, ".0f"),
            _num(r.compute_ms, ".2f"),
            *(_num(getattr(r.bytes_per_inference, f), ".0f") for f in DEVICE_FIELDS),
            _num(r.energy_mj, ".2f"),
        ]
        for r in p.devices
    ]
    byte_columns = [column(f) for f in DEVICE_FIELDS]
    parts = [
        _table(["device", "student", "memory MB", "avail MB", "compute ms", *byte_columns, "energy mJ"], device_rows),
        format_device_order(p),
        *_replication_lines(p),
        f"fleet latency {p.nonn.latency_ms:.2f} ms per image (head {p.head_ms:.2g} ms on {p.aggregator}); "
        f"all devices: {describe(p.nonn.bytes_per_inference)}",
    ]
    baselines = [b for b in (p.teacher, p.model_parallel) if b is not None]
    if not baselines:
        parts.append("no teacher summary in the bundle: no comparison with the teacher or a model-parallel split")
        return "\n\n".join(parts)
    ratios = p.ratios()
    headers = ["", "NoNN"] + [f"{b.name.replace('_', '-')} ({b.devices} dev)" for b in baselines] + [f"{b.name.replace('_', '-')}/NoNN" for b in baselines]
    rows = []
    for label, attr, key, spec in (
        ("memory per device (MB)", "memory_per_device_mb", "memory_per_device", ".1f"),
        ("  without runtime (MB)", "model_memory_per_device_mb", "model_memory_per_device", ".2f"),
        ("latency (ms)", "latency_ms", "latency", ".2f"),
        ("energy per node (mJ)", "energy_per_node_mj", "energy_per_node", ".2f"),
    ):
        row = [label, _num(getattr(p.nonn, attr), spec)]
        row += [_num(getattr(b, attr), spec) for b in baselines]
        row += [_num(ratios[b.name][key], ".2f") + "x" if ratios[b.name][key] is not None else "-" for b in baselines]
        rows.append(row)
    for f in FIELDS:
        values = [getattr(e.bytes_per_inference, f) for e in (p.nonn, *baselines)]
        ratio = [None if values[0] in (None, 0) or v is None else v / values[0] for v in values[1:]]
        rows.append([column(f), *(_num(v, ".0f") for v in values), *("-" if r is None else f"{r:.2f}x" for r in ratio)])
    parts.append(_table(headers, rows))
    for b in baselines:
        parts.append(f"{b.name.replace('_', '-')}: {b.note}" + ("" if b.fits else "  [does not fit]"))
    return "\n\n".join(parts)


def _replication_lines(p: Plan) -> list[str]:
    """What replicas cost (devices; bytes per inference stay those of one copy, hedges aside) and buy."""
    replicas = max((len(s.devices) for s in p.placement), default=1)
    if replicas == 1:
        return []
    return [
        f"replication: {replicas} devices per student, {p.nonn.devices} devices instead of {len(p.placement)}; "
        f"the same bytes per inference as one copy ({describe(p.nonn.bytes_per_inference)}; up to about 5% more when "
        "slow replicas are hedged); "
        f"buys: answers at full accuracy with {replicas - 1} device(s) of every student lost (measure accuracy under "
        "loss and p99 with `nonn simulate --replicas ... --kill/--slow`)"
    ]
