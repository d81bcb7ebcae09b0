"""`scripts/bench-spec`: speculative decoding on the SmolLM2 fp32 engine, peers side by side.

One process measures, on the same machine, prompts and token ids:

* v(K): the time of a step whose B rows carry K + 1 tokens each (logits at every position)
  over a step of B one-token rows, K = 1..7, B = 1, 2, 4, 8, at --context cached tokens (the
  draft-length policy of every row below is given the step-cost ratio fitted per batch);
* batch 1, two real-text workloads (chat template): input-grounded (rewrite or summarize a
  pydoc passage) and free generation (questions); --max-tokens new tokens per prompt, EOS
  ignored; rows: target-only and each draft source (ngram, suffix, self:int8, self:int4,
  the hybrid ngram+self:int4); tok/s from the first to the last generated token summed over prompts,
  speedup over target-only, acceptance, mean K, and the formula's prediction
  (1 - a^(K+1)) / ((1 - a)(cK + v(K))); greedy outputs are checked equal to target-only;
* peers on the same token ids (greedy): llama.cpp on the Q4_1 GGUF, plain and with prompt
  lookup (LlamaPromptLookupDecoding, num_pred_tokens 2 and 10), transformers plain and with
  prompt_lookup_num_tokens; each peer's speedup over its own plain decode;
* batch 4 and 8 under in-flight batching, with and without speculation: --waves x B requests
  (the prompts in turn), B at a time, each finished request's place taken by the next (a
  server's steady state: with a fixed set of B, speculation would finish some requests early and
  leave the batch to shrink); generated tokens / wall time (prefill included);
* greedy and --temperature (0.8) for our rows.

The table goes to stdout, progress to stderr, everything to <cache>/bench/spec-*.json.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from enginesmith.runtime.proposers import uses_model_draft
from enginesmith.runtime.spec_policy import DEFAULT_MAX_DRAFT_LEN
from enginesmith.scripts.benchmarks.bench import (
    bench_main,
    format_table,
    machine_info,
    package_version,
    pydoc_text,
    run_record,
)

SOURCES = ("ngram", "suffix", "self:int8", "self:int4", "ngram+self:int4")
QUESTIONS = (
    "Explain how a hash table works and when it is slow.",
    "What were the main causes of the French Revolution?",
    "Write a short story about a robot who learns to paint.",
    "How does the immune system fight a virus?",
    # the in-flight runs take the rest too: every request there has a prompt of its own
    "Describe how a bicycle gear system works.",
    "What makes a good password, and why?",
    "Explain the water cycle to a ten-year-old.",
    "Why do leaves change colour in autumn?",
    "How do vaccines get tested before approval?",
    "Write a short poem about a lighthouse keeper.",
    "What is the difference between weather and climate?",
    "How does a compiler turn source code into a program?",
)
GROUNDED_TASKS = (
    "Rewrite the following passage in plain words, keeping every fact and example:",
    "Correct any spelling or grammar mistakes in the following passage and return the full "
    "corrected passage:",
    "Summarize the following passage, quoting its key terms exactly:",
)
PASSAGE_TOPICS = ("assert", "for", "with", "import")
PASSAGE_CHARS = 900


def log(msg: str) -> None:
    print(f"[bench-spec] {msg}", file=sys.stderr, flush=True)


# --- prompts --------------------------------------------------------------------------------------


def workloads(n: int, distinct: bool = False) -> dict[str, list[list[dict[str, str]]]]:
    """Chat messages of N prompts per workload. DISTINCT: no two alike (passages beyond
    PASSAGE_TOPICS, every question), for the in-flight runs, where a repeated greedy prompt
    repeats its output and a source that learns from other requests (suffix) would copy it."""
    from pydoc_data.topics import topics

    names = list(PASSAGE_TOPICS)
    if distinct:
        names += [t for t in sorted(topics) if len(topics[t]) >= PASSAGE_CHARS and t not in names]
        if n > min(len(names), len(QUESTIONS)):
            raise ValueError(f"at most {len(QUESTIONS)} distinct prompts per workload (got {n})")
    grounded = []
    for i in range(n):
        passage = topics[names[i % len(names)]][:PASSAGE_CHARS]
        task = GROUNDED_TASKS[i % len(GROUNDED_TASKS)]
        grounded.append([{"role": "user", "content": f"{task}\n\n{passage.strip()}"}])
    free = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]
    assert pydoc_text()  # the passages come from the same shipped text as the other benches
    return {"grounded": grounded, "free": free}


# --- v(K) -----------------------------------------------------------------------------------------


def verify_cost_table(
    executor: Any, batches: list[int], max_k: int, context: int, reps: int
) -> dict[str, Any]:
    """Median step time of B rows x (K + 1) tokens at CONTEXT cached tokens, and v(K, B)."""
    times: dict[str, dict[str, float]] = {}
    for b in batches:
        samples: dict[int, list[float]] = {k: [] for k in range(max_k + 1)}
        # Every K once per round, rounds repeated: host noise drifts over seconds, so the
        # shapes are interleaved rather than timed one after the other.
        for rep in range(reps + 1):
            for k in range(max_k + 1):
                s = k + 1
                ids = np.full((b, s), 42, np.int64)
                pos = np.tile(np.arange(context, context + s), (b, 1))
                seqk = np.full(b, context + s - 1, np.int32)
                q = np.full(b, s, np.int32)
                wanted = np.arange(b * s, dtype=np.int64)
                t0 = time.perf_counter()
                executor.step(0, ids, pos, seqk, q, wanted)
                if rep:  # the first round warms each shape up
                    samples[k].append(time.perf_counter() - t0)
        times[str(b)] = {str(k): statistics.median(v) for k, v in samples.items()}
    v = {b: {k: t / row["0"] for k, t in row.items()} for b, row in times.items()}
    return {"context": context, "step_s": times, "v": v, "token_cost_ratio": fit_ratio(v)}


def fit_ratio(v: dict[str, dict[str, float]]) -> dict[str, float]:
    """r per batch B in v(K, B) = (1 + rB(K+1)) / (1 + rB), least squares over K."""
    out = {}
    for b, row in v.items():
        bb = int(b)
        # v(1 + rB) = 1 + rB(K+1)  ->  rB (K + 1 - v) = v - 1
        xs = np.array([int(k) + 1 - x for k, x in row.items() if k != "0"])
        ys = np.array([x - 1 for k, x in row.items() if k != "0"])
        out[b] = float((xs @ ys) / (xs @ xs) / bb) if (xs @ xs) > 0 else 0.0
    return out


def measured_ratios(policy: Any, vk: dict[str, Any]) -> None:
    """Give POLICY (a DraftLengthPolicy) this run's step-cost ratios, one per measured batch."""
    ratios = {int(b): max(r, 0.0) for b, r in vk["token_cost_ratio"].items()}
    policy.token_cost_ratio = ratios[min(ratios)]
    policy.ratio_by_batch = ratios


def v_at(table: dict[str, Any], k: float, batch: int = 1) -> float:
    row = table["v"][str(batch)]
    ks = sorted(int(x) for x in row)
    return float(np.interp(k, ks, [row[str(x)] for x in ks]))


def predicted_speedup(a: float, k: float, c: float, v: float) -> float | None:
    if k <= 0:
        return None
    a = min(a, 0.999)
    return (1 - a ** (k + 1)) / ((1 - a) * (c * k + v))


# --- ours -----------------------------------------------------------------------------------------


def run_ours(llm: Any, prompts: list[str], params: Any) -> tuple[list[Any], float]:
    """Outputs and wall seconds, one request at a time (batch 1)."""
    t0 = time.perf_counter()
    outs = [llm.generate(p, params)[0] for p in prompts]
    return outs, time.perf_counter() - t0


def run_closed_loop(
    llm: Any, prompts: list[str], params: Any, concurrency: int, total: int
) -> tuple[list[Any], float]:
    """TOTAL requests (PROMPTS in turn), CONCURRENCY at a time, a finished request's place
    taken by the next before the following step; outputs and wall seconds."""
    requests = [llm.new_request(prompts[i % len(prompts)], params) for i in range(total)]
    pending, active = list(requests), list[Any]()
    t0 = time.perf_counter()
    while pending or active:
        while pending and len(active) < concurrency:
            active.append(pending.pop(0))
            llm.core.add(active[-1])
        llm.core.step()
        active = [r for r in active if r.finish_reason is None]
    wall = time.perf_counter() - t0
    return [r.output() for r in requests], wall


def decode_rate(outs: list[Any]) -> float:
    """Tokens after the first per second from the first to the last, summed over requests."""
    tokens = sum(o.stats.generated_tokens - 1 for o in outs)
    seconds = sum(o.stats.decode_s for o in outs)
    return tokens / seconds if seconds else 0.0


def spec_summary(outs: list[Any]) -> dict[str, float]:
    from enginesmith.runtime.speculation import SpecStats

    total = SpecStats()
    for o in outs:
        total.add(o.stats.spec)
    return total.as_dict()


# --- peers ----------------------------------------------------------------------------------------


def llama_peer(gguf: Path, ids_list: list[list[int]], tokens: int, threads: int) -> dict[str, Any]:
    from enginesmith.scripts.benchmarks.bench_quant import llama_decode, llama_open

    try:
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (scripts/bench-quant installs it)"}
    out: dict[str, Any] = {"version": package_version("llama-cpp-python")}
    for name, k in (("plain", 0), ("prompt lookup 2", 2), ("prompt lookup 10", 10)):
        n_ctx = max(len(i) for i in ids_list) + tokens + 16
        if k:
            llama = llama_cpp.Llama(
                model_path=str(gguf),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
                draft_model=LlamaPromptLookupDecoding(num_pred_tokens=k),
            )
        else:
            llama = llama_open(gguf, n_ctx=n_ctx, threads=threads, logits_all=False)
        rates = {}
        for workload, ids in _by_workload(ids_list):
            runs = [llama_decode(llama, i, tokens) for i in ids]
            steps = sum(r["generated_tokens"] - 1 for r in runs)
            wall = sum((r["generated_tokens"] - 1) / r["wall_tokens_per_s"] for r in runs)
            rates[workload] = steps / wall
        out[name] = rates
        llama.close()
        log(f"llama.cpp {name}: {rates}")
    return out


_WORKLOAD_SPLIT: dict[str, int] = {}


def _by_workload(ids_list: list[list[int]]) -> list[tuple[str, list[list[int]]]]:
    n = _WORKLOAD_SPLIT["grounded"]
    return [("grounded", ids_list[:n]), ("free", ids_list[n:])]


def transformers_peer(
    ids_list: list[list[int]], tokens: int, threads: int, lookup: int
) -> dict[str, Any]:
    import torch

    from enginesmith.compiler.sources import load_model

    torch.set_num_threads(threads)
    loaded = load_model("smollm2-135m")
    model = loaded.model
    out: dict[str, Any] = {"version": package_version("transformers")}
    for name, extra in (
        ("plain", {}),
        (f"prompt lookup {lookup}", {"prompt_lookup_num_tokens": lookup}),
    ):
        rates = {}
        for workload, ids in _by_workload(ids_list):
            steps, wall = 0, 0.0
            for i in ids:
                input_ids = torch.tensor([i])
                t0 = time.perf_counter()
                with torch.no_grad():
                    gen = model.generate(
                        input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        do_sample=False,
                        max_new_tokens=tokens,
                        min_new_tokens=tokens,
                        pad_token_id=loaded.tokenizer.eos_token_id,
                        **extra,
                    )
                wall += time.perf_counter() - t0
                steps += gen.shape[1] - len(i)
            rates[workload] = steps / wall
        out[name] = rates
        log(f"transformers {name}: {rates}")
    del model, loaded
    gc.collect()
    return out


# --- the run --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench-spec", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--engine-dir", type=Path, default=None, help="default: built into the cache")
    p.add_argument("--max-tokens", type=int, default=160, help="new tokens per prompt")
    p.add_argument("--prompts", type=int, default=3, help="prompts per workload")
    p.add_argument(
        "--max-draft-len",
        type=int,
        default=None,
        help=f"K cap of every source (default: the runtime's, {DEFAULT_MAX_DRAFT_LEN})",
    )
    p.add_argument("--temperature", type=float, default=0.8, help="the sampled rows' T")
    p.add_argument("--batches", default="4,8", help="in-flight batch sizes")
    p.add_argument("--waves", type=int, default=3, help="in-flight requests per slot (default 3)")
    p.add_argument("--context", type=int, default=256, help="cached tokens for v(K)")
    p.add_argument("--vk-reps", type=int, default=15, help="timed rounds of the v(K) table")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sources", default=",".join(SOURCES), help="draft sources, comma-separated")
    p.add_argument("--skip", default="", help="comma-separated: llama.cpp, transformers, sampled")
    p.add_argument("--json", type=Path, default=None)
    return p


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.max_tokens < 8 or args.prompts < 1:
        p.error("--max-tokens >= 8 and --prompts >= 1")
    batches = [int(x) for x in args.batches.split(",") if x.strip()]
    if not batches or min(batches) < 1 or args.waves < 1:
        p.error("--batches: positive sizes, --waves >= 1")
    if args.waves * max(batches) > 2 * len(QUESTIONS):
        p.error(
            f"--waves x the largest batch must be <= {2 * len(QUESTIONS)} "
            "(in flight, every request has a prompt of its own)"
        )


def ensure_engine(path: Path | None, draft: str = "self:int8") -> Path:
    """The fp32 target with DRAFT built into its draft/ (one engine per model draft: the
    target weights are the same, so target-only rows need only the first)."""
    from enginesmith.compiler.config import BuildConfig
    from enginesmith.compiler.presets import cache_dir
    from enginesmith.scripts.benchmarks.bench import cached_engine

    name = "smollm2-135m-spec" + ("" if draft == "self:int8" else "-" + draft.split(":")[1])
    out = path or cache_dir() / "engines" / name
    config = BuildConfig("smollm2-135m", out, max_batch=8, max_seq_len=1024, draft=draft)
    return cached_engine(config)


def engine_for(source: str, engines: dict[str, Path]) -> Path:
    """The engine whose draft/ holds SOURCE's model draft (the self:int8 one otherwise)."""
    for part in source.split("+"):
        if part in engines:
            return engines[part]
    return engines["self:int8"]


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    from enginesmith import LLM, SamplingParams
    from enginesmith.compiler.presets import smollm2_gguf_path

    engine = ensure_engine(args.engine_dir)
    sources = [s for s in args.sources.split(",") if s]
    engines = {"self:int8": engine}
    if args.engine_dir is None and any("self:int4" in s.split("+") for s in sources):
        engines["self:int4"] = ensure_engine(None, "self:int4")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    base = LLM(engine, speculative=False, threads=args.threads)
    log("v(K) table")
    vk = verify_cost_table(base.executor, [1, 2, 4, 8], 7, args.context, reps=args.vk_reps)
    log(f"v(K, 1) = {vk['v']['1']}; r = {vk['token_cost_ratio']}")
    msgs = workloads(args.prompts)
    prompts = {w: [base.chat_prompt(m) for m in ms] for w, ms in msgs.items()}
    _WORKLOAD_SPLIT["grounded"] = len(prompts["grounded"])
    temps = [0.0] + ([] if "sampled" in skip else [args.temperature])
    rows: list[dict[str, Any]] = []
    reference: dict[tuple[str, float], list[list[int]]] = {}

    def params(t: float) -> Any:
        return SamplingParams(max_tokens=args.max_tokens, temperature=t, seed=0, ignore_eos=True)

    def speculating(source: str) -> Any:
        """LLM over SOURCE's engine, its policy given this run's step-cost ratios."""
        llm = LLM(
            engine_for(source, engines),
            draft=source,
            max_draft_len=args.max_draft_len,
            threads=args.threads,
            verify_files=False,
        )
        assert llm.core.speculator is not None
        measured_ratios(llm.core.speculator.policy, vk)
        return llm

    target_rate: dict[tuple[str, float], float] = {}
    for source in [None, *sources]:
        llm = base if source is None else speculating(source)
        c = llm.core.speculator.policy.draft_cost if llm.core.speculator is not None else 0.0
        for t in temps:
            for workload, ps in prompts.items():
                outs, wall = run_ours(llm, ps, params(t))
                rate = decode_rate(outs)
                spec = spec_summary(outs)
                ids = [o.token_ids for o in outs]
                row: dict[str, Any] = {
                    "source": source or "target-only",
                    "temperature": t,
                    "workload": workload,
                    "tokens_per_s": rate,
                    "spec": spec,
                    "draft_cost": c,
                }
                if source is None:
                    reference[(workload, t)] = ids
                    target_rate[(workload, t)] = rate
                else:
                    row["speedup"] = rate / target_rate[(workload, t)]
                    a, k = spec["acceptance_rate"], spec["mean_draft_len"]
                    # a hybrid's drafts come from parts of different c and a: no one formula
                    hybrid = "+" in row["source"]
                    row["predicted"] = None if hybrid else predicted_speedup(a, k, c, v_at(vk, k))
                    if t == 0.0:
                        row["identical_to_target"] = ids == reference[(workload, t)]
                rows.append(row)
                log(
                    f"{row['source']:>18} T={t} {workload:>8}: {rate:6.1f} tok/s "
                    f"a={spec['acceptance_rate']:.2f} K={spec['mean_draft_len']:.2f} "
                    f"{'speedup {:.2f}x'.format(row['speedup']) if 'speedup' in row else ''}"
                )
        if llm is not base:
            del llm
            gc.collect()
    # in-flight batching: the best model-free source and the best one with a model draft
    # (whose steps grow with the batch), where they ran
    best = _best_source(rows) or "ngram"
    picks = [_best_source(rows, model=False), _best_source(rows, model=True)]
    inflight_sources = [s for s in picks if s is not None] or [best]
    batch_rows = []
    per_workload = (args.waves * max(int(x) for x in args.batches.split(",")) + 1) // 2
    wide = {w: [base.chat_prompt(m) for m in ms] for w, ms in workloads(per_workload, True).items()}
    mixed = [p for pair in zip(wide["grounded"], wide["free"], strict=True) for p in pair]
    spec_llms = {s: speculating(s) for s in inflight_sources}
    for b in [int(x) for x in args.batches.split(",")]:
        for t in temps:
            for name, llm in (("target-only", base), *spec_llms.items()):
                outs, wall = run_closed_loop(llm, mixed, params(t), b, args.waves * b)
                tokens = sum(o.stats.generated_tokens for o in outs)
                batch_rows.append(
                    {
                        "batch": b,
                        "temperature": t,
                        "source": name,
                        "tokens_per_s": tokens / wall,
                        "spec": spec_summary(outs) if llm is not base else None,
                    }
                )
                log(f"batch {b} T={t} {name}: {tokens / wall:.1f} tok/s")
    del spec_llms
    gc.collect()
    # peers
    ids_list = [base._encode(p) for p in prompts["grounded"] + prompts["free"]]
    peers: dict[str, Any] = {}
    if "llama.cpp" not in skip:
        peers["llama.cpp"] = llama_peer(
            smollm2_gguf_path(), ids_list, args.max_tokens, args.threads
        )
    if "transformers" not in skip:
        peers["transformers"] = transformers_peer(ids_list, args.max_tokens, args.threads, 10)
    return run_record(
        args,
        machine=machine_info(),
        engine=str(engine.name),
        verify_cost=vk,
        batch1=rows,
        inflight=batch_rows,
        best_source=best,
        peers=peers,
    )


def _best_source(rows: list[dict[str, Any]], model: bool | None = None) -> str | None:
    """The source with the highest mean greedy speedup over both workloads (MODEL True / False:
    among those with / without a model draft; None if there is none)."""
    scores: dict[str, list[float]] = {}
    for r in rows:
        if "speedup" in r and r["temperature"] == 0.0:
            if model is not None and uses_model_draft(r["source"]) != model:
                continue
            scores.setdefault(r["source"], []).append(r["speedup"])
    if not scores:
        return None
    return max(scores, key=lambda s: statistics.mean(scores[s]))


def render(result: dict[str, Any]) -> str:
    vk = result["verify_cost"]
    lines = [f"v(K) = (K+1)-token step / 1-token step, context {vk['context']} tokens"]
    ks = sorted(vk["v"]["1"], key=int)[1:]
    lines.append(
        format_table(
            ["batch", *[f"K={k}" for k in ks], "1-token step"],
            [
                [b, *[f"{vk['v'][b][k]:.2f}" for k in ks], f"{1000 * vk['step_s'][b]['0']:.1f} ms"]
                for b in vk["v"]
            ],
        )
    )
    lines.append("")
    lines.append("batch 1 (tok/s first to last token; speedup over target-only, same run)")
    table = []
    for r in result["batch1"]:
        s = r["spec"]
        table.append(
            [
                f"{r['source']} T={r['temperature']:g}",
                r["workload"],
                f"{r['tokens_per_s']:.1f}",
                f"{r['speedup']:.2f}x" if "speedup" in r else "1.00x",
                f"{s['acceptance_rate']:.2f}" if s["draft_tokens"] else "-",
                f"{s['mean_draft_len']:.2f}" if s["draft_tokens"] else "-",
                f"{r['predicted']:.2f}x" if r.get("predicted") else "-",
                {True: "yes", False: "NO"}.get(r.get("identical_to_target"), "-"),
            ]
        )
    lines.append(
        format_table(
            ["row", "workload", "tok/s", "speedup", "accept", "mean K", "predicted", "= target"],
            table,
        )
    )
    lines.append("")
    lines.append("in-flight batching (generated tokens / wall s; ratio to target-only)")
    plain = {
        (r["batch"], r["temperature"]): r["tokens_per_s"]
        for r in result["inflight"]
        if r["source"] == "target-only"
    }
    lines.append(
        format_table(
            ["batch", "T", "row", "tok/s", "ratio"],
            [
                [
                    str(r["batch"]),
                    f"{r['temperature']:g}",
                    r["source"],
                    f"{r['tokens_per_s']:.1f}",
                    f"{r['tokens_per_s'] / plain[(r['batch'], r['temperature'])]:.2f}x",
                ]
                for r in result["inflight"]
            ],
        )
    )
    for peer, res in result["peers"].items():
        lines.append("")
        if "skipped" in res:
            lines.append(f"{peer}: skipped ({res['skipped']})")
            continue
        basis = "first to last token" if peer == "llama.cpp" else "generate() wall, prefill incl."
        lines.append(f"{peer} {res.get('version')} (greedy, tok/s {basis})")
        names = [n for n in res if n != "version"]
        peer_rows = []
        for n in names:
            for w in ("grounded", "free"):
                plain = res["plain"][w]
                peer_rows.append([n, w, f"{res[n][w]:.1f}", f"{res[n][w] / plain:.2f}x"])
        lines.append(format_table(["row", "workload", "tok/s", "speedup"], peer_rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, build_parser(), _check, run, render, "spec")


if __name__ == "__main__":
    raise SystemExit(main())
