"""Decode-step time of an engine on ONNX Runtime vs the compiled CPU kernels
(runtime/decode_kernels.py), side by side in one run, with the MatMul floor and the read
bandwidth measured between repetitions (the host's bandwidth drifts: compare within a run).

    .venv/bin/python scripts/compare_decode_kernels.py ENGINE_DIR [--context 512] [--steps 64]
        [--runs 3]

One "step" is one new token at batch 1 after CONTEXT cached tokens (random cache contents;
both paths read the same cache). Prints a table and writes JSON into the cache's bench/ folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from enginesmith.compiler.artifact import read_manifest
from enginesmith.compiler.presets import cache_dir
from enginesmith.runtime.bench import best_bandwidth, measure_bandwidth
from enginesmith.runtime.matmul_floor import MatMulFloor, weight_matmul_shapes
from enginesmith.runtime.session import EngineSession


def step_ms(session: EngineSession, context: int, steps: int) -> float:
    one = lambda n: np.array([n], np.int32)  # noqa: E731
    times = []
    for i in range(steps):
        p = context + i
        t = time.perf_counter()
        session.step(0, np.array([[7]]), np.array([[p]]), one(p), one(1), np.array([0]))
        times.append(time.perf_counter() - t)
    return float(np.median(times[2:])) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("engine", type=Path, help="onnxruntime engine directory (fp32, fused)")
    p.add_argument("--context", type=int, default=512, help="cached tokens before each run")
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per repetition")
    p.add_argument("--runs", type=int, default=3, help="repetitions (median reported)")
    args = p.parse_args()

    manifest = read_manifest(args.engine, verify_hashes=False)
    session = EngineSession(args.engine, manifest, decode_kernels=True)
    if session.decoder is None:
        raise SystemExit(f"no decode kernels for this engine: {session.decoder_unavailable}")
    rng = np.random.default_rng(0)
    for buffer in (session.cache_key_all, session.cache_value_all):
        buffer[...] = rng.standard_normal(buffer.shape, np.float32) * 0.5
    session.warmup()
    decoder = session.decoder
    floor = MatMulFloor(weight_matmul_shapes(args.engine / manifest["files_by_role"]["model"]))
    rows: dict[str, list[float]] = {"onnxruntime": [], "kernels": [], "floor": [], "bw": []}
    for run in range(args.runs):
        session.decoder = None
        rows["onnxruntime"].append(step_ms(session, args.context, args.steps))
        session.decoder = decoder
        rows["kernels"].append(step_ms(session, args.context, args.steps))
        rows["floor"].append(1e3 / floor.tokens_per_s())
        rows["bw"].append(best_bandwidth(measure_bandwidth(reps=3)["samples_bytes_per_s"])[1])
        print(
            f"run {run + 1}: onnxruntime {rows['onnxruntime'][-1]:.2f} ms, kernels "
            f"{rows['kernels'][-1]:.2f} ms, MatMul floor {rows['floor'][-1]:.2f} ms, "
            f"read bandwidth {rows['bw'][-1] / 1e9:.1f} GB/s",
            flush=True,
        )
    kv_bytes = 2 * manifest["model"]["num_layers"] * manifest["model"]["num_kv_heads"]
    kv_bytes *= manifest["model"]["head_dim"] * 4 * (args.context + args.steps // 2)
    weight_bytes = floor.weight_bytes
    med = {k: float(np.median(v)) for k, v in rows.items()}
    bound_ms = (weight_bytes + kv_bytes) / med["bw"] * 1e3
    print(f"\n{'path':<14} {'step ms':>8} {'tok/s':>7} {'% of bound':>10}")
    for name in ("onnxruntime", "kernels", "floor"):
        print(f"{name:<14} {med[name]:8.2f} {1e3 / med[name]:7.1f} {bound_ms / med[name]:10.1%}")
    print(
        f"bound: {(weight_bytes + kv_bytes) / 1e6:.0f} MB per token (weights + mean KV read) "
        f"at {med['bw'] / 1e9:.1f} GB/s = {bound_ms:.2f} ms"
    )
    out = cache_dir() / "bench" / time.strftime("decode-kernels-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"engine": str(args.engine), "args": vars(args) | {"engine": str(args.engine)}}
            | {"samples": rows, "median": med, "bound_ms": bound_ms},
            indent=2,
        )
        + "\n"
    )
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
