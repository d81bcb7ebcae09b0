"""Which placement the host gave the two vCPUs, sampled over time: the one-way cache-line
handoff between two threads (runtime/core_handoff.py) next to the read bandwidth
(bench.read_bandwidth), to show that the host's two bandwidth levels are two core
placements (docs/benchmarks.md, "Two bandwidth levels are two core placements").

    .venv/bin/python scripts/core_handoff.py [--samples 30] [--every 10]

Prints one line per sample and, per placement (handoff under / over
core_handoff.SHARED_L3_MAX_NS), the median bandwidth; writes JSON into the cache's bench/.
"""

from __future__ import annotations

import argparse
import statistics
import time

from enginesmith.runtime.bench import read_bandwidth, run_record, save_results
from enginesmith.runtime.core_handoff import (
    SHARED_L3_MAX_NS,
    by_placement,
    core_handoff_ns,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=30, help="samples to take")
    p.add_argument("--every", type=float, default=10.0, help="seconds from one sample to the next")
    args = p.parse_args()
    if args.samples < 1 or args.every < 0:
        p.error("--samples must be >= 1 and --every >= 0")
    rows = []
    for i in range(args.samples):
        started = time.monotonic()
        before = core_handoff_ns()
        bandwidth = read_bandwidth()
        after = core_handoff_ns()
        if before is None or after is None:
            raise SystemExit("the handoff needs two numba threads: run on a machine with 2+ cores")
        rows.append({"handoff_ns": [before, after], "read_bytes_per_s": bandwidth})
        print(
            f"{i + 1:3d}  handoff {before:5.0f} / {after:5.0f} ns  read {bandwidth / 1e9:5.1f} GB/s",
            flush=True,
        )
        time.sleep(max(0.0, args.every - (time.monotonic() - started)))
    summary = {}
    placed = by_placement([r["handoff_ns"] for r in rows])
    for label, indices in placed.items():
        held = [rows[i]["read_bytes_per_s"] for i in indices]
        summary[label] = {
            "samples": len(held),
            "median_read_bytes_per_s": statistics.median(held) if held else None,
        }
        median = f"{statistics.median(held) / 1e9:.1f} GB/s" if held else "-"
        print(f"{label:<20} {len(held):3d} samples, median read {median}")
    moved = len(rows) - sum(len(indices) for indices in placed.values())
    print(f"{'moved during sample':<20} {moved:3d} samples")
    record = run_record(args, shared_l3_max_ns=SHARED_L3_MAX_NS, samples=rows, summary=summary)
    print(f"JSON: {save_results(record, None, 'core-handoff')}")


if __name__ == "__main__":
    main()
