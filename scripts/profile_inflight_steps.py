"""Where in-flight serving spends its engine time, by step kind and path: the workload of
`enginesmith bench --serving` (runtime/bench_serving.py) through `await llm.submit`, with every
session step timed and counted as a prompt step or a decode step, on ONNX Runtime or on the
compiled decode kernels; a greedy run (several decode steps of a request decoding alone in one
kernel call, runtime/engine_core.py) counts as its tokens' steps, kind "greedy".

    .venv/bin/python scripts/profile_inflight_steps.py [--decode-kernels] [--engine DIR]
        [--requests 64] [--rate 32] [--seed 0]

Prints one line per (path, kind, rows) with the steps, their total and mean time, and the
output tokens per second of the run.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from enginesmith import LLM, SamplingParams
from enginesmith.runtime import bench_serving
from enginesmith.runtime.session import DECODE_KERNEL_MAX_ROWS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--decode-kernels",
        action="store_true",
        help="decode steps on the compiled kernels, LLM(decode_kernels=True); without it every "
        "step runs on ONNX Runtime, LLM(decode_kernels=False) (unlike the runtime's default)",
    )
    p.add_argument("--engine", type=Path, help="engine directory (default: the bench's)")
    p.add_argument("--requests", type=int, default=64, help="requests in the workload")
    p.add_argument("--rate", type=float, default=32.0, help="Poisson arrivals per second")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    args = p.parse_args()

    engine = bench_serving.ensure_engine(
        args.engine or bench_serving.default_engine_dir(), 16, check_stale=args.engine is None
    )
    llm = LLM(engine, decode_kernels=args.decode_kernels)
    w = bench_serving.make_workload(
        llm.tokenizer, args.requests, args.rate, args.seed, 256, 16, 256
    )
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in w.output_tokens]
    session = llm.session
    step = session.step
    totals: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0, 0.0])

    def timed_step(start: int, input_ids: np.ndarray, *rest: Any) -> np.ndarray:
        t = time.perf_counter()
        out = step(start, input_ids, *rest)
        elapsed = time.perf_counter() - t
        rows, width = input_ids.shape
        if width > 1:
            rows_label = "any"
        elif rows <= DECODE_KERNEL_MAX_ROWS:
            rows_label = str(rows)
        else:
            rows_label = f">{DECODE_KERNEL_MAX_ROWS}"
        path = "kernels" if session.runs_on_kernels(input_ids) else "onnxruntime"
        key = (path, "decode" if width == 1 else "prompt", rows_label)
        totals[key][0] += 1
        totals[key][1] += elapsed
        return out

    greedy_run = session.greedy_run

    def timed_greedy_run(*args: Any) -> np.ndarray:
        t = time.perf_counter()
        tokens = greedy_run(*args)
        totals[("kernels", "greedy", "1")][0] += len(tokens)
        totals[("kernels", "greedy", "1")][1] += time.perf_counter() - t
        return tokens

    session.step = timed_step
    session.greedy_run = timed_greedy_run
    start = time.perf_counter()
    outs, _, _ = bench_serving.run_inflight(llm, w, params)
    wall = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    print(f"decode kernels: {'on' if args.decode_kernels else 'off'}; {engine}")
    print(f"{'path':<12} {'step':<7} {'rows':>4} {'steps':>6} {'total s':>8} {'ms/step':>8}")
    for (path, kind, rows), (n, total) in sorted(totals.items()):
        print(f"{path:<12} {kind:<7} {rows:>4} {int(n):6d} {total:8.2f} {total / n * 1e3:8.1f}")
    busy = sum(t for _, t in totals.values())
    print(f"engine steps {busy:.2f} s of {wall:.2f} s; {tokens / wall:.1f} output tok/s")


if __name__ == "__main__":
    main()
