"""`scripts/bench --serving`: serving throughput and latency of one engine under three
policies, side by side in one run, on the same requests:

* sequential: one request at a time, in arrival order;
* static batching: whenever the engine is idle, every request that has arrived (up to the
  engine's max_batch) is run as one batch until its last request finishes;
* in-flight batching: every request is submitted on arrival (`await llm.submit`) and joins the
  running batch at the next engine step (runtime/scheduler.py).

Requests come from real text (Python's own docs, `pydoc_data.topics`): each prompt is a random
paragraph (cut to --max-prompt-tokens), its output length the token count of the paragraph that
follows it (clipped to [--min-output-tokens, --max-output-tokens]), greedy with ignore_eos.
Arrivals are a Poisson process of --rate requests per second; the default (32/s) is above what
the engine can serve (~6/s for these lengths on 2 cores), so throughput measures each policy's
capacity rather than the arrival rate (vLLM's serving benchmark defaults to an unbounded rate
for the same reason). At 8/s the in-flight server keeps up with arrivals for most of the run. Reported per policy: output
throughput (generated tokens / makespan), time to first token (from the request's arrival) and
inter-token latency, p50 and p99; plus whether each request's tokens equal the sequential run's.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from enginesmith.scripts.benchmarks.bench import (
    command_line,
    format_table,
    log,
    machine_info,
    pydoc_text,
    save_results,
)

DEFAULT_ENGINE_NAME = "smollm2-135m-serving"


@dataclass
class Workload:
    prompts: list[str]
    output_tokens: list[int]
    arrivals: list[float]  # seconds after the start of the run


def make_workload(
    tokenizer: Any, n: int, rate: float, seed: int, max_prompt: int, min_out: int, max_out: int
) -> Workload:
    """N requests from real paragraphs with Poisson(RATE) arrivals (deterministic per SEED)."""
    rng = np.random.default_rng(seed)
    paragraphs = [p.strip() for p in pydoc_text().split("\n\n") if len(p.strip()) > 40]
    picks = rng.choice(len(paragraphs) - 1, size=n, replace=False)
    prompts, outputs = [], []
    for i in picks:
        ids = tokenizer(paragraphs[i]).input_ids[:max_prompt]
        prompts.append(tokenizer.decode(ids))
        follow = len(tokenizer(paragraphs[i + 1]).input_ids)
        outputs.append(int(np.clip(follow, min_out, max_out)))
    gaps = rng.exponential(1.0 / rate, size=n)
    gaps[0] = 0.0
    return Workload(prompts, outputs, list(np.cumsum(gaps)))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def policy_metrics(outputs: list[Any], arrivals_abs: list[float], start: float) -> dict[str, Any]:
    """Throughput, TTFT and ITL of one policy's outputs (stats.token_times are perf_counter)."""
    ttft = [o.stats.token_times[0] - a for o, a in zip(outputs, arrivals_abs, strict=True)]
    itl = [
        b - a
        for o in outputs
        for a, b in zip(o.stats.token_times, o.stats.token_times[1:], strict=False)
    ]
    end = max(o.stats.token_times[-1] for o in outputs)
    generated = sum(len(o.token_ids) for o in outputs)
    return {
        "generated_tokens": generated,
        "makespan_s": end - start,
        "throughput_tokens_per_s": generated / (end - start),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50),
        "itl_p99_s": percentile(itl, 99),
    }


def _wait_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def run_sequential(
    llm: Any, w: Workload, params: list[Any]
) -> tuple[list[Any], list[float], float]:
    start = time.perf_counter()
    arrivals = [start + a for a in w.arrivals]
    outs = []
    for prompt, p, arrival in zip(w.prompts, params, arrivals, strict=True):
        _wait_until(arrival)
        outs.append(llm.generate(prompt, p)[0])
    return outs, arrivals, start


def run_static(llm: Any, w: Workload, params: list[Any]) -> tuple[list[Any], list[float], float]:
    start = time.perf_counter()
    arrivals = [start + a for a in w.arrivals]
    outs: list[Any] = [None] * len(w.prompts)
    next_i = 0
    while next_i < len(w.prompts):
        _wait_until(arrivals[next_i])  # idle until at least one request is there
        now = time.perf_counter()
        batch = [i for i in range(next_i, len(w.prompts)) if arrivals[i] <= now][
            : llm.executor.max_batch
        ]
        results = llm.generate([w.prompts[i] for i in batch], [params[i] for i in batch])
        for i, out in zip(batch, results, strict=True):
            outs[i] = out
        next_i = batch[-1] + 1
    return outs, arrivals, start


def run_inflight(llm: Any, w: Workload, params: list[Any]) -> tuple[list[Any], list[float], float]:
    async def serve() -> tuple[list[Any], list[float], float]:
        start = time.perf_counter()
        arrivals = [start + a for a in w.arrivals]

        async def one(i: int) -> Any:
            await asyncio.sleep(max(0.0, arrivals[i] - time.perf_counter()))
            return await llm.submit(w.prompts[i], params[i])

        outs = await asyncio.gather(*(one(i) for i in range(len(w.prompts))))
        return list(outs), arrivals, start

    try:
        return asyncio.run(serve())
    finally:
        llm.close()


def default_engine_dir() -> Path:
    from enginesmith.compiler.presets import cache_dir

    return cache_dir() / "engines" / DEFAULT_ENGINE_NAME


def ensure_engine(engine_dir: Path, max_batch: int, check_stale: bool = True) -> Path:
    from enginesmith.compiler.config import BuildConfig
    from enginesmith.scripts.benchmarks.bench import cached_engine

    config = BuildConfig(
        model="smollm2-135m",
        output=engine_dir,
        max_batch=max_batch,
        max_seq_len=1024,
        max_num_tokens=256,
    )
    return cached_engine(config, check_stale=check_stale)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/bench --serving",
        description="Serving benchmark: sequential vs static batching vs in-flight batching, in one run.",
    )
    p.add_argument(
        "--engine",
        type=Path,
        default=None,
        help=f"engine directory (default: built once into the cache as {DEFAULT_ENGINE_NAME}, max batch 16)",
    )
    p.add_argument("--requests", type=int, default=64, help="number of requests (default: 64)")
    p.add_argument(
        "--rate",
        type=float,
        default=32.0,
        help="Poisson arrival rate, requests per second (default: 32, above the engine's capacity)",
    )
    p.add_argument(
        "--inflight-spin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let ORT worker threads spin in the in-flight (asyncio) server (default: yes; "
        "--no-inflight-spin helps on a busy machine)",
    )
    p.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=256,
        help="prompt length cap in tokens (default: 256)",
    )
    p.add_argument(
        "--min-output-tokens", type=int, default=16, help="shortest output (default: 16)"
    )
    p.add_argument(
        "--max-output-tokens", type=int, default=256, help="longest output (default: 256)"
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=16,
        help="slots of the engine built when --engine is not given",
    )
    p.add_argument(
        "--policies",
        default="inflight,static,sequential",
        help="comma-separated subset of inflight,static,sequential (default: all three)",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write the JSON (default: the cache's bench/ folder)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from enginesmith import LLM, SamplingParams

    engine = ensure_engine(
        args.engine or default_engine_dir(), args.max_batch, check_stale=args.engine is None
    )
    llm = LLM(engine)  # synchronous policies: spinning ORT workers are fastest
    # The asyncio server shares the CPU with its event-loop thread (see LLM's spin_wait).
    async_llm = LLM(engine, spin_wait=args.inflight_spin) if "inflight" in args.policies else llm
    w = make_workload(
        llm.tokenizer,
        args.requests,
        args.rate,
        args.seed,
        args.max_prompt_tokens,
        args.min_output_tokens,
        args.max_output_tokens,
    )
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in w.output_tokens]
    prompt_lens = [len(llm.tokenizer(p).input_ids) for p in w.prompts]
    log(
        f"{len(w.prompts)} requests, prompts {min(prompt_lens)}-{max(prompt_lens)} tokens "
        f"(mean {np.mean(prompt_lens):.0f}), outputs {min(w.output_tokens)}-{max(w.output_tokens)} "
        f"(mean {np.mean(w.output_tokens):.0f}), arrivals over {w.arrivals[-1]:.1f} s"
    )
    runners = {"inflight": run_inflight, "static": run_static, "sequential": run_sequential}
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    results: dict[str, Any] = {}
    tokens: dict[str, list[list[int]]] = {}
    for name in policies:
        log(f"running {name} ...")
        outs, arrivals, start = runners[name](async_llm if name == "inflight" else llm, w, params)
        results[name] = policy_metrics(outs, arrivals, start)
        tokens[name] = [o.token_ids for o in outs]
        log(f"  {name}: {results[name]['throughput_tokens_per_s']:.1f} output tok/s")
    reference = "sequential" if "sequential" in tokens else policies[0]
    for name in policies:
        same = sum(a == b for a, b in zip(tokens[name], tokens[reference], strict=True))
        results[name]["identical_to_" + reference] = f"{same}/{len(w.prompts)}"
    base = results.get("sequential", {}).get("throughput_tokens_per_s")
    static = results.get("static", {}).get("throughput_tokens_per_s")
    rows = []
    for name in policies:
        r = results[name]
        rows.append(
            [
                name,
                f"{r['throughput_tokens_per_s']:.1f}",
                f"{r['throughput_tokens_per_s'] / base:.2f}x" if base else "-",
                f"{r['throughput_tokens_per_s'] / static:.2f}x" if static else "-",
                f"{r['ttft_p50_s'] * 1000:.0f} / {r['ttft_p99_s'] * 1000:.0f}",
                f"{r['itl_p50_s'] * 1000:.1f} / {r['itl_p99_s'] * 1000:.1f}",
                r["identical_to_" + reference],
            ]
        )
    header = (
        f"engine {engine} (max batch {llm.executor.max_batch}, {llm.manifest.get('max_num_tokens')} tokens/step)\n"
        f"{len(w.prompts)} requests, Poisson {args.rate}/s, prompts mean {np.mean(prompt_lens):.0f} tokens, "
        f"outputs mean {np.mean(w.output_tokens):.0f} tokens (greedy)\n"
    )
    table = format_table(
        [
            "policy",
            "output tok/s",
            "vs sequential",
            "vs static",
            "TTFT p50 / p99 ms",
            "ITL p50 / p99 ms",
            f"same tokens as {reference}",
        ],
        rows,
    )
    print(header + "\n" + table)
    result = {
        "command": command_line(),
        "machine": machine_info(),
        "engine": str(engine),
        "workload": {
            "requests": len(w.prompts),
            "rate": args.rate,
            "seed": args.seed,
            "prompt_tokens": prompt_lens,
            "output_tokens": w.output_tokens,
            "arrivals": w.arrivals,
        },
        "results": results,
    }
    path = save_results(result, args.json, "serving")
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
