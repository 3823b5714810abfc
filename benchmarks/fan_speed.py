"""Time the Filter Activation Network: the per-image Python loop against vectorised build_fan.

Both run on the same seeded activations (ReLU of standard normals, float32, as
collect_activations returns them), with the same top-k. The loop is
nonn.partition.fan.build_fan_reference: the authors' per-image, per-pair algorithm with a
deterministic tie rule. Prints both times, the speed-up, and the max relative difference.

    python benchmarks/fan_speed.py                    # 20,000 x 256, top-k 50
    python benchmarks/fan_speed.py --images 2000      # a quicker look
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from nonn.partition.fan import build_fan, build_fan_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--filters", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="build_fan runs; the best is reported")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    activations = np.maximum(rng.standard_normal((args.images, args.filters), dtype=np.float32), 0)
    print(
        f"activations {args.images} x {args.filters} (ReLU of N(0,1), float32, seed {args.seed}), "
        f"top-k {args.top_k}; numpy {np.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}"
    )

    # Wall time and this process's CPU time: on a shared machine the CPU time is the steadier.
    runs = []
    for _ in range(args.repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        fan = build_fan(activations, top_k=args.top_k)
        runs.append((time.perf_counter() - wall, time.process_time() - cpu))
    vec_wall, vec_cpu = min(r[0] for r in runs), min(r[1] for r in runs)
    print(f"build_fan (vectorised):  wall {vec_wall:8.3f} s   cpu {vec_cpu:8.3f} s   (best of {args.repeat})")

    wall, cpu = time.perf_counter(), time.process_time()
    reference = build_fan_reference(activations, top_k=args.top_k)
    loop_wall, loop_cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"per-image Python loop:   wall {loop_wall:8.3f} s   cpu {loop_cpu:8.3f} s")

    max_rel = float(np.abs(fan - reference).max() / np.abs(reference).max())
    print(f"speed-up: {loop_wall / vec_wall:.0f}x wall, {loop_cpu / vec_cpu:.0f}x cpu")
    print(
        f"max relative difference: {max_rel:.2e} "
        f"({'identical to 1e-9' if max_rel <= 1e-9 else 'DIFFERENT'}; bit-identical: {np.array_equal(fan, reference)})"
    )


if __name__ == "__main__":
    main()
