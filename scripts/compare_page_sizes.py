"""Decode-step time with the weights and KV caches on 2 MiB pages (what the runtime allocates,
runtime/huge_pages.py) against copies of them on 4 KiB pages, in one process, taking turns.

    .venv/bin/python scripts/compare_page_sizes.py ENGINE_DIR [--context 640] [--steps 40]
        [--reps 10]

Three cases per repetition (order reversed every other one), each the median of STEPS 1-row
steps after CONTEXT cached tokens (random cache contents, the same in every case):
"4 KiB pages" (weights and caches copied into mappings madvised MADV_NOHUGEPAGE),
"2 MiB weights" (the runtime's weights, 4 KiB caches) and "2 MiB all" (the runtime's weights
and caches). First it prints how much of the runtime's arrays, and of a 64 MiB numpy array
(how the runtime allocated them before), the kernel backed with huge pages, and compares the
three cases' logits. The core handoff (runtime/core_handoff.py) is sampled before and after
each repetition and the summary is given per core placement: the host's two bandwidth levels
are the two placements. Writes JSON into the cache's bench/ folder.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
from compare_decode_kernels import (  # neighbours in scripts/
    add_step_ab_arguments,
    check_step_ab_arguments,
    kernel_session,
    step_ms,
)

from enginesmith.runtime.bench import read_bandwidth, run_record, save_results
from enginesmith.runtime.core_handoff import by_placement, core_handoff_ns, placement
from enginesmith.runtime.huge_pages import huge_page_bytes, small_page_empty

STREAMED = ("lm_head", "w_qkv", "w_o", "w_gate_up", "w_down")
SMALL, HUGE_WEIGHTS, HUGE_ALL = "4 KiB pages", "2 MiB weights", "2 MiB all"


def small_page_copy(array: np.ndarray) -> np.ndarray:
    """A copy of ARRAY on 4 KiB pages (huge_pages.small_page_empty)."""
    out = small_page_empty(array.shape)
    out[...] = array
    return out


NUMPY_PROBE_BYTES = 64 << 20  # small: freeing much memory stalls the next steps on this VM


def numpy_huge_bytes(nbytes: int = NUMPY_PROBE_BYTES) -> int:
    """Bytes of a written numpy array of NBYTES that the kernel backed with huge pages."""
    array = np.empty(nbytes // 4, np.float32)
    array.fill(1.0)
    return huge_page_bytes(array) or 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_step_ab_arguments(p, reps=10, each="case")
    args = p.parse_args()
    check_step_ab_arguments(p, args)

    session, decoder = kernel_session(args.engine)
    huge_plan = decoder.plan
    small = {name: small_page_copy(getattr(huge_plan, name)) for name in STREAMED}
    tied = huge_plan.embed is huge_plan.lm_head
    small_plan = dataclasses.replace(
        huge_plan, **small, embed=small["lm_head"] if tied else huge_plan.embed
    )
    huge_caches = (session.cache_key_all, session.cache_value_all)
    small_caches = tuple(small_page_copy(c) for c in huge_caches)
    streamed = sum(getattr(huge_plan, n).nbytes for n in STREAMED)
    pages = {
        "runtime_weights": sum(huge_page_bytes(getattr(huge_plan, n)) or 0 for n in STREAMED),
        "runtime_kv_caches": sum(huge_page_bytes(c) or 0 for c in huge_caches),
        "numpy_array_64_mib": numpy_huge_bytes(),
    }
    print(
        f"on huge pages: runtime's weights {pages['runtime_weights'] >> 20} of {streamed >> 20} "
        f"MiB; KV caches {pages['runtime_kv_caches'] >> 20} of "
        f"{sum(c.nbytes for c in huge_caches) >> 20} MiB; a 64 MiB numpy array "
        f"{pages['numpy_array_64_mib'] >> 20} MiB",
        flush=True,
    )
    cases = {
        SMALL: (small_plan, small_caches),
        HUGE_WEIGHTS: (huge_plan, small_caches),
        HUGE_ALL: (huge_plan, huge_caches),
    }

    def run(case: str) -> Callable[[int, int], np.ndarray]:
        plan, (keys, values) = cases[case]

        def step(rows: int, position: int) -> np.ndarray:
            decoder.plan = plan
            return decoder.step(
                keys, values, 0, np.full(rows, 7), np.full(rows, position), np.arange(rows)
            )

        return step

    reference = run(SMALL)(1, args.context)
    differences = {c: float(np.abs(run(c)(1, args.context) - reference).max()) for c in cases}
    print(
        "max |logit difference| to 4 KiB pages: "
        + ", ".join(f"{c} {d:.1e}" for c, d in differences.items())
    )

    rows: list[dict[str, Any]] = []
    order = list(cases)
    for rep in range(args.reps):
        before, bandwidth = core_handoff_ns(), read_bandwidth()
        times = {
            c: step_ms(run(c), args.context, args.steps, 1)
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
    for label, indices in by_placement([r["core_handoff_ns"] for r in rows]).items():
        held = [rows[i] for i in indices]
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
    record = run_record(
        args,
        huge_page_bytes=pages,
        max_abs_logit_difference=differences,
        repetitions=rows,
        summary=summary,
    )
    print(f"JSON: {save_results(record, None, 'page-sizes')}")


if __name__ == "__main__":
    main()
