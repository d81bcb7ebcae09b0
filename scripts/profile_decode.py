"""Where a decode step's time goes: ONNX Runtime's profiler on an engine's batch-1 decode steps,
summed per op type (the profiler adds per-node overhead: use it for shares, not for speed).

    .venv/bin/python scripts/profile_decode.py ENGINE_DIR [--context 512] [--steps 64]

Prints a table and writes the sums as JSON next to the profiler's own trace (in the cache's
bench/ folder).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from enginesmith.compiler.artifact import read_manifest
from enginesmith.compiler.presets import cache_dir
from enginesmith.runtime.session import EngineSession


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("engine", type=Path, help="onnxruntime engine directory")
    p.add_argument("--context", type=int, default=512, help="tokens cached before decoding")
    p.add_argument("--steps", type=int, default=64, help="decode steps profiled")
    args = p.parse_args()

    manifest = read_manifest(args.engine, verify_hashes=False)
    session = EngineSession(args.engine, manifest)
    out_dir = cache_dir() / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.enable_mem_pattern = False
    options.log_severity_level = 3
    options.profile_file_prefix = str(out_dir / "ort-profile")
    model = args.engine / manifest["files_by_role"]["model"]
    session.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    one = lambda n: np.array([n], np.int32)  # noqa: E731
    ctx = args.context
    ids = (np.arange(ctx) % 1000 + 5)[None]
    logits = session.step(0, ids, np.arange(ctx)[None], one(ctx - 1), one(ctx), np.array([ctx - 1]))
    token, total = int(logits.argmax()), ctx
    for _ in range(args.steps):
        total += 1
        logits = session.step(
            0, np.array([[token]]), np.array([[total - 1]]), one(total - 1), one(1), np.array([0])
        )
        token = int(logits.argmax())
    trace = Path(session.session.end_profiling())

    events = json.loads(trace.read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[1:]
    first = runs[0]["ts"]  # the prefill run is left out
    per_op: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            per_op[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    n = len(runs)
    step_us = float(np.median([r["dur"] for r in runs]))
    kernels_us = sum(per_op.values()) / n
    print(f"{args.engine}: {n} decode steps after {ctx} cached tokens (profiled)")
    print(f"median step {step_us:.0f} us; kernels {kernels_us:.0f} us per step")
    print(f"{'op':<36} {'us/step':>8} {'share':>6} {'nodes':>6} {'us/node':>8}")
    for op, dur in per_op.most_common():
        print(
            f"{op:<36} {dur / n:8.0f} {dur / n / kernels_us:6.1%} {count[op] // n:6d} "
            f"{dur / count[op]:8.1f}"
        )
    result = {
        "engine": str(args.engine),
        "context": ctx,
        "steps": n,
        "median_step_us": step_us,
        "kernel_us_per_step": {op: dur / n for op, dur in per_op.items()},
        "trace": str(trace),
    }
    path = trace.with_suffix(".summary.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
