"""Reports of a simulated fleet run: a JSON summary, a terminal table, a self-contained HTML page.

`build_report(result)` reduces a `SimulationResult` to plain JSON data: accuracy (and agreement
with the teacher), lost and degraded requests, latency percentiles and histogram, throughput,
bytes per inference and peak RSS per device against its memory limit, the network emulation
that ran, the fault timeline (accuracy over time), and the estimated cost on the real devices
side by side with the teacher on one device of the same profile (from `nonn.devices.planner`).
`format_table(report)` prints it; `write_html(report, path)` embeds the plots as base64 PNGs
(matplotlib, imported only there).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from nonn.artifacts import atomic_write_json, atomic_write_text
from nonn.devices.fault_report import comparison, device_health, fault_tables
from nonn.devices.report_format import fmt as _fmt
from nonn.devices.report_format import fraction as _fraction
from nonn.devices.report_format import pct as _pct
from nonn.devices.report_format import percentiles as _percentiles
from nonn.devices.report_format import round_ as _round
from nonn.devices.report_format import rows_table as _rows_table

if TYPE_CHECKING:
    from nonn.devices.simulate import SimulationResult

__all__ = ["REPORT_FORMAT", "build_report", "format_table", "write_json", "write_html", "render_html", "REQUIRED_KEYS"]

REPORT_FORMAT = "nonn.simulation/1"
REQUIRED_KEYS = ("accuracy", "requests", "answered", "lost", "degraded", "latency_ms", "devices", "network_emulation", "timeline")


def _outage_windows(events: Sequence[dict[str, Any]], end_s: float) -> list[dict[str, Any]]:
    """[start, end) windows during which some device was down, from killed/serving events."""
    windows: list[dict[str, Any]] = []
    down: dict[int, float] = {}
    for e in sorted(events, key=lambda e: e["t"]):
        if e["event"] == "killed" and e["device"] not in down:
            down[e["device"]] = e["t"]
        elif e["event"] == "serving" and e["device"] in down:
            windows.append({"device": e["device"], "start_s": down.pop(e["device"]), "end_s": e["t"]})
    for device, start in down.items():
        windows.append({"device": device, "start_s": start, "end_s": max(end_s, start)})
    return sorted(windows, key=lambda w: w["start_s"])


def _first_full_answers(result: "SimulationResult", windows: list[dict[str, Any]]) -> None:
    """Per outage: when the first request that the device answered again was sent (None: never)."""
    for w in windows:
        back = (result.request_start_s >= w["end_s"]) & result.device_answered(w["device"]) if result.num_requests else np.zeros(0, bool)
        w["answering_again_s"] = _round(float(result.request_start_s[back].min()), 4) if back.any() else None


def _timeline(result: "SimulationResult", correct: np.ndarray, agree: np.ndarray | None, windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, degraded share and devices contributing over time, in equal bins of request start."""
    start = result.request_start_s
    end = max(result.wall_s, float(start.max()) if start.size else 0.0, 1e-3)
    n_bins = int(min(40, max(1, result.num_requests // 5)))
    width = end / n_bins
    bins = []
    which = np.minimum((start / width).astype(int), n_bins - 1) if start.size else np.zeros(0, dtype=int)
    answered = result.answered
    full = result.contributed.all(axis=1)
    for b in range(n_bins):
        sel = which == b
        ok = sel & answered
        n_img = int(ok.sum() * result.config.batch_size)
        bins.append(
            {
                "t0_s": round(b * width, 4),
                "t1_s": round((b + 1) * width, 4),
                "requests": int(sel.sum()),
                "answered": int(ok.sum()),
                "degraded": int((ok & ~full).sum()),
                "accuracy": _round(_fraction(correct[ok].sum(), n_img)),
                "teacher_agreement": None if agree is None else _round(_fraction(agree[ok].sum(), n_img)),
                "devices_contributing": _round(float(result.contributed[ok].sum(axis=1).mean()) if ok.any() else None, 3),
            }
        )
    return {"bin_s": round(width, 4), "bins": bins, "events": list(result.events), "outages": windows}


def _profile_dict(p: Any) -> dict[str, Any]:
    if isinstance(p, dict):
        return dict(p)
    to_dict = getattr(p, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    from dataclasses import asdict, is_dataclass

    if is_dataclass(p):
        return asdict(p)
    return {"name": str(getattr(p, "name", p))}


def _estimates(result: "SimulationResult") -> dict[str, Any] | None:
    """Cost on the real devices vs the teacher on one device of the same profile (the planner's model)."""
    try:
        from nonn.devices import planner
    except ImportError:  # planner not installed with this build
        return None
    estimate = getattr(planner, "simulation_estimates", None)
    if estimate is None:
        return None
    return estimate(result.bundle_dir, result.profiles, replicas=result.replicas)


def build_report(result: "SimulationResult", *, dataset: str | None = None) -> dict[str, Any]:
    """The JSON summary of a run (format "nonn.simulation/1")."""
    R = result.num_requests
    B = result.config.batch_size
    answered = result.answered
    full = result.contributed.all(axis=1) if R else np.zeros(0, dtype=bool)
    degraded = answered & ~full
    labels = result.labels[result.image_index] if R else np.zeros((0, B), dtype=np.int64)
    correct = (result.predictions == labels).sum(axis=1) if R else np.zeros(0, dtype=int)
    agree = teacher_correct = None
    if result.teacher_predictions is not None:
        teacher = result.teacher_predictions[result.image_index] if R else np.zeros((0, B), dtype=np.int64)
        agree = (result.predictions == teacher).sum(axis=1)
        teacher_correct = (teacher == labels).sum(axis=1)
    n_answered_img = int(answered.sum()) * B

    windows = _outage_windows(result.events, result.wall_s)
    _first_full_answers(result, windows)
    in_outage = np.zeros(R, dtype=bool)
    for w in windows:
        in_outage |= (result.request_start_s >= w["start_s"]) & (result.request_start_s < w["end_s"])

    def acc(mask: np.ndarray) -> float | None:
        m = mask & answered
        return _round(_fraction(correct[m].sum(), int(m.sum()) * B))

    images_answered = max(n_answered_img, 1)
    devices = []
    for k, d in enumerate(result.devices):
        sent = int(result.bytes_sent[answered, k].sum()) if R else 0
        received = int(result.bytes_received[answered, k].sum()) if R else 0
        link = d.get("link_stats") or None
        dev = {
            **{key: d[key] for key in ("index", "student", "profile", "threads", "endpoint", "server_address", "starts")},
            "peak_rss_mb": d["peak_rss_mb"],
            "memory_limit_mb": d["memory_limit_mb"],
            "over_memory": bool(d["over_memory"]),
            "bytes_per_inference": _round((sent + received) / images_answered, 1),
            "bytes_sent_per_inference": _round(sent / images_answered, 1),
            "bytes_received_per_inference": _round(received / images_answered, 1),
            "contributed": _round(_fraction(result.device_answered(k)[answered].sum(), int(answered.sum()))),
            "skipped": int(result.skipped[:, k].sum()) if result.skipped is not None and R else 0,
            "wire_bytes_per_inference": None
            if not link
            else _round((link["bytes_up"] + link["bytes_down"]) / max(R * B, 1), 1),
            "events": d.get("events", []),
        }
        devices.append(dev)

    warnings = []
    for dev in devices:
        if dev["over_memory"]:
            warnings.append(
                f"device {dev['index']} ({dev['profile']}): peak RSS {dev['peak_rss_mb']:.1f} MB exceeds its "
                f"{dev['memory_limit_mb']:.0f} MB memory"
            )
    fired = {(e["device"], e.get("fault")) for e in result.events if e["event"] == "killed"}
    for f in result.config.faults:
        if (f.device, str(f)) not in fired:
            warnings.append(
                f"fault {f} did not happen: the stream ended at {result.wall_s:.2f} s"
            )
    lost = int(R - answered.sum())
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "bundle": result.bundle_dir,
        "dataset": dataset,
        "config": result.config.to_dict(),
        "network_emulation": result.network,
        "requests": R,
        "answered": int(answered.sum()),
        "lost": lost,
        "degraded": int(degraded.sum()),
        "batch_size": B,
        "images": R * B,
        "accuracy": _round(_fraction(correct[answered].sum(), n_answered_img)),
        "accuracy_all_devices": acc(full),
        "accuracy_degraded": acc(degraded),
        "accuracy_during_outage": acc(in_outage) if windows else None,
        "teacher_agreement": None if agree is None else _round(_fraction(agree[answered].sum(), n_answered_img)),
        "teacher_accuracy": None if teacher_correct is None else _round(_fraction(teacher_correct[answered].sum(), n_answered_img)),
        "latency_ms": _percentiles(result.latency_s),
        "throughput": {
            "requests_per_s": _round(_fraction(int(answered.sum()), result.wall_s), 2),
            "images_per_s": _round(_fraction(n_answered_img, result.wall_s), 2),
        },
        "wall_s": _round(result.wall_s, 3),
        "startup_s": _round(result.startup_s, 3),
        "devices": devices,
        "bytes_per_inference": _round(sum(d["bytes_per_inference"] or 0 for d in devices), 1),
        "faults": [str(f) for f in result.config.faults],
        "timeline": _timeline(result, correct, agree, windows),
        "replicas": result.replicas,
        "slowdowns": [str(f) for f in result.config.slowdowns],
        "device_health": device_health(result),
        "comparison": comparison(result),
        "profiles": [_profile_dict(p) for p in result.profiles],
        "estimates": _estimates(result),
        "bundle_summary": result.bundle_summary,
        "errors": result.errors[:20],
        "warnings": warnings,
    }
    return report


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    return atomic_write_json(path, report)


# --------------------------------------------------------------------------- terminal


def _summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    lat = report["latency_ms"]
    net = report["network_emulation"]
    rows = [
        ("requests (answered / lost / degraded)", f"{report['requests']} ({report['answered']} / {report['lost']} / {report['degraded']})"),
        ("accuracy", _pct(report["accuracy"])),
    ]
    if report.get("accuracy_during_outage") is not None:
        rows.append(("accuracy during outage", _pct(report["accuracy_during_outage"])))
    if report.get("accuracy_degraded") is not None:
        rows.append(("accuracy of degraded answers", _pct(report["accuracy_degraded"])))
    if report.get("teacher_agreement") is not None:
        rows.append(("agreement with teacher", _pct(report["teacher_agreement"])))
        rows.append(("teacher accuracy (same images)", _pct(report["teacher_accuracy"])))
    rows += [
        ("latency p50 / p95 / p99", f"{_fmt(lat['p50'], '.2f')} / {_fmt(lat['p95'], '.2f')} / {_fmt(lat['p99'], '.2f')} ms"),
        ("throughput", f"{_fmt(report['throughput']['requests_per_s'], '.1f')} req/s"),
        ("bytes per inference (all devices)", _fmt(report["bytes_per_inference"], ".0f", " B")),
        ("network emulation", f"{net['mode']} ({net['reason']})" if net.get("reason") else net["mode"]),
        ("stream wall time", _fmt(report["wall_s"], ".2f", " s")),
    ]
    return rows


def format_table(report: dict[str, Any]) -> str:
    """A plain-text summary: the headline numbers, one row per device, the teacher comparison."""
    rows = _summary_rows(report)
    width = max(len(k) for k, _ in rows)
    parts = ["\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)]
    dev_rows = [
        (
            f"{d['index']} {d['student']}",
            d["profile"],
            _fmt(d["peak_rss_mb"], ".1f"),
            _fmt(d["memory_limit_mb"], ".0f"),
            "OVER" if d["over_memory"] else "ok",
            _fmt(d["bytes_per_inference"], ".0f"),
            _pct(d["contributed"]),
            str(d.get("skipped", 0)),
            str(d["starts"]),
        )
        for d in report["devices"]
    ]
    parts.append(_rows_table(["device", "profile", "peak RSS MB", "limit MB", "memory", "bytes/inf", "contributed", "skipped", "starts"], dev_rows))
    est = report.get("estimates")
    if est and est.get("comparison"):
        comp_rows = [(r["metric"], r["nonn"], r["teacher"], r["ratio"], r["model_parallel"]) for r in _comparison_rows(est)]
        parts.append(
            "estimated on the real devices (planner model):\n"
            + _rows_table(["", "NoNN fleet", "teacher, one device", "teacher / NoNN", "layer-wise split"], comp_rows)
        )
    parts += fault_tables(report)
    for w in report.get("warnings", []):
        parts.append(f"warning: {w}")
    return "\n\n".join(parts)


def _comparison_rows(est: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for item in est.get("comparison", []):
        unit = item.get("unit", "")
        nonn, teacher = item.get("nonn"), item.get("teacher")
        ratio = None if not nonn or teacher is None else teacher / nonn
        rows.append(
            {
                "metric": f"{item['metric']} ({unit})" if unit else item["metric"],
                "nonn": _fmt(nonn, ".3g"),
                "teacher": _fmt(teacher, ".3g"),
                "model_parallel": _fmt(item.get("model_parallel"), ".3g"),
                "ratio": "-" if ratio is None else f"{ratio:.1f}x",
            }
        )
    return rows


# --------------------------------------------------------------------------- HTML


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(report: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plots: dict[str, str] = {}
    hist = report["latency_ms"]["histogram"]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    if hist["counts"]:
        edges = np.asarray(hist["edges_ms"])
        ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", color="#4477aa", edgecolor="white")
        for name, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            v = report["latency_ms"][name]
            if v is not None:
                ax.axvline(v, color="#cc3311", linestyle=style, label=f"{name} {v:.2f} ms")
        ax.legend()
    ax.set_xlabel("latency per request (ms)")
    ax.set_ylabel("requests")
    ax.set_title("Latency distribution")
    plots["latency"] = _png(fig)

    devs = report["devices"]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    xs = np.arange(len(devs))
    peaks = [d["peak_rss_mb"] or 0 for d in devs]
    colors = ["#cc3311" if d["over_memory"] else "#228833" for d in devs]
    ax.bar(xs, peaks, color=colors, width=0.6, label="peak RSS")
    for x, d in zip(xs, devs):
        if d["memory_limit_mb"] is not None:
            ax.hlines(d["memory_limit_mb"], x - 0.4, x + 0.4, colors="black", linestyles="--")
    limits = [d["memory_limit_mb"] for d in devs if d["memory_limit_mb"] is not None]
    if limits:
        ax.plot([], [], "k--", label="device memory left by the OS")
        # Keep small RSS bars readable under a large device limit.
        if max(limits) > 20 * max(peaks + [1]):
            ax.set_yscale("log")
    ax.set_xticks(xs, [f"{d['index']}: {d['profile']}" for d in devs], rotation=20)
    ax.set_ylabel("MB")
    ax.set_title("Memory per device against its limit")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2, frameon=False)
    plots["memory"] = _png(fig)

    tl = report["timeline"]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    mids = [(b["t0_s"] + b["t1_s"]) / 2 for b in tl["bins"]]
    acc = [np.nan if b["accuracy"] is None else b["accuracy"] * 100 for b in tl["bins"]]
    deg = [100.0 * b["degraded"] / b["answered"] if b["answered"] else np.nan for b in tl["bins"]]
    ax.plot(mids, acc, "o-", color="#4477aa", label="accuracy")
    ax.plot(mids, deg, "s--", color="#ee7733", label="degraded answers", markersize=3)
    for i, w in enumerate(tl["outages"]):
        ax.axvspan(w["start_s"], w["end_s"], color="#cc3311", alpha=0.15, label="device down" if i == 0 else None)
    for e in tl["events"]:
        ax.axvline(e["t"], color="#999999", linewidth=0.8)
        ax.annotate(f"{e['event']} d{e['device']}", (e["t"], 103), rotation=90, fontsize=7, color="#555555",
                    ha="right", va="top", annotation_clip=False)
    ax.set_ylim(-2, 104)
    ax.set_xlabel("time since stream start (s)")
    ax.set_ylabel("%")
    ax.set_title("Accuracy over time" + (" during a fault" if tl["outages"] else ""))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    plots["timeline"] = _png(fig)
    return plots


def _table_html(headers: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1000px;color:#222;padding:0 1em}
h1{font-size:1.6em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} .scroll{overflow-x:auto} th,td{border:1px solid #ccc;padding:.3em .7em;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
.over{color:#b00;font-weight:bold} .warn{background:#fff3cd;border:1px solid #e0c97f;padding:.5em;margin:.4em 0}
.plots{display:flex;flex-wrap:wrap;gap:1em} figure{margin:0} img{max-width:100%;border:1px solid #eee}
code{background:#f5f5f5;padding:0 .2em}
"""


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (no external files, plots inlined)."""
    plots = _plots(report)
    esc = html.escape
    net = report["network_emulation"]
    summary = _table_html(["measure", "value"], _summary_rows(report), "summary")
    dev_rows = [
        (
            f"{d['index']} {d['student']}",
            d["profile"],
            d["endpoint"],
            _fmt(d["peak_rss_mb"], ".1f"),
            _fmt(d["memory_limit_mb"], ".0f"),
            "OVER LIMIT" if d["over_memory"] else "ok",
            _fmt(d["bytes_sent_per_inference"], ".0f"),
            _fmt(d["bytes_received_per_inference"], ".0f"),
            _fmt(d["wire_bytes_per_inference"], ".0f"),
            _pct(d["contributed"]),
            d["starts"],
        )
        for d in report["devices"]
    ]
    devices = _table_html(
        ["device", "profile", "endpoint", "peak RSS (MB)", "limit (MB)", "memory", "bytes sent/inf", "bytes recv/inf",
         "wire bytes/inf", "contributed", "starts"],
        dev_rows,
        "devices",
    )
    est = report.get("estimates")
    comparison = (
        _table_html(["", "NoNN fleet", "teacher, one device", "teacher / NoNN", "layer-wise split over the same devices"],
                    [(r["metric"], r["nonn"], r["teacher"], r["ratio"], r["model_parallel"]) for r in _comparison_rows(est)],
                    "comparison")
        + "<p>Estimated by the device planner from the bundle's FLOPs and parameters and the device profiles "
        "(not measured on this machine).</p>"
        if est and est.get("comparison")
        else "<p>No cost estimate (the device planner gave none for this bundle).</p>"
    )
    events = report["timeline"]["events"]
    events_html = (
        _table_html(["t (s)", "device", "event"], [(f"{e['t']:.2f}", e["device"], e["event"]) for e in events], "events")
        if events
        else "<p>No faults injected.</p>"
    )
    warnings = "".join(f'<div class="warn">{esc(w)}</div>' for w in report.get("warnings", []))
    links = net.get("links") or []
    link_rows = [
        (i, _fmt(l.get("bandwidth_mbps"), ".1f"), _fmt(l.get("latency_ms"), ".1f"), _fmt(l.get("loss"), ".4f"))
        for i, l in enumerate(links)
    ]
    model_text = f"<p>Delay model: {esc(net['model'])}.</p>" if net.get("model") else ""
    figures = "".join(
        f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{plots[key]}"><figcaption>{esc(alt)}</figcaption></figure>'
        for key, alt in (("latency", "latency distribution"), ("memory", "memory per device against its limit"),
                         ("timeline", "accuracy over time"))
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>nonn simulate report</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>NoNN fleet simulation</h1>
<p>Bundle <code>{esc(str(report.get('bundle')))}</code>{', data set <code>' + esc(str(report['dataset'])) + '</code>' if report.get('dataset') else ''};
{len(report['devices'])} devices, {report['requests']} requests of {report['batch_size']} image(s), concurrency {report['config']['concurrency']}.</p>
{warnings}
<h2>Summary</h2>
{summary}
<h2>Devices</h2>
<div class="scroll">{devices}</div>
<h2>NoNN fleet against the teacher on one device</h2>
{comparison}
<h2>Network emulation: {esc(net['mode'])}</h2>
<p>{esc(net.get('reason') or '')}</p>
{model_text}
{_table_html(['device', 'bandwidth (Mbit/s)', 'round trip (ms)', 'loss'], link_rows, 'links')}
<h2>Plots</h2>
<div class="plots">{figures}</div>
<h2>Faults</h2>
{events_html}
</body></html>
"""


def write_html(report: dict[str, Any], path: str | Path) -> Path:
    """Write the self-contained HTML report atomically."""
    return atomic_write_text(path, render_html(report))
