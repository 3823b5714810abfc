"""Small number and table formatting shared by the simulation report's parts."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["fraction", "round_", "percentiles", "fmt", "pct", "rows_table"]


def fraction(num: float, den: float) -> float | None:
    return None if den == 0 else float(num) / float(den)


def round_(x: float | None, digits: int = 6) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), digits)


def percentiles(latency_s: np.ndarray) -> dict[str, Any]:
    ms = latency_s[np.isfinite(latency_s)] * 1000.0
    if ms.size == 0:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None, "histogram": {"edges_ms": [], "counts": []}}
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    lo, hi = float(ms.min()), float(ms.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-3, 41)
    counts, _ = np.histogram(ms, bins=edges)
    return {
        "p50": round_(p50, 3),
        "p95": round_(p95, 3),
        "p99": round_(p99, 3),
        "mean": round_(float(ms.mean()), 3),
        "max": round_(hi, 3),
        "histogram": {"edges_ms": [round(float(e), 3) for e in edges], "counts": counts.astype(int).tolist()},
    }


def fmt(value: Any, spec: str = "", unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and spec:
        return f"{value:{spec}}{unit}"
    return f"{value}{unit}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def rows_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)
