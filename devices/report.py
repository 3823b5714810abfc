"""Reports of a simulated fleet run: a JSON summary, a terminal table, a self-contained HTML page.

`build_report(result)` reduces a `SimulationResult` to plain JSON data: accuracy (and agreement
with the teacher), lost and degraded requests, latency percentiles and histogram, throughput,
bytes per inference and peak RSS per device against its memory limit, the network emulation
that ran, the fault timeline (accuracy over time), and the estimated cost on the real devices
side by side with the teacher on one device of the same profile (from `nonn.devices.planner`).
`format_table(report)` prints it; `write_html(report, path)` writes the HTML page of
`nonn.devices.report_html` (plots from `nonn.devices.report_plots`, matplotlib imported only there).
Bytes per inference are those of `nonn.runtime.traffic`, as `plan` and `infer` report them.
"""

from __future__ import annotations

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
from nonn.runtime.traffic import DEVICE_FIELDS, LABELS, BytesPerInference, column

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


def _faults_cut_short(result: "SimulationResult") -> list[str]:
    """A warning per fault (kill, restart, slowdown) that the stream ended before it played out."""
    played = {(e["device"], e.get("fault"), e["event"]) for e in result.events}
    served = {e["device"] for e in result.events if e["event"] == "serving"}
    hint = "send more --requests, or --until-faults-end to stream until every fault has played out"
    out = []
    for f in result.config.faults:
        if (f.device, str(f), "killed") not in played:
            out.append(f"fault {f} did not happen: the stream of {result.num_requests} requests ended at {result.wall_s:.2f} s; {hint}")
        elif f.restart_after_s is not None and f.device not in served:
            out.append(f"fault {f}: device {f.device} was not serving again when the stream ended at {result.wall_s:.2f} s; {hint}")
    for slow in result.config.slowdowns:
        if (slow.device, str(slow), "slowed") not in played:
            out.append(f"slowdown {slow} did not happen: the stream ended at {result.wall_s:.2f} s; {hint}")
    return out


def _latency(latency_s: np.ndarray, degraded: np.ndarray) -> dict[str, Any]:
    """Percentiles and histogram of all answers, the histogram's degraded share on the same bins,
    and p50 / p99 of full and of degraded answers apart."""
    out = _percentiles(latency_s)
    hist = out["histogram"]
    ms = latency_s * 1000.0
    finite = np.isfinite(ms)
    if hist["edges_ms"]:
        counts, _ = np.histogram(ms[finite & degraded], bins=np.asarray(hist["edges_ms"]))
        hist["degraded_counts"] = counts.astype(int).tolist()
    else:
        hist["degraded_counts"] = []
    out["by_answer"] = {}
    for name, mask in (("full", finite & ~degraded), ("degraded", finite & degraded)):
        p = _percentiles(latency_s[mask])
        out["by_answer"][name] = {"answers": int(mask.sum()), "p50": p["p50"], "p99": p["p99"]}
    return out


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
            "bytes_per_inference": BytesPerInference.measured(
                sent, received, n_answered_img, None if not link else link["bytes_up"] + link["bytes_down"]
            ).to_dict(),
            "contributed": _round(_fraction(result.device_answered(k)[answered].sum(), int(answered.sum()))),
            "skipped": int(result.skipped[:, k].sum()) if result.skipped is not None and R else 0,
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
    warnings += _faults_cut_short(result)
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
        "latency_ms": _latency(result.latency_s, degraded),
        "throughput": {
            "requests_per_s": _round(_fraction(int(answered.sum()), result.wall_s), 2),
            "images_per_s": _round(_fraction(n_answered_img, result.wall_s), 2),
        },
        "wall_s": _round(result.wall_s, 3),
        "startup_s": _round(result.startup_s, 3),
        "devices": devices,
        "bytes_per_inference": BytesPerInference.total(BytesPerInference.from_dict(d["bytes_per_inference"]) for d in devices).to_dict(),
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


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
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
        *((f"{LABELS[f]} per inference, all devices", _fmt(report["bytes_per_inference"][f], ".0f", " B")) for f in DEVICE_FIELDS),
        ("network emulation", f"{net['mode']} ({net['reason']})" if net.get("reason") else net["mode"]),
        ("stream wall time", _fmt(report["wall_s"], ".2f", " s")),
    ]
    return rows


def format_table(report: dict[str, Any]) -> str:
    """A plain-text summary: the headline numbers, one row per device, the teacher comparison."""
    rows = summary_rows(report)
    width = max(len(k) for k, _ in rows)
    parts = ["\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)]
    dev_rows = [
        (
            f"{d['index']} {d['student']}",
            d["profile"],
            _fmt(d["peak_rss_mb"], ".1f"),
            _fmt(d["memory_limit_mb"], ".0f"),
            "OVER" if d["over_memory"] else "ok",
            *(_fmt(d["bytes_per_inference"][f], ".0f") for f in DEVICE_FIELDS),
            _pct(d["contributed"]),
            str(d.get("skipped", 0)),
            str(d["starts"]),
        )
        for d in report["devices"]
    ]
    parts.append(_rows_table(["device", "profile", "peak RSS MB", "limit MB", "memory", *(column(f) for f in DEVICE_FIELDS),
                              "contributed", "skipped", "starts"], dev_rows))
    est = report.get("estimates")
    if est and est.get("comparison"):
        comp_rows = [(r["metric"], r["nonn"], r["teacher"], r["ratio"], r["model_parallel"]) for r in comparison_rows(est)]
        parts.append(
            "estimated on the real devices (planner model):\n"
            + _rows_table(["", "NoNN fleet", "teacher, one device", "teacher / NoNN", "layer-wise split"], comp_rows)
            + "".join(f"\n{line}" for line in baseline_notes(est))
        )
    parts += fault_tables(report)
    for w in report.get("warnings", []):
        parts.append(f"warning: {w}")
    return "\n\n".join(parts)


def baseline_notes(est: dict[str, Any]) -> list[str]:
    """What each baseline column is, its bytes included (the planner's notes)."""
    names = {"teacher": "teacher, one device", "model_parallel": "layer-wise split"}
    return [f"{label}: {est[key]['note']}" for key, label in names.items() if est.get(key) and est[key].get("note")]


def comparison_rows(est: dict[str, Any]) -> list[dict[str, str]]:
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


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (`nonn.devices.report_html`)."""
    from nonn.devices.report_html import render_html as render

    return render(report)


def write_html(report: dict[str, Any], path: str | Path) -> Path:
    """Write the self-contained HTML report atomically."""
    return atomic_write_text(path, render_html(report))
