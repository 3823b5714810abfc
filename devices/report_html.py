"""The simulation report as one self-contained HTML page: tables, then full-width plots with
captions that read them (`nonn.devices.report_plots`). Nothing is loaded from elsewhere."""

from __future__ import annotations

import html
from typing import Any, Sequence

from nonn.devices.fault_report import fault_tables
from nonn.devices.report import baseline_notes, comparison_rows, summary_rows
from nonn.devices.report_format import fmt, pct
from nonn.runtime.traffic import DEVICE_FIELDS, column

__all__ = ["render_html"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1240px;color:#222;padding:0 1.5em}
h1{font-size:1.6em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} .scroll{overflow-x:auto} th,td{border:1px solid #ccc;padding:.3em .7em;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
.warn{background:#fff3cd;border:1px solid #e0c97f;padding:.5em;margin:.4em 0}
figure{margin:1.2em 0;width:100%} figure img{display:block;width:100%;height:auto;border:1px solid #eee}
figcaption{margin-top:.4em;color:#444;font-size:.92em;line-height:1.4} figcaption b{color:#222}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.85em}
code{background:#f5f5f5;padding:0 .2em}
"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _devices(report: dict[str, Any]) -> str:
    rows = [
        (
            f"{d['index']} {d['student']}",
            d["profile"],
            d["endpoint"],
            fmt(d["peak_rss_mb"], ".1f"),
            fmt(d["memory_limit_mb"], ".0f"),
            "OVER LIMIT" if d["over_memory"] else "ok",
            *(fmt(d["bytes_per_inference"][f], ".0f") for f in DEVICE_FIELDS),
            pct(d["contributed"]),
            d["starts"],
        )
        for d in report["devices"]
    ]
    headers = ["device", "profile", "endpoint", "peak RSS (MB)", "limit (MB)", "memory", *(column(f) for f in DEVICE_FIELDS),
               "contributed", "starts"]  # fmt: skip
    return f'<div class="scroll">{_table(headers, rows, "devices")}</div>'


def _comparison(report: dict[str, Any]) -> str:
    est = report.get("estimates")
    if not (est and est.get("comparison")):
        return "<p>No cost estimate (the device planner gave none for this bundle).</p>"
    table = _table(
        ["", "NoNN fleet", "teacher, one device", "teacher / NoNN", "layer-wise split over the same devices"],
        [(r["metric"], r["nonn"], r["teacher"], r["ratio"], r["model_parallel"]) for r in comparison_rows(est)],
        "comparison",
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in baseline_notes(est))
    return (
        table
        + "<p>Estimated by the device planner from the bundle's FLOPs and parameters and the device profiles "
        "(not measured on this machine).</p>"
        + (f"<ul>{notes}</ul>" if notes else "")
    )


def _network(report: dict[str, Any]) -> str:
    net = report["network_emulation"]
    esc = html.escape
    rows = [
        (i, fmt(link.get("bandwidth_mbps"), ".1f"), fmt(link.get("latency_ms"), ".1f"), fmt(link.get("loss"), ".4f"))
        for i, link in enumerate(net.get("links") or [])
    ]
    model = f"<p>Delay model: {esc(net['model'])}.</p>" if net.get("model") else ""
    return (
        f"<h2>Network emulation: {esc(net['mode'])}</h2><p>{esc(net.get('reason') or '')}</p>{model}"
        + _table(["device", "bandwidth (Mbit/s)", "round trip (ms)", "loss"], rows, "links")
    )


def _faults(report: dict[str, Any]) -> str:
    events = report["timeline"]["events"]
    if not events:
        return "<p>No faults injected.</p>"
    table = _table(["t (s)", "device", "event"], [(f"{e['t']:.2f}", e["device"], e["event"]) for e in events], "events")
    more = fault_tables(report)
    return table + "".join(f"<pre>{html.escape(t)}</pre>" for t in more)


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (no external files, plots inlined)."""
    from nonn.devices.report_plots import plots

    esc = html.escape
    figures = "".join(
        f'<figure id="plot-{p.key}"><img alt="{esc(p.title)}" src="data:image/png;base64,{p.png}">'
        f"<figcaption><b>{esc(p.title)}.</b> {esc(p.caption)}</figcaption></figure>"
        for p in plots(report)
    )
    warnings = "".join(f'<div class="warn">{esc(w)}</div>' for w in report.get("warnings", []))
    dataset = f", data set <code>{esc(str(report['dataset']))}</code>" if report.get("dataset") else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>nonn simulate report</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>NoNN fleet simulation</h1>
<p>Bundle <code>{esc(str(report.get('bundle')))}</code>{dataset};
{len(report['devices'])} devices, {report['requests']} requests of {report['batch_size']} image(s), concurrency {report['config']['concurrency']}.</p>
{warnings}
<h2>Summary</h2>
{_table(["measure", "value"], summary_rows(report), "summary")}
<h2>Plots</h2>
{figures}
<h2>Devices</h2>
{_devices(report)}
<h2>NoNN fleet against the teacher on one device</h2>
{_comparison(report)}
{_network(report)}
<h2>Faults</h2>
{_faults(report)}
</body></html>
"""
