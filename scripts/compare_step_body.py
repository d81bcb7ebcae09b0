"""Decode-step time with the step's thread body (_step_thread) loaded on its own first, as the
runtime does, vs the twice-optimized copy that decode_step's compiled module carries
(runtime/decode_plan.py, CompiledDecoder._load_step_thread_first), side by side.

Which copy runs is fixed per process (the JIT linker resolves the symbol once), so each
measurement is a child process; the two kinds alternate, with the read bandwidth measured
between them (the host's bandwidth drifts: compare the pairs).

    .venv/bin/python scripts/compare_step_body.py ENGINE_DIR [--pairs 5] [--context 640]

Prints a table (median ms of 1-row steps: weight products alone, and whole steps after
CONTEXT cached tokens) and writes JSON into the cache's bench/ folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

KINDS = ("standalone body (runtime)", "linked copy")


def child(engine: Path, linked: bool, context: int, steps: int) -> dict[str, float]:
    """ms per 1-row step in this process: weight products alone and whole steps."""
    from compare_decode_kernels import kernel_session  # this script's neighbour in scripts/

    session, decoder = kernel_session(engine)
    if linked:
        decoder._step_thread_loaded = True  # skip the runtime's load of the standalone body
    keys, values = session.cache_key_all, session.cache_value_all

    def step(position: int) -> None:
        decoder.step(keys, values, 0, np.full(1, 7), np.full(1, position), np.arange(1))

    step(0)  # compile or load
    out: dict[str, list[float]] = {"weights only": [], "step": []}
    for i in range(steps):
        t = time.perf_counter()
        decoder.weight_products_only(1)
        out["weights only"].append(time.perf_counter() - t)
        t = time.perf_counter()
        step(context + i)
        out["step"].append(time.perf_counter() - t)
    return {k: float(np.median(v[2:])) * 1e3 for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("engine", type=Path, help="onnxruntime engine directory (fp32, fused)")
    p.add_argument("--pairs", type=int, default=5, help="child-process pairs (one of each kind)")
    p.add_argument("--context", type=int, default=640, help="cached tokens before the steps")
    p.add_argument("--steps", type=int, default=40, help="steps timed per child (2 warm-up)")
    p.add_argument("--child", choices=("standalone", "linked"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = child(args.engine, args.child == "linked", args.context, args.steps)
        print(json.dumps(result))
        return
    if args.pairs < 1 or args.steps < 3 or args.context < 1:
        p.error("--pairs and --context must be >= 1 and --steps >= 3")

    from enginesmith.runtime.bench import read_bandwidth, save_results

    def run_child(kind: str) -> dict[str, float]:
        command = [sys.executable, __file__, str(args.engine), "--child", kind,
                   "--context", str(args.context), "--steps", str(args.steps)]  # fmt: skip
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))

    samples: dict[str, dict[str, list[float]]] = {k: {} for k in KINDS}
    bandwidth: list[float] = []
    for pair in range(args.pairs):
        for kind, flag in zip(KINDS, ("standalone", "linked"), strict=True):
            for name, ms in run_child(flag).items():
                samples[kind].setdefault(name, []).append(ms)
        bandwidth.append(read_bandwidth())
        print(
            f"pair {pair + 1}: "
            + ", ".join(
                f"{kind} {name} {v[-1]:.2f} ms"
                for kind in KINDS
                for name, v in samples[kind].items()
            )
            + f", read bandwidth {bandwidth[-1] / 1e9:.1f} GB/s",
            flush=True,
        )
    base = samples[KINDS[0]]
    print(f"\n{'body':<28} {'what':<14} {'median ms':>9} {'vs runtime (median of pairs)':>29}")
    for kind in KINDS:
        for name, values in samples[kind].items():
            ratios = np.array(values) / np.array(base[name])
            print(f"{kind:<28} {name:<14} {np.median(values):9.2f} {np.median(ratios):29.3f}")
    record = {"args": vars(args) | {"engine": str(args.engine)}, "samples": samples,
              "bandwidth_bytes_per_s": bandwidth}  # fmt: skip
    out = save_results(record, None, "step-body")
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
