"""The simulation report's plots (matplotlib), each as a base64 PNG with a caption that reads it.

Every plot is drawn for the full width of the page (FIG_WIDTH_IN at DPI): the latency
histogram split into full and degraded answers, memory per device as bars on a linear MB axis
against each device's limit, and accuracy over time with the fault events labelled in a strip
above the data.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from nonn.devices.report_format import fmt

__all__ = ["Plot", "plots", "FIG_WIDTH_IN", "DPI"]

FIG_WIDTH_IN = 12.0
DPI = 100
FULL_COLOUR = "#4477aa"
DEGRADED_COLOUR = "#ee7733"
OVER_COLOUR = "#cc3311"
OK_COLOUR = "#228833"
LIMIT_COLOUR = "#dddddd"


@dataclass
class Plot:
    """One figure of the report: its key, title, PNG (base64) and caption."""

    key: str
    title: str
    png: str
    caption: str


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _latency(report: dict[str, Any], plt: Any) -> Plot:
    lat = report["latency_ms"]
    hist = lat["histogram"]
    fig, ax = plt.subplots(figsize=(FIG_WIDTH_IN, 3.6), constrained_layout=True)
    if hist["counts"]:
        edges = np.asarray(hist["edges_ms"])
        counts = np.asarray(hist["counts"])
        degraded = np.asarray(hist.get("degraded_counts") or np.zeros_like(counts))
        width = np.diff(edges)
        ax.bar(edges[:-1], counts - degraded, width=width, align="edge", color=FULL_COLOUR, edgecolor="white",
               label="full answers (every student)")  # fmt: skip
        ax.bar(edges[:-1], degraded, bottom=counts - degraded, width=width, align="edge", color=DEGRADED_COLOUR,
               edgecolor="white", label="degraded answers (a student missing)")  # fmt: skip
        for name, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            v = lat[name]
            if v is not None:
                ax.axvline(v, color="black", linestyle=style, linewidth=1, label=f"{name} {v:.2f} ms")
        ax.legend(loc="upper right", fontsize=9)
    ax.set_xlabel("latency per request (ms)")
    ax.set_ylabel("requests")
    by = lat.get("by_answer") or {}
    full, deg = by.get("full") or {}, by.get("degraded") or {}
    caption = (
        f"{report['answered']} answered requests: p50 {fmt(lat['p50'], '.2f')} ms, p99 {fmt(lat['p99'], '.2f')} ms, "
        f"slowest {fmt(lat['max'], '.2f')} ms."
    )
    if deg.get("answers"):
        caption += (
            f" Orange: the {deg['answers']} degraded answers (a student's device missed the request and its features "
            f"were zeros), p50 {fmt(deg['p50'], '.2f')} ms against {fmt(full.get('p50'), '.2f')} ms for the "
            f"{full.get('answers', 0)} full answers (a device known to be down is skipped at once; a request in "
            "flight when a device died waits for its retries or the deadline)."
        )
    else:
        caption += " Every answer had all students' features."
    return Plot("latency", "Latency per request", _png(fig), caption)


def _memory(report: dict[str, Any], plt: Any) -> Plot:
    devs = report["devices"]
    fig, ax = plt.subplots(figsize=(FIG_WIDTH_IN, 0.9 + 0.55 * len(devs)), constrained_layout=True)
    ys = np.arange(len(devs))[::-1]
    peaks = [d["peak_rss_mb"] or 0.0 for d in devs]
    limits = [d["memory_limit_mb"] for d in devs]
    ax.barh(ys, [lim or 0 for lim in limits], height=0.7, color=LIMIT_COLOUR, edgecolor="#999999",
            label="memory the device leaves for nonn (its limit)")  # fmt: skip
    ax.barh(ys, peaks, height=0.45, color=[OVER_COLOUR if d["over_memory"] else OK_COLOUR for d in devs],
            label="peak resident memory of the device's process")  # fmt: skip
    top = max([*peaks, *(lim or 0 for lim in limits), 1.0])
    for y, d, peak, lim in zip(ys, devs, peaks, limits):
        share = f" ({100 * peak / lim:.0f}% of {lim:.0f} MB)" if lim else ""
        ax.text(min(peak, top) + top * 0.01, y, f"{peak:.1f} MB{share}", va="center", fontsize=9)
    ax.set_yticks(ys, [f"{d['index']}: {d['student']} on {d['profile']}" for d in devs])
    ax.set_xlim(0, top * 1.25)
    ax.set_xlabel("MB (linear)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(devs) > 2 else -0.6), ncol=2, frameon=False, fontsize=9)
    worst = max(range(len(devs)), key=lambda i: peaks[i] / (limits[i] or float("inf")) if limits[i] else peaks[i], default=None)
    caption = "Peak resident memory of each device's server process, sampled during the run, against the memory its profile leaves after the OS."
    if worst is not None:
        d = devs[worst]
        lim = limits[worst]
        caption += f" Closest to its limit: device {d['index']} ({d['profile']}), {peaks[worst]:.1f} MB" + (
            f" of {lim:.0f} MB ({100 * peaks[worst] / lim:.0f}%)." if lim else "."
        )
    over = [d for d in devs if d["over_memory"]]
    caption += f" {len(over)} device(s) over the limit (red)." if over else " Every device stays under its limit."
    return Plot("memory", "Memory per device against its limit", _png(fig), caption)


def _event_label(e: dict[str, Any]) -> str:
    return f"{e['t']:.2f} s: device {e['device']} {e['event']}"


def _event_rows(events: list[dict[str, Any]], span: float, width_in: float) -> list[int]:
    """A row per event label (in time order) so that no label runs into the next one on its row."""
    per_inch = span / (width_in * 0.85)  # seconds per inch of the axes
    ends: list[float] = []  # where the last label of each row ends, in seconds
    rows = []
    for e in events:
        start = e["t"]
        end = start + (0.3 + 0.075 * len(_event_label(e))) * per_inch  # marker + about 0.075 inch per character at 9 pt
        row = next((r for r, last in enumerate(ends) if start > last), None)
        if row is None:
            row = len(ends)
            ends.append(end)
        ends[row] = end
        rows.append(row)
    return rows


def _timeline(report: dict[str, Any], plt: Any) -> Plot:
    tl = report["timeline"]
    events = sorted(tl["events"], key=lambda e: e["t"])
    end = max([b["t1_s"] for b in tl["bins"]] + [e["t"] for e in events] + [1e-3])
    rows = _event_rows(events, end, FIG_WIDTH_IN)
    n_rows = max(rows, default=-1) + 1
    fig, (ax_ev, ax) = plt.subplots(
        2, 1, figsize=(FIG_WIDTH_IN, 4.0 + 0.25 * n_rows), sharex=True, constrained_layout=True,
        gridspec_kw={"height_ratios": [0.4 + 0.3 * n_rows, 4]},
    )  # fmt: skip
    mids = [(b["t0_s"] + b["t1_s"]) / 2 for b in tl["bins"]]
    acc = [np.nan if b["accuracy"] is None else b["accuracy"] * 100 for b in tl["bins"]]
    deg = [100.0 * b["degraded"] / b["answered"] if b["answered"] else np.nan for b in tl["bins"]]
    ax.plot(mids, acc, "o-", color=FULL_COLOUR, label="accuracy")
    ax.plot(mids, deg, "s--", color=DEGRADED_COLOUR, label="degraded answers", markersize=3)
    for i, w in enumerate(tl["outages"]):
        ax.axvspan(w["start_s"], w["end_s"], color=OVER_COLOUR, alpha=0.12, label="a device down" if i == 0 else None)
    for e, row in zip(events, rows):
        ax.axvline(e["t"], color="#777777", linewidth=0.8, linestyle=":")
        ax_ev.plot([e["t"]], [n_rows - row - 0.5], marker="v", color="#555555")
        ax_ev.annotate(_event_label(e), (e["t"], n_rows - row - 0.5),
                       xytext=(5, 0), textcoords="offset points", va="center", fontsize=9)  # fmt: skip
    ax_ev.set_ylim(0, max(n_rows, 1))
    ax_ev.set_yticks([])
    ax_ev.set_title("fault events", fontsize=9, loc="left")
    for side in ("left", "right", "top"):
        ax_ev.spines[side].set_visible(False)
    ax.set_xlim(0, end * 1.02)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("time since stream start (s)")
    ax.set_ylabel("% of answered images / requests")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)
    caption = f"Accuracy and the share of degraded answers in bins of {tl['bin_s']:.2f} s of the stream."
    for w in tl["outages"]:
        back = "" if w.get("answering_again_s") is None else f", answering again from {w['answering_again_s']:.2f} s"
        caption += f" Device {w['device']} down {w['start_s']:.2f}-{w['end_s']:.2f} s{back}."
    if report.get("accuracy_during_outage") is not None:
        caption += (
            f" Accuracy during the outage {100 * report['accuracy_during_outage']:.1f}%, with every device answering "
            f"{fmt(None if report.get('accuracy_all_devices') is None else 100 * report['accuracy_all_devices'], '.1f')}%."
        )
    if not events:
        caption += " No faults were injected."
    return Plot("timeline", "Accuracy over time" + (" during a fault" if tl["outages"] else ""), _png(fig), caption)


def plots(report: dict[str, Any]) -> list[Plot]:
    """The report's plots, in page order."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return [_latency(report, plt), _memory(report, plt), _timeline(report, plt)]
