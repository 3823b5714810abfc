"""Fuzz a device server (`nonn serve`) with seeded malformed requests; it must answer every one.

    python benchmarks/fuzz_server.py                       # 10,000 requests, seed 0, a tiny model
    python benchmarks/fuzz_server.py --requests 50000 --seed 7 --json out.json

What it sends, and what counts as a failure, is described in tests/fuzz_testing.py (the
generator and runner, which the test suite runs with fewer requests). Prints the report as JSON
and a one-line summary; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fuzz_testing import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=10_000, help="fuzz requests to send (default: 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request generator (default: 0)")
    parser.add_argument("--window", type=int, default=8, help="requests in flight at once (default: 8)")
    parser.add_argument("--stream-requests", type=int, default=5_000,
                        help="then this many cases over ModelStreamInfer streams (their ModelInfer part; default: 5000)")
    parser.add_argument("--json", default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.window < 1:
        parser.error("--requests and --window must be at least 1")
    with tempfile.TemporaryDirectory(prefix="nonn-fuzz-") as tmp:
        result = run(args.seed, args.requests, Path(tmp), window=args.window, progress=True, stream_count=args.stream_requests)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        from nonn.artifacts import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    stream_failures = result.get("stream", {}).get("failures", 0)
    ok = result["failures"] == 0 and stream_failures == 0 and result["server_alive"] and result["good_request_after"]
    print(
        f"fuzz: {result['requests']} requests in {result['seconds']} s, {result['failures']} failures, "
        + (f"{result['stream']['requests']} streamed messages, {stream_failures} failures, " if "stream" in result else "")
        + f"server {'alive' if result['server_alive'] else 'DEAD'}, good request after: {result['good_request_after']}, "
        f"RSS {result['rss_mb_before']} -> {result['rss_mb_after']} MB",
        file=sys.stderr,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
