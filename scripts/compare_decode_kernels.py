"""Decode-step time of an engine on ONNX Runtime vs the compiled CPU kernels
(runtime/decode_kernels.py), side by side in one run, with each one's MatMul floor (the
step's weight products alone: ONNX Runtime's kernels, runtime/matmul_floor.py, and ours),
the kernels' attention alone (every layer, same cache and positions), the kernels' first
steps right after a prompt step on an ONNX Runtime that spins on after its runs and on one that
stops spinning at the end of each run (the runtime's setting with the kernels on), the
kernels' steps launched from a second thread after the main thread, and the read bandwidth
measured between repetitions (the host's bandwidth drifts: compare within a run).

    .venv/bin/python scripts/compare_decode_kernels.py ENGINE_DIR [--context 512] [--steps 64]
        [--runs 3] [--rows 1]

One "step" is one new token per row for ROWS rows (slots 0..ROWS-1) after CONTEXT cached
tokens (random cache contents; both paths read the same cache). The bound (1 row) is the
weights plus the mean KV read of a step over the read bandwidth. Prints a table and writes
JSON into the cache's bench/ folder.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from enginesmith.compiler.artifact import read_manifest
from enginesmith.runtime.bench import read_bandwidth, save_results
from enginesmith.runtime.decode_plan import CompiledDecoder
from enginesmith.runtime.matmul_floor import MatMulFloor, weight_matmul_shapes
from enginesmith.runtime.session import EngineSession

PROMPT_TOKENS = 256  # the prompt step before STEPS_AFTER_PROMPT kernel steps
STEPS_AFTER_PROMPT = 4


def step_ms(step: Callable[[int, int], object], context: int, steps: int, rows: int) -> float:
    """Median ms of STEPS calls step(rows, position), one position further each call."""
    times = []
    for i in range(steps):
        t = time.perf_counter()
        step(rows, context + i)
        times.append(time.perf_counter() - t)
    return float(np.median(times[2:])) * 1e3


def fill_random_caches(session: EngineSession) -> None:
    """The session's KV caches filled with the same random contents every call (seed 0)."""
    rng = np.random.default_rng(0)
    for buffer in (session.cache_key_all, session.cache_value_all):
        buffer[...] = rng.standard_normal(buffer.shape, np.float32) * 0.5


def kernel_session(engine: Path) -> tuple[EngineSession, CompiledDecoder]:
    """ENGINE loaded with the decode kernels on and random caches (fill_random_caches), and
    its decoder; exits naming why when the engine has no decode kernels."""
    session = EngineSession(engine, read_manifest(engine, verify_hashes=False), decode_kernels=True)
    if session.decoder is None:
        raise SystemExit(f"no decode kernels for this engine: {session.decoder_unavailable}")
    fill_random_caches(session)
    return session, session.decoder


def add_step_ab_arguments(p: argparse.ArgumentParser, reps: int, each: str) -> None:
    """The arguments every step A/B script takes: ENGINE, --context, --steps and --reps
    (EACH names what runs once per repetition)."""
    p.add_argument("engine", type=Path, help="onnxruntime engine directory (fp32, fused)")
    p.add_argument("--context", type=int, default=640, help="cached tokens before the steps")
    p.add_argument("--steps", type=int, default=40, help="steps timed per turn (2 warm-up)")
    p.add_argument("--reps", type=int, default=reps, help=f"repetitions (each {each} once)")


def check_step_ab_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.steps < 3 or args.reps < 1 or args.context < 1:
        p.error("--steps must be >= 3 (2 are warm-up), --reps and --context >= 1")


def second_thread_ms(timed: Callable[[], float]) -> dict[str, float]:
    """TIMED() on the main thread, then on a second thread: the way an asyncio server's engine
    thread steps a session that the main thread warmed up. numba's OpenMP layer gives each
    launching thread a team of its own, and libgomp (one copy per process, shared with torch)
    stops spinning between parallel regions once its teams hold more threads than there are
    cores. A step with a region per weight product (~150) paid a futex wake-up for each; the
    step is now one region (runtime/decode_kernels.py, decode_step)."""
    results = {"main thread": timed()}
    worker = threading.Thread(target=lambda: results.__setitem__("second thread", timed()))
    worker.start()
    worker.join()
    results["main thread again"] = timed()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("engine", type=Path, help="onnxruntime engine directory (fp32, fused)")
    p.add_argument("--context", type=int, default=512, help="cached tokens before each run")
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per repetition")
    p.add_argument("--runs", type=int, default=3, help="repetitions (median reported)")
    p.add_argument("--rows", default="1", help="comma-separated rows per step, e.g. 1,4")
    args = p.parse_args()
    try:
        row_counts = [int(r) for r in args.rows.split(",")]
    except ValueError:
        p.error(f"--rows takes comma-separated integers, e.g. 1,4 (got {args.rows!r})")
    if min(row_counts) < 1 or args.runs < 1 or args.steps < 3 or args.context < 1:
        p.error("--rows, --runs and --context must be >= 1 and --steps >= 3 (2 are warm-up)")

    manifest = read_manifest(args.engine, verify_hashes=False)
    # Two sessions over equal random caches: the ONNX Runtime rows run on the runtime's default
    # session (kernels off, workers spinning on between runs); with the kernels on, a session's
    # ONNX Runtime stops spinning at the end of each run (runtime/session.py).
    session = EngineSession(args.engine, manifest, decode_kernels=False)
    kernels = EngineSession(args.engine, manifest, decode_kernels=True)
    decoder = kernels.decoder
    if decoder is None:
        raise SystemExit(f"no decode kernels for this engine: {kernels.decoder_unavailable}")
    if max(row_counts) > session.max_batch:
        raise SystemExit(f"--rows above the engine's max batch ({session.max_batch})")
    for s in (session, kernels):
        fill_random_caches(s)
    session.warmup()

    def ort_step(rows: int, pos: int) -> object:
        col = np.full((rows, 1), pos)
        full = np.full(rows, pos, np.int32)
        ids = np.full((rows, 1), 7)
        return session.step(0, ids, col, full, np.ones(rows, np.int32), np.arange(rows))

    def kernel_step(rows: int, pos: int) -> object:
        keys, values = kernels.cache_key_all, kernels.cache_value_all
        positions = np.full(rows, pos)
        return decoder.step(keys, values, 0, np.full(rows, 7), positions, np.arange(rows))

    def kernel_weights_only(rows: int, pos: int) -> object:
        return decoder.weight_products_only(rows)

    def kernel_attention_only(rows: int, pos: int) -> object:
        positions = np.full(rows, pos)
        return decoder.attention_only(kernels.cache_key_all, kernels.cache_value_all, positions)

    def steps_after_prompt_ms(ort: EngineSession) -> float:
        """ms of STEPS_AFTER_PROMPT 1-row kernel steps right after a PROMPT_TOKENS prompt step
        on ORT's session (into the last slot, which 1-row steps do not read): what ORT's
        worker threads, spinning on after the run or stopping at its end, take from the kernels."""
        slot, n = ort.max_batch - 1, PROMPT_TOKENS
        last = np.array([n - 1])
        ort.step(slot, np.full((1, n), 7), np.arange(n)[None], last.astype(np.int32),
                 np.array([n], np.int32), last)  # fmt: skip
        t = time.perf_counter()
        for i in range(STEPS_AFTER_PROMPT):
            kernel_step(1, args.context + i)
        return (time.perf_counter() - t) * 1e3

    kernel_step(1, 0)  # compile (or load the compiled cache)
    floor = MatMulFloor(weight_matmul_shapes(args.engine / manifest["files_by_role"]["model"]))
    samples: dict[str, list[float]] = {"onnxruntime MatMuls": [], "bw": []}
    # Spinning on: `session` (kernels off, the runtime's default); stopping: `kernels` (with the
    # kernels on, its ONNX Runtime stops spinning at the end of each run, runtime/session.py).
    after_prompt: dict[str, list[float]] = {"ORT spinning on": [], "ORT stops spinning": []}
    for run in range(args.runs):
        for rows in row_counts:
            paths = (
                ("onnxruntime", ort_step),
                ("kernels", kernel_step),
                ("kernel MatMuls", kernel_weights_only),
                ("kernel attention", kernel_attention_only),
            )
            for name, fn in paths:
                ms = step_ms(fn, args.context, args.steps, rows)
                samples.setdefault(f"{name} {rows} row(s)", []).append(ms)
        if session.max_batch > 1:
            for label, ort in (("ORT spinning on", session), ("ORT stops spinning", kernels)):
                trials = [steps_after_prompt_ms(ort) for _ in range(5)]
                after_prompt[label].append(float(np.median(trials)))
        samples["onnxruntime MatMuls"].append(1e3 / floor.tokens_per_s())
        samples["bw"].append(read_bandwidth())
        print(
            f"run {run + 1}: "
            + ", ".join(f"{k} {v[-1]:.2f} ms" for k, v in samples.items() if k != "bw")
            + f", read bandwidth {samples['bw'][-1] / 1e9:.1f} GB/s",
            flush=True,
        )
    mean_context = args.context + args.steps // 2
    kv_bytes = manifest["kv_cache"]["bytes_per_token"] * mean_context
    med = {k: float(np.median(v)) for k, v in samples.items()}
    bound_ms = (floor.weight_bytes + kv_bytes) / med["bw"] * 1e3
    print(f"\n{'path':<28} {'step ms':>8} {'tok/s':>7} {'% of bound (1 row)':>19}")
    for name, ms in med.items():
        if name == "bw":
            continue
        rows = 1 if name == "onnxruntime MatMuls" else int(name.rsplit(" ", 2)[1])
        if "attention" in name:  # a part of a step: no tokens, no bound
            print(f"{name:<28} {ms:8.2f}")
            continue
        share = f"{bound_ms / ms:19.1%}" if rows == 1 else f"{'':>19}"
        print(f"{name:<28} {ms:8.2f} {rows * 1e3 / ms:7.1f} {share}")
    print(
        f"bound: {(floor.weight_bytes + kv_bytes) / 1e6:.0f} MB per token (weights + mean KV read) "
        f"at {med['bw'] / 1e9:.1f} GB/s = {bound_ms:.2f} ms"
    )
    if after_prompt["ORT spinning on"]:
        alone = med.get("kernels 1 row(s)")
        print(
            f"{STEPS_AFTER_PROMPT} kernel steps (1 row) right after a {PROMPT_TOKENS}-token prompt "
            "step on ONNX Runtime: "
            + ", ".join(f"{k} {np.median(v):.2f} ms" for k, v in after_prompt.items())
            + (f" (the same steps alone: {STEPS_AFTER_PROMPT * alone:.2f} ms)" if alone else "")
        )
    # Last, since launching from several threads leaves numba's OpenMP runtime with several
    # teams for the rest of the process.
    threads_ms = second_thread_ms(lambda: step_ms(kernel_step, args.context, args.steps, 1))
    print(
        "1-row kernel steps launched from the main thread, then from a second thread: "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in threads_ms.items())
    )
    record = {
        "args": vars(args) | {"engine": str(args.engine)},
        "samples": samples,
        "steps_after_prompt_ms": after_prompt,
        "second_thread_ms": threads_ms,
    }
    out = save_results(record | {"median": med, "bound_ms": bound_ms}, None, "decode-kernels")
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
