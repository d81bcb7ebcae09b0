"""Decode-step time with the weights and KV caches on 2 MiB pages (what the runtime allocates,
runtime/huge_pages.py) against copies of them on 4 KiB pages, in one process, taking turns.

    .venv/bin/python scripts/compare_page_sizes.py ENGINE_DIR [--context 640] [--steps 40]
        [--reps 10]

Three cases per repetition (order reversed every other one), each the median of STEPS 1-row
steps after CONTEXT cached tokens (random cache contents, the same in every case):
"4 KiB pages" (weights and caches copied into mappings madvised MADV_NOHUGEPAGE),
"2 MiB weights" (the runtime's weights, 4 KiB caches) and "2 MiB all" (the runtime's weights
and caches). The logits of the three are compared first. The core handoff
(runtime/core_handoff.py) is sampled before and after each repetition and the summary is given
per core placement: the host's two bandwidth levels are the two placements. Writes JSON into
the cache's bench/ folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import mmap
import sys
import time
from pathlib import Path

import numpy as np
from compare_decode_kernels import fill_random_caches  # a neighbour in scripts/

from enginesmith.compiler.artifact import read_manifest
from enginesmith.runtime.bench import read_bandwidth, save_results
from enginesmith.runtime.core_handoff import PLACEMENTS, core_handoff_ns, placement
from enginesmith.runtime.huge_pages import huge_page_bytes
from enginesmith.runtime.session import EngineSession

STREAMED = ("lm_head", "w_qkv", "w_o", "w_gate_up", "w_down")
SMALL, HUGE_WEIGHTS, HUGE_ALL = "4 KiB pages", "2 MiB weights", "2 MiB all"


def small_page_copy(array: np.ndarray) -> np.ndarray:
    """A copy of ARRAY in a private mapping madvised MADV_NOHUGEPAGE: 4 KiB pages even where
    the OS would give huge pages unasked (THP "always")."""
    mapping = mmap.mmap(-1, array.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_NOHUGEPAGE)
    out = np.frombuffer(mapping, np.float32).reshape(array.shape)
    out[...] = array
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("engine", type=Path, help="onnxruntime engine directory (fp32, fused)")
    p.add_argument("--context", type=int, default=640, help="cached tokens before the steps")
    p.add_argument("--steps", type=int, default=40, help="steps timed per case (2 warm-up)")
    p.add_argument("--reps", type=int, default=10, help="repetitions (each case once)")
    args = p.parse_args()
    if args.steps < 3 or args.reps < 1 or args.context < 1:
        p.error("--steps must be >= 3 (2 are warm-up), --reps and --context >= 1")

    session = EngineSession(
        args.engine, read_manifest(args.engine, verify_hashes=False), decode_kernels=True
    )
    decoder = session.decoder
    if decoder is None:
        raise SystemExit(f"no decode kernels for this engine: {session.decoder_unavailable}")
    fill_random_caches(session)
    huge_plan = decoder.plan
    small = {name: small_page_copy(getattr(huge_plan, name)) for name in STREAMED}
    tied = huge_plan.embed is huge_plan.lm_head
    small_plan = dataclasses.replace(
        huge_plan, **small, embed=small["lm_head"] if tied else huge_plan.embed
    )
    huge_caches = (session.cache_key_all, session.cache_value_all)
    small_caches = tuple(small_page_copy(c) for c in huge_caches)
    huge_bytes = sum(huge_page_bytes(getattr(huge_plan, n)) or 0 for n in STREAMED)
    print(
        f"runtime's weights: {huge_bytes >> 20} of "
        f"{sum(getattr(huge_plan, n).nbytes for n in STREAMED) >> 20} MiB on huge pages; "
        f"KV caches {sum(huge_page_bytes(c) or 0 for c in huge_caches) >> 20} of "
        f"{sum(c.nbytes for c in huge_caches) >> 20} MiB",
        flush=True,
    )
    cases = {
        SMALL: (small_plan, small_caches),
        HUGE_WEIGHTS: (huge_plan, small_caches),
        HUGE_ALL: (huge_plan, huge_caches),
    }

    def step_ms(case: str, position: int, steps: int) -> tuple[float, np.ndarray]:
        plan, (keys, values) = cases[case]
        decoder.plan = plan
        times, logits = [], np.empty(0)
        for i in range(steps):
            start = time.perf_counter()
            logits = decoder.step(
                keys, values, 0, np.full(1, 7), np.full(1, position + i), np.arange(1)
            )
            times.append(time.perf_counter() - start)
        return float(np.median(times[2:])) * 1e3 if steps > 2 else 0.0, logits

    reference = step_ms(SMALL, args.context, 1)[1]
    differences = {
        c: float(np.abs(step_ms(c, args.context, 1)[1] - reference).max()) for c in cases
    }
    print(
        "max |logit difference| to 4 KiB pages: "
        + ", ".join(f"{c} {d:.1e}" for c, d in differences.items())
    )

    rows = []
    order = list(cases)
    for rep in range(args.reps):
        before, bandwidth = core_handoff_ns(), read_bandwidth()
        times = {
            c: step_ms(c, args.context, args.steps)[0]
            for c in (order if rep % 2 == 0 else order[::-1])
        }
        handoff = [before, core_handoff_ns()]
        rows.append({"step_ms": times, "core_handoff_ns": handoff, "read_bytes_per_s": bandwidth})
        print(
            f"rep {rep + 1}: "
            + ", ".join(f"{c} {times[c]:.2f} ms" for c in cases)
            + f", read {bandwidth / 1e9:.1f} GB/s, placement {placement(handoff) or 'moved'}",
            flush=True,
        )

    summary: dict[str, dict[str, dict[str, float]]] = {}
    for label in PLACEMENTS.values():
        held = [r for r in rows if placement(r["core_handoff_ns"]) == label]
        if not held:
            continue
        print(
            f"\n{label}: {len(held)} repetitions; medians; ratios to 4 KiB pages in the same repetition"
        )
        summary[label] = {}
        for case in cases:
            ms = float(np.median([r["step_ms"][case] for r in held]))
            ratio = float(np.median([r["step_ms"][case] / r["step_ms"][SMALL] for r in held]))
            summary[label][case] = {"step_ms": ms, "vs_4k_pages": ratio, "repetitions": len(held)}
            print(f"  {case:<14} {ms:7.2f} ms  {ratio:6.3f}x")
    record = {
        "command": " ".join(sys.argv),
        "args": {k: str(v) for k, v in vars(args).items()},
        "max_abs_logit_difference": differences,
        "repetitions": rows,
        "summary": summary,
    }
    print(f"JSON: {save_results(record, None, 'page-sizes')}")


if __name__ == "__main__":
    main()
