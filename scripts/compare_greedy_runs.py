"""Batch-1 greedy decode with greedy runs (several decode steps per kernel call, the runtime's
default) against one kernel call per token, in one process, taking turns.

    .venv/bin/python scripts/compare_greedy_runs.py [ENGINE_DIR] [--reps 10] [--tokens 256]
        [--prompt-tokens 512] [--run-steps 8]

Each repetition decodes TOKENS greedy tokens after the bench's real-text prompt of
PROMPT_TOKENS tokens (runtime/bench.py) twice on the same LLM: with `greedy_run` = RUN_STEPS
and with 1 (order reversed every other repetition). It reports the bench's decode rate
(first to last token on the caller's clock, sampling and detokenizing included), the engine's
decode call time per token and the host's time per token between calls, and checks that both
make the same tokens. The core handoff (runtime/core_handoff.py) is sampled before and after
each repetition and the summary is given per core placement: the host's two bandwidth levels
are the two placements. Writes JSON into the cache's bench/ folder.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from enginesmith import LLM, SamplingParams
from enginesmith.runtime.bench import (
    default_engine_dir,
    real_text_prompt,
    run_record,
    save_results,
)
from enginesmith.runtime.core_handoff import by_placement, core_handoff_ns

RUNS, SINGLE = "greedy runs", "a call per token"


def decode(llm: LLM, prompt: str, tokens: int, run_steps: int) -> dict[str, Any]:
    """One greedy decode with llm.core.greedy_run = RUN_STEPS: rates and token ids."""
    llm.core.greedy_run = run_steps
    (out,) = llm.generate(prompt, SamplingParams(max_tokens=tokens, ignore_eos=True))
    s = out.stats
    wall = s.total_s - s.time_to_first_token_s
    per_token_ms = wall / (s.generated_tokens - 1) * 1e3
    engine_ms = s.decode_engine_s / len(s.decode_call_s) * 1e3
    return {
        "tokens_per_s": 1e3 / per_token_ms,
        "ms_per_token": per_token_ms,
        "engine_ms_per_token": engine_ms,
        "host_ms_per_token": per_token_ms - engine_ms,
        "token_ids": list(out.token_ids),
    }


def summary_lines(reps: list[dict[str, Any]]) -> list[str]:
    lines = []
    for name in (SINGLE, RUNS):
        rate = statistics.median(r[name]["tokens_per_s"] for r in reps)
        engine = statistics.median(r[name]["engine_ms_per_token"] for r in reps)
        host = statistics.median(r[name]["host_ms_per_token"] for r in reps)
        ratio = statistics.median(r[name]["tokens_per_s"] / r[SINGLE]["tokens_per_s"] for r in reps)
        lines.append(
            f"  {name:<17} {rate:6.1f} tok/s  {ratio:.3f}x   engine calls {engine:.3f} ms/token, "
            f"host between calls {host:.3f} ms/token"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "engine", type=Path, nargs="?", default=None,
        help="onnxruntime engine directory (fp32; default: the bench's SmolLM2 engine)",
    )  # fmt: skip
    p.add_argument("--reps", type=int, default=10, help="repetitions, each decoding both ways")
    p.add_argument("--tokens", type=int, default=256, help="greedy tokens per decode")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length in tokens")
    p.add_argument("--run-steps", type=int, default=8, help="decode steps per greedy run")
    args = p.parse_args()
    if args.reps < 1 or args.tokens < 2 or args.prompt_tokens < 1 or args.run_steps < 2:
        p.error("--reps and --prompt-tokens must be >= 1, --tokens and --run-steps >= 2")
    engine = args.engine or default_engine_dir()
    if not engine.exists():
        raise SystemExit(f"{engine} does not exist: run scripts/bench once to build it")

    llm = LLM(engine, verify_files=False, decode_kernels=True)
    if llm.session.decoder is None:
        raise SystemExit(f"no decode kernels for this engine: {llm.session.decoder_unavailable}")
    tok = llm.tokenizer
    prompt, _ = real_text_prompt(
        lambda s: tok(s).input_ids, lambda ids: str(tok.decode(ids)), args.prompt_tokens
    )
    for steps in (args.run_steps, 1):  # warm-up
        decode(llm, prompt, 16, steps)
    reps: list[dict[str, Any]] = []
    for i in range(args.reps):
        before = core_handoff_ns()
        order = [(RUNS, args.run_steps), (SINGLE, 1)]
        rep: dict[str, Any] = dict(
            (name, decode(llm, prompt, args.tokens, steps))
            for name, steps in (order if i % 2 == 0 else order[::-1])
        )
        after = core_handoff_ns()
        rep["handoff_ns"] = [before, after]
        same = rep[RUNS]["token_ids"] == rep[SINGLE]["token_ids"]
        rep["same_tokens"] = same
        reps.append(rep)
        print(
            f"rep {i + 1}: greedy runs {rep[RUNS]['tokens_per_s']:.1f} tok/s, a call per token "
            f"{rep[SINGLE]['tokens_per_s']:.1f} tok/s, same tokens: {same}, "
            f"core handoff {before or 0:.0f}-{after or 0:.0f} ns",
            flush=True,
        )
        time.sleep(0.5)

    print(
        f"\nall repetitions ({len(reps)}): medians; ratios to a call per token in the same repetition"
    )
    print("\n".join(summary_lines(reps)))
    for where, indices in by_placement([r["handoff_ns"] for r in reps]).items():
        held = [reps[i] for i in indices]
        if held:
            print(f"\n{where}: {len(held)} repetitions")
            print("\n".join(summary_lines(held)))
    for r in reps:
        for name in (RUNS, SINGLE):
            del r[name]["token_ids"]
    result = run_record(
        args,
        engine_dir=str(engine),
        all_tokens_equal=all(r["same_tokens"] for r in reps),
        repetitions=reps,
    )
    print(f"JSON: {save_results(result, None, 'greedy-runs')}")


if __name__ == "__main__":
    main()
