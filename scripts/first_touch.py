"""How fast this machine backs fresh memory: the time of a first touch (one write per 4 KiB page
of a new allocation, so every page faults in) next to a second touch of the same pages, for
several allocations in a row, and the rate at which the first touch makes memory usable. On a
VM whose host backs guest memory lazily the first touch can be tens of times slower, which is
why the runtime writes its KV caches at load (runtime/session.py, resident_zeros) instead of
faulting them in during serving steps.

    .venv/bin/python scripts/first_touch.py [--mb 384] [--allocations 6]

Prints one line per allocation and the medians, and writes JSON into the cache's bench/ folder.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from enginesmith.runtime.bench import save_results

PAGE_FLOATS = 4096 // 4


def touch_ms(buffer: np.ndarray) -> float:
    """ms of writing one float into every page of BUFFER."""
    start = time.perf_counter()
    buffer[::PAGE_FLOATS] = 1.0
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mb", type=int, default=384, help="size of each allocation in MB")
    p.add_argument("--allocations", type=int, default=6, help="allocations measured in a row")
    args = p.parse_args()
    if args.mb < 1 or args.allocations < 1:
        p.error("--mb and --allocations must be >= 1")

    rows = []
    held = []  # kept alive: each allocation must be new memory, not the previous one reused
    for i in range(args.allocations):
        buffer = np.empty(args.mb * 1_000_000 // 4, np.float32)
        first, second = touch_ms(buffer), touch_ms(buffer)
        held.append(buffer)
        rows.append({"allocation": i + 1, "first_touch_ms": first, "second_touch_ms": second})
        print(f"allocation {i + 1}: {args.mb} MB, first touch {first:8.1f} ms "
              f"({args.mb / first:5.2f} GB/s backed), second touch {second:6.1f} ms",
              flush=True)  # fmt: skip
    first_median = float(np.median([r["first_touch_ms"] for r in rows]))
    second_median = float(np.median([r["second_touch_ms"] for r in rows]))
    print(f"median: first touch {first_median:.1f} ms ({args.mb / first_median:.2f} GB/s backed), "
          f"second touch {second_median:.1f} ms")  # fmt: skip
    out = save_results({"mb": args.mb, "allocations": rows}, None, "first-touch")
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
