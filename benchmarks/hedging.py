"""Hedged requests against a slowed replica: p99 latency with hedging on and off, side by side.

    python benchmarks/hedging.py                       # synthetic 2-student bundle, R = 2, 5 pairs of runs
    python benchmarks/hedging.py --bundle BUNDLE --pairs 7 --slow 0@1:8

A fleet of K students with R = 2 replicas each runs on this machine (`nonn simulate`'s launcher
and network model). From --slow's time on, one device runs FACTOR times slower. Each pair of
runs streams the same requests once with hedging (a second replica is asked when the first has
not answered within its usual time) and once without, in alternating order, so drift in the
machine's load hits both sides alike. It prints every run's p50/p99, the median p99 of each side,
their ratio, and in how many pairs hedging had the lower p99. Goal: hedging lowers p99.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from nonn.devices.profiles import load_profiles, parse_device_list
from nonn.devices.simulate import SimulationConfig, parse_slowdowns, simulate
from nonn.runtime.bundle import Bundle

sys.path.insert(0, str(Path(__file__).parent))
from runtime_latency import synthetic_bundle  # noqa: E402


def one_run(bundle: Path, profiles: list, images: np.ndarray, labels: np.ndarray, hedge: bool, args) -> dict:
    config = SimulationConfig(
        requests=args.requests, concurrency=args.concurrency, replicas=2, hedge=hedge, network=args.network,
        slowdowns=parse_slowdowns([args.slow], len(profiles)), recovery_s=0.0, progress=False, seed=args.seed,
    )  # fmt: skip
    result = simulate(bundle, profiles, images, labels, None, config)
    latency_ms = 1e3 * result.latency_s[np.isfinite(result.latency_s)]
    return {"p50": float(np.percentile(latency_ms, 50)), "p99": float(np.percentile(latency_ms, 99)), "n": len(latency_ms)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default=None, help="bundle directory (default: a synthetic 2-student bundle, 1x16x16 input)")
    p.add_argument("--fleet", default="rpi4b", help="device profile of every device (default: rpi4b)")
    p.add_argument("--slow", default="0@1:8", help="DEVICE@SECONDS:FACTOR (default: 0@1:8, student 0's first replica)")
    p.add_argument("--pairs", type=int, default=5, help="pairs of runs, hedging on and off (default: 5)")
    p.add_argument("--requests", type=int, default=400, help="requests per run (default: 400)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default: 4)")
    p.add_argument("--network", default="delay", choices=("delay", "none"), help="network model (default: delay)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.bundle) if args.bundle else synthetic_bundle(Path(tmp) / "bundle", 2, "cnn-small", (1, 16, 16), 8)
        loaded = Bundle.load(bundle)
        profiles = parse_device_list(f"{args.fleet}:{2 * loaded.num_students}", load_profiles())
        shape = loaded.input_contract.input_shape
        rng = np.random.default_rng(args.seed)
        images = (rng.random((args.requests, *shape)) * 255).astype(np.uint8)
        labels = rng.integers(0, len(loaded.class_names), args.requests)
        print(f"{loaded.num_students} students x 2 replicas on {len(profiles)} x {args.fleet}, slowed: {args.slow}, "
              f"{args.requests} requests per run, concurrency {args.concurrency}, network {args.network}")
        print(f"{'pair':>4} {'order':>8} {'hedge p50':>10} {'hedge p99':>10} {'no-hedge p50':>13} {'no-hedge p99':>13}")
        on, off = [], []
        for pair in range(args.pairs):
            order = (True, False) if pair % 2 == 0 else (False, True)
            runs = {hedge: one_run(bundle, profiles, images, labels, hedge, args) for hedge in order}
            on.append(runs[True])
            off.append(runs[False])
            print(f"{pair:>4} {'on,off' if order[0] else 'off,on':>8} {runs[True]['p50']:>10.2f} {runs[True]['p99']:>10.2f} "
                  f"{runs[False]['p50']:>13.2f} {runs[False]['p99']:>13.2f}")
    med_on, med_off = statistics.median(r["p99"] for r in on), statistics.median(r["p99"] for r in off)
    wins = sum(a["p99"] < b["p99"] for a, b in zip(on, off))
    print(f"median p99: hedging {med_on:.2f} ms, without {med_off:.2f} ms, ratio {med_on / med_off:.2f}; "
          f"hedging lower in {wins} of {args.pairs} pairs")
    print(f"goal (hedging lowers p99): {'met' if med_on < med_off and wins > args.pairs / 2 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
