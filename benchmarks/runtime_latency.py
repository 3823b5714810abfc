"""Aggregator over K local device processes vs the slowest student in-process: latency, throughput, RSS, bytes.

    python benchmarks/runtime_latency.py                    # synthetic bundle: 4 untrained WRN-16-1 students, 32x32x3
    python benchmarks/runtime_latency.py --bundle BUNDLE    # an exported bundle

Measures, on the same inputs, in one run:
- batch-1 latency (p50/p99) of every student run in-process with ONNX Runtime, and of the
  aggregator (fan-out to K `nonn serve` processes over loopback gRPC + head), once with one
  ModelStreamInfer stream per device (the default) and once with plain ModelInfer calls;
  overhead = the aggregator's p50 minus the slowest student's p50;
- throughput: the slowest student back to back in-process vs the aggregator with
  --concurrency requests in flight;
- each device server's resident memory (peak, psutil / VmHWM) and bytes on the wire per
  inference per device (serialized request and reply sizes).
Goals: overhead < 1.5 ms, aggregator throughput >= 80% of the slowest student's, RSS < 80 MB.
Throughput only compares like with like when the machine has a core per device thread plus one
for the aggregator; the script prints the core count next to the ratio, and the throughput the
students' compute alone would allow on these cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nonn.runtime.aggregator import TRANSPORTS, Aggregator
from nonn.runtime.bundle import Bundle
from nonn.runtime.onnx_model import OnnxModel

GOAL_OVERHEAD_MS = 1.5
GOAL_THROUGHPUT_RATIO = 0.8
GOAL_RSS_MB = 80.0


def synthetic_bundle(out: Path, students: int, arch: str, input_shape: tuple[int, int, int], features: int) -> Path:
    """Export an untrained ensemble of `students` x `arch` (the only place torch is used)."""
    import torch

    from nonn.students.ensemble import build_ensemble
    from nonn.students.export import export_bundle

    torch.manual_seed(0)
    groups = [list(range(k * features, (k + 1) * features)) for k in range(students)]
    ensemble = build_ensemble([(arch, {})] * students, groups, num_classes=10, in_channels=input_shape[0], out_hw=(8, 8))
    meta = {
        "name": "synthetic",
        "input_shape": list(input_shape),
        "num_classes": 10,
        "class_names": [str(i) for i in range(10)],
        "mean": [0.5] * input_shape[0],
        "std": [0.25] * input_shape[0],
    }
    images = np.random.default_rng(0).random((8, *input_shape), dtype=np.float32)
    export_bundle(ensemble, out, dataset_meta=meta, parity_images=images, input_type="fp32")
    return out


def percentiles(samples_s: list[float]) -> tuple[float, float]:
    ms = np.asarray(samples_s) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def in_process(bundle: Bundle, inputs: np.ndarray, threads: int, warmup: int) -> list[dict]:
    """Batch-1 latency of each student alone in this process (same inputs, same thread count)."""
    rows = []
    for entry in bundle.students:
        model = OnnxModel(bundle.path_of(entry), threads=threads)
        feed = entry.input.name
        for x in inputs[:warmup]:
            model.run({feed: x[None]})
        times = []
        started = time.perf_counter()
        for x in inputs:
            t = time.perf_counter()
            model.run({feed: x[None]})
            times.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - started
        p50, p99 = percentiles(times)
        rows.append({"student": entry.name, "p50_ms": p50, "p99_ms": p99, "throughput": len(inputs) / elapsed})
    return rows


def cpu_seconds(processes: list) -> list[float]:
    return [sum(p.cpu_times()[:2]) for p in processes]


def memory_breakdown(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon (heap) and RssFile (mapped libraries) of a process, in MiB."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


async def latency_run(agg: Aggregator, inputs: np.ndarray, warmup: int, device_pids: list[int]) -> dict:
    """Batch-1 requests one at a time: latency percentiles and the CPU time of every process."""
    import psutil

    for x in inputs[:warmup]:
        await agg.infer(x[None])
    processes = [psutil.Process()] + [psutil.Process(pid) for pid in device_pids]
    cpu_before = cpu_seconds(processes)
    times, last = [], None
    for x in inputs:
        t = time.perf_counter()
        last = await agg.infer(x[None])
        times.append(time.perf_counter() - t)
    cpu_ms = [(after - before) / len(inputs) * 1e3 for before, after in zip(cpu_before, cpu_seconds(processes))]
    p50, p99 = percentiles(times)
    return {
        "transports": agg.transports,
        "p50_ms": p50,
        "p99_ms": p99,
        "cpu_ms_per_request": {"aggregator": cpu_ms[0], "devices": cpu_ms[1:]},
        "bytes_sent": last.bytes_sent,
        "bytes_received": last.bytes_received,
    }


async def aggregator_run(agg: Aggregator, inputs: np.ndarray, concurrency: int, warmup: int, device_pids: list[int]) -> dict:
    latency = await latency_run(agg, inputs, warmup, device_pids)
    # Throughput: `concurrency` batch-1 requests in flight until every input was answered,
    # first one device call per request, then with queued requests coalesced.
    degraded = 0

    async def throughput(coalesce: int) -> float:
        queue = list(range(len(inputs)))
        agg.coalesce = coalesce

        async def worker() -> None:
            nonlocal degraded
            while queue:
                i = queue.pop()
                result = await agg.infer(inputs[i][None])
                degraded += result.degraded

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        agg.coalesce = 1
        return len(inputs) / (time.perf_counter() - started)

    plain = await throughput(1)
    coalesced = await throughput(concurrency)
    return {**latency, "throughput": plain, "throughput_coalesced": coalesced, "degraded_answers": degraded}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None, help="bundle directory (default: export a synthetic one to a temp dir)")
    p.add_argument("--students", type=int, default=4, help="synthetic bundle: number of students (default: 4)")
    p.add_argument("--arch", default="wrn-16-1", help="synthetic bundle: student backbone (default: wrn-16-1)")
    p.add_argument("--input-shape", default="3,32,32", help="synthetic bundle: C,H,W (default: 3,32,32)")
    p.add_argument("--features", type=int, default=24, help="synthetic bundle: features per student (default: 24)")
    p.add_argument("--requests", type=int, default=200, help="batch-1 requests per measurement (default: 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed requests first (default: 20)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight for the throughput run (default: 8)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per device and in-process (default: 1)")
    p.add_argument("--transport", choices=TRANSPORTS, default="auto", help="how the aggregator calls the devices (default: auto, i.e. streams)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    from nonn.devices.fleet import LocalFleet

    with tempfile.TemporaryDirectory(prefix="nonn-bench-") as tmp:
        if args.bundle is None:
            shape = tuple(int(d) for d in args.input_shape.split(","))
            bundle_dir = synthetic_bundle(Path(tmp) / "bundle", args.students, args.arch, shape, args.features)  # type: ignore[arg-type]
        else:
            bundle_dir = Path(args.bundle)
        bundle = Bundle.load(bundle_dir)
        pixels = np.random.default_rng(1).integers(0, 256, size=(args.requests, *bundle.input_contract.input_shape), dtype=np.uint8)
        inputs = bundle.input_contract.prepare(pixels)

        students = in_process(bundle, inputs, args.threads, args.warmup)
        slowest = max(students, key=lambda r: r["p50_ms"])
        profiles = [{"name": "local", "threads": args.threads}] * bundle.num_students
        with LocalFleet(bundle_dir, profiles, memory_interval_s=0.2, log_dir=Path(tmp) / "logs") as fleet:

            async def run() -> tuple[dict, dict]:
                # Ours (one stream per device) and plain ModelInfer calls, on the same devices.
                async with Aggregator(bundle, fleet.endpoints, deadline_s=10.0, transport="unary") as agg:
                    unary = await latency_run(agg, inputs, args.warmup, fleet.pids())
                async with Aggregator(bundle, fleet.endpoints, deadline_s=10.0, transport=args.transport) as agg:
                    return await aggregator_run(agg, inputs, args.concurrency, args.warmup, fleet.pids()), unary

            agg, unary = asyncio.run(run())
            devices = fleet.summary()
            memory = [memory_breakdown(pid) for pid in fleet.pids()]

    overhead = agg["p50_ms"] - slowest["p50_ms"]
    unary_overhead = unary["p50_ms"] - slowest["p50_ms"]
    ratio = agg["throughput"] / slowest["throughput"]
    # What the students' compute alone allows here: all K students of each image on the machine's
    # cores, with no gRPC, no head and no Python at all.
    compute_bound = (os.cpu_count() or 1) / sum(1.0 / s["throughput"] for s in students)
    ratio_coalesced = agg["throughput_coalesced"] / slowest["throughput"]
    rss = max(d["peak_rss_mb"] for d in devices)
    out = {
        "cpu_cores": os.cpu_count(),
        "bundle": str(args.bundle or f"synthetic {args.students} x {args.arch}"),
        "student_params": [s.params for s in bundle.students],
        "threads": args.threads,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "students_in_process": students,
        "aggregator": agg,
        "aggregator_unary": unary,
        "overhead_p50_ms": overhead,
        "overhead_p50_ms_unary": unary_overhead,
        "compute_bound_throughput": compute_bound,
        "throughput_ratio": ratio,
        "throughput_ratio_coalesced": ratio_coalesced,
        "device_peak_rss_mb": [d["peak_rss_mb"] for d in devices],
        "device_memory_mb": memory,
    }

    def goal(ok: bool) -> str:
        return "meets goal" if ok else "MISSES goal"

    print(f"machine: {os.cpu_count()} CPU cores; {bundle.num_students} devices x {args.threads} ONNX Runtime thread(s); {args.requests} batch-1 requests")
    for s, params in zip(students, out["student_params"]):
        print(f"  in-process {s['student']:>10} ({params:,} params): p50 {s['p50_ms']:.3f} ms  p99 {s['p99_ms']:.3f} ms  {s['throughput']:.0f} img/s")
    print(f"  aggregator over {bundle.num_students} device processes ({'/'.join(sorted(set(agg['transports'])))}): p50 {agg['p50_ms']:.3f} ms  p99 {agg['p99_ms']:.3f} ms")
    print(f"  same, plain ModelInfer calls (unary):          p50 {unary['p50_ms']:.3f} ms  p99 {unary['p99_ms']:.3f} ms")
    print(f"overhead p50 (aggregator - slowest student {slowest['student']}): {overhead:.3f} ms  [{goal(overhead < GOAL_OVERHEAD_MS)} < {GOAL_OVERHEAD_MS} ms]")
    print(f"  unary: {unary_overhead:.3f} ms; stream/unary overhead ratio {overhead / unary_overhead:.2f}")
    print(
        f"throughput: aggregator {agg['throughput']:.0f} img/s with {args.concurrency} in flight vs slowest student in-process "
        f"{slowest['throughput']:.0f} img/s: ratio {ratio:.2f}  [{goal(ratio >= GOAL_THROUGHPUT_RATIO)} >= {GOAL_THROUGHPUT_RATIO}]"
    )
    print(
        f"            with queued requests coalesced (up to {args.concurrency} images per device call): "
        f"{agg['throughput_coalesced']:.0f} img/s: ratio {ratio_coalesced:.2f}  [{goal(ratio_coalesced >= GOAL_THROUGHPUT_RATIO)} >= {GOAL_THROUGHPUT_RATIO}]"
    )
    print(
        f"  bound from the students' compute alone on {os.cpu_count()} cores: {compute_bound:.0f} img/s, "
        f"ratio {compute_bound / slowest['throughput']:.2f}"
    )
    for label, run in (("stream", agg), ("unary", unary)):
        cpu = run["cpu_ms_per_request"]
        print(
            f"CPU per batch-1 request ({label}): aggregator {cpu['aggregator']:.3f} ms, devices "
            f"{', '.join(f'{v:.3f}' for v in cpu['devices'])} ms (in-process student: ~{slowest['p50_ms']:.3f} ms)"
        )
    print(f"degraded answers: {agg['degraded_answers']} of {2 * args.requests} (throughput runs)")
    print(f"device server peak RSS: {', '.join(f'{v:.1f}' for v in out['device_peak_rss_mb'])} MB  [{goal(rss < GOAL_RSS_MB)} < {GOAL_RSS_MB:.0f} MB]")
    for m in memory:
        print(f"  RSS {m['VmRSS']:.1f} MB = {m['RssAnon']:.1f} MB private (heap) + {m['RssFile']:.1f} MB mapped files (shared libraries)")
    for s, sent, received in zip(bundle.students, agg["bytes_sent"], agg["bytes_received"]):
        print(f"  {s.name}: {sent} B sent, {received} B received per batch-1 inference ({s.feature_size} features)")
    if args.json:
        from nonn.artifacts import atomic_write_json

        atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
