"""The parts of a simulation report about faults: what the aggregator saw of each device's health
(taken out, probed, rejoined), hedged requests, and the same stream with every device up side
by side with the faulty one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nonn.devices.report_format import fmt, fraction, percentiles, round_, rows_table

if TYPE_CHECKING:
    from nonn.devices.simulate import SimulationResult

__all__ = ["device_health", "headline", "comparison", "fault_tables"]


def device_health(result: "SimulationResult") -> dict[str, Any]:
    """The aggregator's view of each fault: when it took the device out (down), when a health check
    found it serving (half-open), when it answered again (healthy), and requests it skipped."""
    kills = [e for e in result.events if e["event"] == "killed"]
    rows = []
    for kill in kills:
        d = kill["device"]
        after = [e for e in result.health_events if e.get("index") == d and e["t"] >= kill["t"] - 0.5]
        serving = next((e["t"] for e in result.events if e["device"] == d and e["event"] == "serving" and e["t"] >= kill["t"]), None)

        def first(state: str, since: float | None = None) -> float | None:
            return next((e["t"] for e in after if e["state"] == state and (since is None or e["t"] >= since)), None)

        down = first("down")
        half_open = first("half-open", down)
        healthy = first("healthy", half_open)
        rows.append({
            "device": d, "killed_s": kill["t"], "down_s": down, "serving_s": serving, "half_open_s": half_open,
            "rejoined_s": healthy,
            "rejoined_after_serving_s": None if healthy is None or serving is None else round_(healthy - serving, 4),
        })  # fmt: skip
    skipped = result.skipped.sum(axis=0).astype(int).tolist() if result.skipped is not None and result.num_requests else []
    return {"events": list(result.health_events), "faults": rows, "skipped_per_device": skipped, "hedged_requests": result.hedged}


def headline(result: "SimulationResult") -> dict[str, Any]:
    """Latency and throughput of one run, for side-by-side comparisons."""
    lat = percentiles(result.latency_s)
    answered = int(result.answered.sum())
    degraded = int((result.answered & ~result.contributed.all(axis=1)).sum()) if result.num_requests else 0
    return {
        "requests": result.num_requests,
        "degraded": degraded,
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "requests_per_s": round_(fraction(answered, result.wall_s), 2),
    }


def comparison(result: "SimulationResult") -> dict[str, Any] | None:
    """With every device up vs with the faults, from the same command (compare_all_up)."""
    if result.baseline is None:
        return None
    up, faulty = headline(result.baseline), headline(result)
    ratio = {
        "p50": round_(fraction(faulty["p50_ms"] or 0.0, up["p50_ms"] or 0.0), 3),
        "p99": round_(fraction(faulty["p99_ms"] or 0.0, up["p99_ms"] or 0.0), 3),
        "throughput": round_(fraction(faulty["requests_per_s"] or 0.0, up["requests_per_s"] or 0.0), 3),
    }
    return {"all_up": up, "with_faults": faulty, "ratio": ratio}


def fault_tables(report: dict[str, Any]) -> list[str]:
    """The terminal tables for a report's comparison and device health sections."""
    parts: list[str] = []
    comparison = report.get("comparison")
    if comparison:
        up, faulty, ratio = comparison["all_up"], comparison["with_faults"], comparison["ratio"]
        parts.append(
            "all devices up vs with the faults (same command):\n"
            + rows_table(
                ["", "all up", "with faults", "ratio"],
                [("p50 latency (ms)", fmt(up["p50_ms"], ".2f"), fmt(faulty["p50_ms"], ".2f"), fmt(ratio["p50"], ".2f")),
                 ("p99 latency (ms)", fmt(up["p99_ms"], ".2f"), fmt(faulty["p99_ms"], ".2f"), fmt(ratio["p99"], ".2f")),
                 ("throughput (req/s)", fmt(up["requests_per_s"], ".1f"), fmt(faulty["requests_per_s"], ".1f"), fmt(ratio["throughput"], ".2f")),
                 ("degraded requests", str(up["degraded"]), str(faulty["degraded"]), "")],
            )
        )  # fmt: skip
    health = report.get("device_health") or {}
    if health.get("faults"):
        parts.append(
            "device health (seconds into the stream):\n"
            + rows_table(
                ["device", "killed", "skipped from", "serving again", "health check ok", "answering again", "rejoin after serving"],
                [(str(f["device"]), fmt(f["killed_s"], ".2f"), fmt(f["down_s"], ".2f"), fmt(f["serving_s"], ".2f"),
                  fmt(f["half_open_s"], ".2f"), fmt(f["rejoined_s"], ".2f"), fmt(f["rejoined_after_serving_s"], ".2f"))
                 for f in health["faults"]],
            )
        )  # fmt: skip
    if health.get("hedged_requests"):
        parts.append(f"hedged requests (a second replica asked because the first was slow): {health['hedged_requests']}")
    return parts
