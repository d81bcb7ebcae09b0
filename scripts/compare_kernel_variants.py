"""Decode-step time of the committed kernels (runtime/decode_kernels.py) against edited copies
of that module, in one process, taking turns: the way to tell whether a kernel change is
faster on a host whose memory bandwidth flips between levels from one minute to the next.

    .venv/bin/python scripts/compare_kernel_variants.py ENGINE_DIR VARIANT.py [VARIANT.py ...]
        [--context 640] [--steps 40] [--reps 8]

A VARIANT is a full copy of runtime/decode_kernels.py with a change in it, kept outside the
repository (e.g. /tmp/variants/merge_in_phase.py); its `decode_step` replaces the committed one
in the engine's CompiledDecoder (CompiledDecoder.use_kernels), so it must keep decode_step's
arguments. Each set's thread body is compiled (or loaded) on its own before its decode_step,
as the runtime does for the committed one, so every set runs its standalone body
(docs/benchmarks.md, "Which compiled copy of the step runs").

Each repetition times every kernel set in turn (order reversed every other repetition): the
median of STEPS 1-row steps after CONTEXT cached tokens (random cache contents), and the median
of the weight products alone (decode_step with weights_only, which runs none of the attention
code: a change there that moves it shows the compiler laying out the one big step function
differently). The read bandwidth is sampled before the repetition and after each set's turn;
the summary counts only the repetitions whose samples all lie within 10% of each other (the
host held one level through them) and divides each set's times by the committed kernels' in
the same repetition. The core handoff (runtime/core_handoff.py) is sampled at the same
moments, and the summary is repeated for each core placement that held through a whole
repetition: the two levels are the two placements, and a change can help on one only.

Each variant's logits are compared with the committed kernels' first (the largest difference
is printed): a variant that changes results is measured all the same, but says so.
Writes JSON into the cache's bench/ folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
from compare_decode_kernels import (  # neighbours in scripts/
    add_step_ab_arguments,
    check_step_ab_arguments,
    kernel_session,
    step_ms,
)

from enginesmith.runtime import decode_kernels
from enginesmith.runtime.bench import read_bandwidth, run_record, save_results
from enginesmith.runtime.core_handoff import by_placement, core_handoff_ns

COMMITTED = "committed"
LEVEL_TOLERANCE = 0.10  # bandwidth samples of a repetition this close: the level held


def load_variant(path: Path) -> ModuleType:
    """Import PATH as a module of its own (numba caches its compiled code next to it)."""
    spec = importlib.util.spec_from_file_location(f"kernel_variant_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}: is it a .py copy of runtime/decode_kernels.py?")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if not hasattr(module, "decode_step"):
        raise SystemExit(f"{path} has no decode_step: copy runtime/decode_kernels.py and edit it")
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_step_ab_arguments(p, reps=8, each="kernel set")
    p.add_argument("variants", type=Path, nargs="+", help="edited copies of decode_kernels.py")
    args = p.parse_args()
    check_step_ab_arguments(p, args)
    missing = [str(v) for v in args.variants if not v.is_file()]
    if missing:
        p.error(f"no such variant file: {', '.join(missing)}")

    session, decoder = kernel_session(args.engine)
    kernel_sets = {COMMITTED: decode_kernels} | {v.stem: load_variant(v) for v in args.variants}

    def step(rows: int, position: int) -> np.ndarray:
        keys, values = session.cache_key_all, session.cache_value_all
        return decoder.step(
            keys, values, 0, np.full(rows, 7), np.full(rows, position), np.arange(rows)
        )

    def weights_only(rows: int, position: int) -> None:
        decoder.weight_products_only(rows)

    differences: dict[str, float] = {}
    reference = None
    for name, module in kernel_sets.items():
        decoder.use_kernels(module)
        start = time.perf_counter()
        logits = step(1, args.context)  # compiles, or loads from numba's cache
        print(f"{name}: ready in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        reference = logits if reference is None else reference
        differences[name] = float(np.abs(logits - reference).max())

    samples: dict[str, dict[str, list[float]]] = {
        n: {"step": [], "weights": []} for n in kernel_sets
    }

    bandwidth: list[list[float]] = []  # per repetition: before, then after each set's turn
    handoffs: list[list[float | None]] = []  # the core handoff (ns) at the same moments
    order = list(kernel_sets.items())
    for rep in range(args.reps):
        bandwidth.append([read_bandwidth()])
        handoffs.append([core_handoff_ns()])
        for name, module in order if rep % 2 == 0 else order[::-1]:
            decoder.use_kernels(module)
            samples[name]["step"].append(step_ms(step, args.context, args.steps, 1))
            samples[name]["weights"].append(step_ms(weights_only, 0, args.steps // 2 + 2, 1))
            bandwidth[-1].append(read_bandwidth())
            handoffs[-1].append(core_handoff_ns())
        print(
            f"rep {rep + 1}: "
            + ", ".join(
                f"{n} {s['step'][-1]:.2f} ms (weights {s['weights'][-1]:.2f})"
                for n, s in samples.items()
            )
            + f", read bandwidth {min(bandwidth[-1]) / 1e9:.1f}-{max(bandwidth[-1]) / 1e9:.1f} GB/s"
            + f", core handoff {_span(handoffs[-1])} ns",
            flush=True,
        )

    held = [i for i, bw in enumerate(bandwidth) if max(bw) <= (1 + LEVEL_TOLERANCE) * min(bw)]
    if not held:
        raise SystemExit("the host changed level in every repetition: run again, or more --reps")
    summary = {
        "all placements": _summarize("all placements", samples, differences, bandwidth, held)
    }
    # The two levels are two core placements (runtime/core_handoff.py): each on its own.
    for label, indices in by_placement([handoffs[i] for i in held]).items():
        placed = [held[j] for j in indices]
        if placed:
            summary[label] = _summarize(label, samples, differences, bandwidth, placed)
    record = run_record(
        args,
        samples_ms=samples,
        bandwidth_bytes_per_s=bandwidth,
        core_handoff_ns=handoffs,
        held_repetitions=held,
        summary=summary,
    )
    out = save_results(record, None, "kernel-variants")
    print(f"JSON: {out}")


def _span(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{min(known):.0f}-{max(known):.0f}" if known else "-"


def _summarize(
    label: str,
    samples: dict[str, dict[str, list[float]]],
    differences: dict[str, float],
    bandwidth: list[list[float]],
    reps: list[int],
) -> dict[str, dict[str, float]]:
    """Medians over REPS and ratios to the committed kernels in the same repetition; printed."""
    levels = [float(np.median(bandwidth[i])) / 1e9 for i in reps]
    print(
        f"\n{label}: {len(reps)} of {len(bandwidth)} repetitions ({min(levels):.1f}-"
        f"{max(levels):.1f} GB/s); medians over those; ratios to the committed kernels in the same repetition"
    )
    print(
        f"{'kernels':<28} {'step ms':>8} {'vs committed':>13} {'weights ms':>11} {'vs committed':>13} {'max |logit diff|':>17}"
    )
    summary: dict[str, dict[str, float]] = {}
    for name, s in samples.items():
        row: dict[str, float] = {
            "repetitions": len(reps),
            "max_abs_logit_difference": differences[name],
        }
        for what in ("step", "weights"):
            mine = np.array(s[what])[reps]
            base = np.array(samples[COMMITTED][what])[reps]
            row[f"{what}_ms"] = float(np.median(mine))
            row[f"{what}_vs_committed"] = float(np.median(mine / base))
        summary[name] = row
        print(
            f"{name:<28} {row['step_ms']:8.2f} {row['step_vs_committed']:12.3f}x "
            f"{row['weights_ms']:11.2f} {row['weights_vs_committed']:12.3f}x {differences[name]:17.2e}"
        )
    return summary


if __name__ == "__main__":
    main()
