"""Load test: concurrent clients against the served ensemble over K device processes, on loopback.

    python benchmarks/load_test.py                          # 8 clients, 60 s, 4 devices, tiny bundle
    python benchmarks/load_test.py --bundle BUNDLE --clients 8 --duration 60 --json out.json

Starts K `nonn serve` device processes (LocalFleet, loopback only) and one aggregating front end
(`nonn serve --bundle B --aggregate --devices ...`) so clients see one model, then runs
`--clients` client threads, each with its own gRPC channel, sending batch-1 ModelInfer requests
back to back until `--duration` seconds or `--max-requests` requests have passed, whichever
comes first. Every answer is checked: status OK, all K devices contributed, logits equal to the
ensemble computed in-process with ONNX Runtime. Reports the error count, latency percentiles,
throughput, and the resident memory (RSS) of every server process after a warm-up and at the
end (goal: zero errors, growth under 10%), with the peak seen in between.

Without --bundle a tiny bundle of K linear students is built with onnx.helper, so the numbers
measure the serving stack (gRPC, validation, fan-out, head) rather than the models.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

GOAL_RSS_GROWTH = 0.10
MB = 1 << 20


@dataclass
class ClientStats:
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    error_count: int = 0

    def error(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < 5:
            self.errors.append(message)


def reference_logits(bundle, images: np.ndarray) -> np.ndarray:
    """The ensemble's logits computed in-process with ONNX Runtime."""
    from nonn.runtime.onnx_model import OnnxModel

    parts = []
    for student in bundle.students:
        model = OnnxModel(bundle.path_of(student))
        parts.append(model.run({student.input.name: images})[student.output.name])
    head = OnnxModel(bundle.path_of(bundle.head))
    return head.run({bundle.head.input.name: np.concatenate(parts, axis=1)})[bundle.head.output.name]


def start_front_end(bundle_dir: Path, endpoints: list[str], workdir: Path) -> tuple[subprocess.Popen, str]:
    ready = workdir / "front.json"
    log = open(workdir / "front.log", "wb")
    cmd = [sys.executable, "-m", "nonn", "serve", "--bundle", str(bundle_dir), "--aggregate",
           "--devices", ",".join(endpoints), "--port", "0", "--ready-file", str(ready)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the aggregating front end did not start:\n{(workdir / 'front.log').read_text()}")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())["address"]


def rss_mb(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = psutil.Process(pid).memory_info().rss / MB
        except psutil.NoSuchProcess:
            out[name] = float("nan")
    return out


def run_client(address: str, model: str, input_name: str, images: np.ndarray, expected: np.ndarray, k: int,
               stop_at: float, budget: "RequestBudget", stats: ClientStats, seed: int) -> None:  # fmt: skip
    """Send batch-1 requests back to back until time or the request budget runs out; check each answer."""
    rng = np.random.default_rng(seed)
    full = ",".join(["1"] * k)
    with grpc.insecure_channel(address) as channel:
        infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        while time.monotonic() < stop_at and budget.take():
            i = int(rng.integers(len(images)))
            request = pb.ModelInferRequest(model_name=model)
            request.inputs.add(name=input_name, datatype="FP32", shape=[1, *images.shape[1:]])
            request.raw_input_contents.append(images[i : i + 1].tobytes())
            t0 = time.perf_counter()
            try:
                reply = infer(request, timeout=10)
            except grpc.RpcError as exc:
                stats.error(f"{exc.code().name}: {exc.details()}")
                continue
            stats.latencies_s.append(time.perf_counter() - t0)
            contributed = reply.parameters["contributed"].string_param
            logits = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(1, -1)
            if contributed != full:
                stats.error(f"degraded answer: contributed {contributed}")
            elif not np.allclose(logits, expected[i : i + 1], rtol=1e-4, atol=1e-4):
                stats.error(f"wrong logits for image {i}")


class RequestBudget:
    """A shared, thread-safe cap on the number of requests."""

    def __init__(self, limit: int) -> None:
        self.left = limit
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.left <= 0:
                return False
            self.left -= 1
            return True


def load_test(bundle_dir: Path, clients: int, duration_s: float, max_requests: int, warmup_s: float, workdir: Path) -> dict[str, Any]:
    from nonn.devices.fleet import LocalFleet
    from nonn.runtime.bundle import Bundle

    from fleet_testing import tiny_profile

    bundle = Bundle.load(bundle_dir)
    k = bundle.num_students
    spec = bundle.students[0].input
    images = np.random.default_rng(0).normal(size=(64, *spec.shape[1:])).astype(np.float32)
    expected = reference_logits(bundle, images)
    with LocalFleet(bundle_dir, [tiny_profile(f"device{i}") for i in range(k)], log_dir=workdir / "devices") as fleet:
        front, address = start_front_end(bundle_dir, fleet.endpoints, workdir)
        try:
            pids = {f"device{i} ({d.student})": pid for i, (d, pid) in enumerate(zip(fleet.devices, fleet.pids()))}
            pids["aggregator (serve --aggregate)"] = front.pid

            def phase(seconds: float, budget: RequestBudget) -> list[ClientStats]:
                stop_at = time.monotonic() + seconds
                stats = [ClientStats() for _ in range(clients)]
                threads = [
                    threading.Thread(target=run_client, args=(address, "ensemble", spec.name, images, expected, k, stop_at, budget, s, i))
                    for i, s in enumerate(stats)
                ]
                for t in threads:
                    t.start()
                peak = rss_mb(pids)
                while any(t.is_alive() for t in threads):
                    time.sleep(1.0)
                    for name, value in rss_mb(pids).items():
                        peak[name] = max(peak[name], value)
                for t in threads:
                    t.join()
                stats[0].peak = peak  # type: ignore[attr-defined]
                return stats

            warm = phase(warmup_s, RequestBudget(max_requests))
            rss_start = rss_mb(pids)
            t0 = time.perf_counter()
            stats = phase(duration_s, RequestBudget(max_requests))
            wall = time.perf_counter() - t0
            rss_end = rss_mb(pids)
            peak = stats[0].peak  # type: ignore[attr-defined]
            alive = {name: psutil.pid_exists(pid) for name, pid in pids.items()}
        finally:
            front.terminate()
            try:
                front.wait(15)
            except subprocess.TimeoutExpired:
                front.kill()
                front.wait()

    latencies = np.asarray([x for s in stats for x in s.latencies_s]) * 1e3
    errors = sum(s.error_count for s in stats) + sum(s.error_count for s in warm)
    processes = {
        name: {
            "rss_mb_start": round(rss_start[name], 1),
            "rss_mb_end": round(rss_end[name], 1),
            "rss_mb_peak": round(peak[name], 1),
            "growth": round(rss_end[name] / rss_start[name] - 1, 4),
            "alive_at_end": alive[name],
        }
        for name in pids
    }
    report = {
        "clients": clients,
        "devices": k,
        "duration_s": round(wall, 1),
        "warmup_s": warmup_s,
        "requests": int(len(latencies)) + sum(s.error_count for s in stats),
        "answered": int(len(latencies)),
        "warmup_requests": sum(len(s.latencies_s) for s in warm),
        "errors": errors,
        "error_examples": [e for s in warm + stats for e in s.errors][:10],
        "throughput_rps": round(len(latencies) / wall, 1),
        "latency_ms": {
            "p50": round(float(np.percentile(latencies, 50)), 3),
            "p90": round(float(np.percentile(latencies, 90)), 3),
            "p99": round(float(np.percentile(latencies, 99)), 3),
            "max": round(float(latencies.max()), 3),
        } if len(latencies) else None,
        "processes": processes,
        "cpu_count": os.cpu_count(),
    }  # fmt: skip
    report["pass"] = bool(
        errors == 0 and all(p["growth"] < GOAL_RSS_GROWTH and p["alive_at_end"] for p in processes.values())
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default=None, help="bundle directory (default: a tiny bundle of 4 linear students)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load after the warm-up (default: 60)")
    parser.add_argument("--max-requests", type=int, default=500_000, help="stop earlier after this many requests (default: 500000)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the starting RSS is taken (default: 5)")
    parser.add_argument("--json", default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.max_requests < 1 or args.warmup < 0:
        parser.error("--clients, --duration and --max-requests must be positive, --warmup 0 or more")
    with tempfile.TemporaryDirectory(prefix="nonn-load-") as tmp:
        workdir = Path(tmp)
        if args.bundle is None:
            from fleet_testing import make_bundle

            bundle_dir = make_bundle(workdir / "bundle", feature_sizes=(3, 2, 4, 3), classes=5).root
        else:
            bundle_dir = Path(args.bundle)
        report = load_test(bundle_dir, args.clients, args.duration, args.max_requests, args.warmup, workdir)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        from nonn.artifacts import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    lat = report["latency_ms"] or {}
    print(
        f"load: {report['clients']} clients x {report['duration_s']} s over {report['devices']} devices: "
        f"{report['answered']} answered, {report['errors']} errors, {report['throughput_rps']} req/s, "
        f"p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms; max RSS growth "
        f"{max(p['growth'] for p in report['processes'].values()):.1%}; {'PASS' if report['pass'] else 'FAIL'}",
        file=sys.stderr,
    )
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
