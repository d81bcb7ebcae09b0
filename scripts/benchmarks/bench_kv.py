"""`scripts/bench-kv`: what collapsing KV heads (--kv-heads) buys and what it costs.

For each model, one run builds the original engine and collapsed engines with contiguous and
similarity grouping, then reports for each:

* KV-cache bytes per token (fp32 cache) and the largest batch of --context-token sequences
  that fits a fixed KV budget (--kv-budget-mib);
* held-out perplexity of the engine vs the fp32 transformers model of the original checkpoint
  on 1024 tokens of the pydoc held-out half (calibration uses the other half), with top-1
  agreement and KL divergence from the original model's next-token distribution (perplexity of
  a random-weight model is noise; KL is not), and the mean K/V reconstruction error on the
  calibration text;
* decode speed at a --context-token context: batch 1, and the largest batch that fits the
  budget. Every row holds the same real-text prompt of (context - decode tokens) tokens
  (prefilled once and copied into every KV slot), then --decode-tokens greedy steps of all rows
  are timed, engine steps only; --runs repetitions after one warm-up, median [min-max].

Models: SmolLM2-135M (3 KV heads -> --kv-heads), and two MHA llamas (16 query heads, 16 KV
heads -> 16 / --mha-factor) with random weights, since no real MHA checkpoint ships offline:
``mha-random`` (plain random init: no head is more alike than another) and ``mha-clustered``
(each layer's 16 K/V heads are noisy copies of 4 random prototypes, scattered by a random
permutation: redundant heads that contiguous groups do not line up with).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from enginesmith.scripts.benchmarks.bench import (
    bench_main,
    command_line,
    format_table,
    machine_info,
)

SMOLLM2 = "smollm2-135m"
MHA_MODELS = ("mha-random", "mha-clustered")
MHA_CONFIG: dict[str, Any] = {
    "vocab_size": 1024,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.05,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
CLUSTERS = 4  # prototypes per layer in mha-clustered
CLUSTER_NOISE = 0.5  # std of each copy's noise, relative to the prototype weights' std
MAX_BATCH_CAP = 64


def log(msg: str) -> None:
    print(f"[bench-kv] {msg}", file=sys.stderr, flush=True)


# --- models -----------------------------------------------------------------------------------------


def write_mha_model(name: str, root: Path) -> Path:
    """The random MHA llama NAME (see the module doc) as a Hugging Face directory, cached."""
    spec = json.dumps([name, MHA_CONFIG, CLUSTERS, CLUSTER_NOISE], sort_keys=True)
    target = root / f"bench-{name}-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from enginesmith.compiler.presets import train_tokenizer

    config = AutoConfig.for_model("llama", **MHA_CONFIG)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if name == "mha-clustered":
        _cluster_heads(model, torch.Generator().manual_seed(1))
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    train_tokenizer(MHA_CONFIG["vocab_size"]).save_pretrained(tmp)
    tmp.rename(target)
    return target


def _cluster_heads(model: Any, gen: Any) -> None:
    """Make each layer's K/V heads noisy copies of CLUSTERS prototypes, in a random order."""
    import torch

    heads = MHA_CONFIG["num_key_value_heads"]
    d = MHA_CONFIG["hidden_size"] // MHA_CONFIG["num_attention_heads"]
    with torch.no_grad():
        for layer in model.model.layers:
            order = torch.randperm(heads, generator=gen)  # head order[i] joins cluster i % CLUSTERS
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                w = proj.weight.view(heads, d, -1)
                prototypes = w[:CLUSTERS].clone()
                std = float(prototypes.std())
                for i, h in enumerate(order.tolist()):
                    noise = torch.randn(prototypes.shape[1:], generator=gen) * std * CLUSTER_NOISE
                    w[h] = prototypes[i % CLUSTERS] + noise


def model_source(name: str, root: Path) -> str:
    return name if name == SMOLLM2 else str(write_mha_model(name, root))


def kv_bytes_per_token(config: dict[str, Any], kv_heads: int) -> int:
    d = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * kv_heads * d * 4


# --- engines ----------------------------------------------------------------------------------------


@dataclass
class Variant:
    model: str
    label: str  # "original" | "kv1 contiguous" ...
    kv_heads: int | None  # None: not collapsed
    grouping: str
    time_decode: bool  # similarity and contiguous engines have the same shapes: time one


def build_variant(
    variant: Variant, source: str, engine_dir: Path, batch: int, context: int, rebuild: bool
) -> dict[str, Any]:
    """Build (or reuse) the engine; return its manifest and build report."""
    from enginesmith.compiler.config import BuildConfig
    from enginesmith.runtime.engine_dir import read_manifest
    from enginesmith.scripts.benchmarks.bench import cached_engine

    log(f"{variant.model} {variant.label}: {engine_dir}")
    config = BuildConfig(
        model=source,
        output=engine_dir,
        max_batch=batch,
        max_seq_len=context,
        kv_heads=variant.kv_heads,
        kv_grouping=variant.grouping,
        kv_recovery_minutes=0,  # pooling alone: scripts/bench-lossy measures the recovery
    )
    cached_engine(config, rebuild=rebuild)
    report = json.loads((engine_dir / "build_report.json").read_text())
    return {"manifest": read_manifest(engine_dir, verify_hashes=False), "report": report}


EVAL_TOKENS = 1024  # held-out tokens for perplexity, top-1 agreement and KL


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def engine_quality(engine_dir: Path, ids: list[int], reference: np.ndarray) -> dict[str, Any]:
    """Perplexity of the engine on IDS and how far its next-token distributions are from the
    original fp32 model's (REFERENCE logits): top-1 agreement and mean KL(original || engine)."""
    from enginesmith.compiler import quality
    from enginesmith.runtime.engine_dir import read_manifest
    from enginesmith.runtime.ort_cpu_executor import OrtCpuExecutor

    session = OrtCpuExecutor(engine_dir, read_manifest(engine_dir, verify_hashes=False))
    ours = quality.engine_logits(session, ids)
    ref_lp, our_lp = log_softmax(reference), log_softmax(ours)
    kl = float((np.exp(ref_lp) * (ref_lp - our_lp)).sum(-1).mean())
    return {
        "tokens": len(ids),
        "perplexity_reference": quality.perplexity(reference, ids),
        "perplexity_engine": quality.perplexity(ours, ids),
        "top1_agreement": float((ours.argmax(-1) == reference.argmax(-1)).mean()),
        "kl_from_reference": kl,
    }


def decode_speed(
    engine_dir: Path, prompt_ids: list[int], batch: int, decode_tokens: int, runs: int
) -> dict[str, Any]:
    """Greedy decode of BATCH rows at a len(prompt_ids)-token context: tokens/s of the timed
    engine steps, per run (the first run is a warm-up)."""
    from enginesmith.runtime.engine_dir import read_manifest
    from enginesmith.runtime.ort_cpu_executor import OrtCpuExecutor

    manifest = read_manifest(engine_dir, verify_hashes=False)
    session = OrtCpuExecutor(engine_dir, manifest)
    session.warmup()
    chunk = 512
    n = len(prompt_ids)
    last = None
    for start in range(0, n, chunk):  # prefill slot 0, chunked like the runtime
        ids = prompt_ids[start : start + chunk]
        k = len(ids)
        last = session.step(
            0,
            np.array([ids], np.int64),
            np.arange(start, start + k, dtype=np.int64)[None],
            np.array([start + k - 1], np.int32),
            np.array([k], np.int32),
            np.array([k - 1], np.int64),
        )
    assert last is not None
    for layer in range(session.num_layers):  # the same prompt in every slot
        session.cache_key[layer][1:batch] = session.cache_key[layer][0]
        session.cache_value[layer][1:batch] = session.cache_value[layer][0]
    first = int(last[0].argmax())
    samples: list[float] = []
    tokens: list[int] = []
    for _run in range(runs + 1):
        current = np.full((batch, 1), first, np.int64)
        generated: list[int] = []
        t0 = time.perf_counter()
        for step in range(decode_tokens):
            pos = n + step  # rerunning from position n overwrites the previous run's tokens
            logits = session.step(
                0,
                current,
                np.full((batch, 1), pos, np.int64),
                np.full(batch, pos, np.int32),
                np.ones(batch, np.int32),
                np.arange(batch, dtype=np.int64),
            )
            current = logits.argmax(-1).astype(np.int64)[:, None]
            generated.append(int(current[0, 0]))
        samples.append(batch * decode_tokens / (time.perf_counter() - t0))
        tokens = generated
    timed = samples[1:]
    return {
        "batch": batch,
        "context_tokens": n + decode_tokens,
        "decode_tokens": decode_tokens,
        "tokens_per_s": {
            "median": statistics.median(timed),
            "min": min(timed),
            "max": max(timed),
            "samples": timed,
        },
        "row0_token_ids": tokens,
    }


def sample_generation(engine_dir: Path, prompt: str, tokens: int) -> dict[str, Any]:
    """One greedy request through the public runtime API (LLM.generate)."""
    from enginesmith.runtime.llm import LLM
    from enginesmith.runtime.sampling import SamplingParams

    llm = LLM(engine_dir)
    out = llm.generate(prompt, SamplingParams(max_tokens=tokens, temperature=0.0))[0]
    return {"prompt": prompt, "text": out.text, "finish_reason": out.finish_reason}


# --- the run ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench-kv",
        description=(
            "Benchmark --kv-heads: KV bytes per token, the largest batch in a fixed KV budget, "
            "held-out perplexity (contiguous vs similarity grouping) and decode speed at a long "
            "context, before and after collapsing. Prints a table and writes a JSON file."
        ),
    )
    p.add_argument(
        "--kv-heads",
        type=int,
        default=1,
        metavar="N",
        help="KV heads of the collapsed SmolLM2-135M engines (it has 3; default: 1)",
    )
    p.add_argument(
        "--mha-factor",
        type=int,
        default=4,
        metavar="F",
        help="the 16-KV-head MHA models are collapsed to 16 / F heads (default: 4)",
    )
    p.add_argument(
        "--models",
        default=",".join((SMOLLM2, *MHA_MODELS)),
        metavar="LIST",
        help=f"comma-separated models to run (default: {SMOLLM2},{','.join(MHA_MODELS)})",
    )
    p.add_argument(
        "--context",
        type=int,
        default=2048,
        metavar="T",
        help="tokens per sequence for the decode timing and the batch budget; engines are "
        "built with --max-seq-len T (default: 2048)",
    )
    p.add_argument(
        "--decode-tokens",
        type=int,
        default=32,
        metavar="N",
        help="greedy decode steps timed at the end of the context (default: 32)",
    )
    p.add_argument(
        "--kv-budget-mib",
        type=float,
        default=512.0,
        metavar="MIB",
        help="fixed KV-cache memory: the largest batch of T-token sequences that fits it is "
        f"reported, built and timed (capped at {MAX_BATCH_CAP}; default: 512)",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=3,
        metavar="N",
        help="timed repetitions of each decode measurement after one warm-up (default: 3)",
    )
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="rebuild engines even if they exist under <cache>/engines/bench-kv",
    )
    p.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="where to write the results (default: <cache>/bench/kv-<timestamp>.json)",
    )
    return p


def variants_for(model: str, kv_heads: int, factor: int) -> list[Variant]:
    target = kv_heads if model == SMOLLM2 else MHA_CONFIG["num_key_value_heads"] // factor
    return [
        Variant(model, "original", None, "contiguous", True),
        Variant(model, f"kv{target} contiguous", target, "contiguous", True),
        # Same shapes as the contiguous engine (only the pooled weights differ): not timed.
        Variant(model, f"kv{target} similarity", target, "similarity", False),
    ]


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    from enginesmith.compiler import quality
    from enginesmith.compiler.presets import cache_dir
    from enginesmith.compiler.sources import load_model

    engines_root = cache_dir() / "engines" / "bench-kv"
    models_root = cache_dir() / "presets"
    models_root.mkdir(parents=True, exist_ok=True)
    budget = int(args.kv_budget_mib * 2**20)
    results: list[dict[str, Any]] = []
    for model in args.models.split(","):
        source = model_source(model, models_root)
        loaded = load_model(source)
        config = loaded.config.to_dict()
        kv_before = config.get("num_key_value_heads") or config["num_attention_heads"]
        heldout = loaded.tokenizer(quality.heldout_text()).input_ids
        prompt_ids = heldout[: args.context - args.decode_tokens]
        eval_ids = heldout[: min(EVAL_TOKENS, args.context)]
        log(f"reference logits of the fp32 {model} on {len(eval_ids)} held-out tokens")
        reference = quality.reference_logits_chunked(loaded.model, eval_ids)
        del loaded
        for variant in variants_for(model, args.kv_heads, args.mha_factor):
            heads = variant.kv_heads or kv_before
            per_token = kv_bytes_per_token(config, heads)
            per_sequence = per_token * args.context
            fits = budget // per_sequence
            if fits < 1:
                raise SystemExit(
                    f"bench-kv: --kv-budget-mib {args.kv_budget_mib} holds no {args.context}-token "
                    f"sequence of {model} ({per_sequence / 2**20:.1f} MiB): raise it"
                )
            batch = min(fits, MAX_BATCH_CAP)
            name = f"{model}-{variant.label.replace(' ', '-')}-b{batch}-t{args.context}"
            built = build_variant(
                variant, source, engines_root / name, batch, args.context, args.rebuild
            )
            report, manifest = built["report"], built["manifest"]
            assert manifest["kv_cache"]["bytes_per_token"] == per_token
            collapse: dict[str, Any] = next(
                (p for p in report["passes"] if p["name"] == "collapse-kv-heads"), {}
            )
            measured = engine_quality(engines_root / name, eval_ids, reference)
            row: dict[str, Any] = {
                "model": model,
                "variant": variant.label,
                "engine_dir": str(engines_root / name),
                "kv_heads": heads,
                "grouping": variant.grouping if variant.kv_heads else None,
                "kv_bytes_per_token": per_token,
                "kv_mib_per_sequence": per_sequence / 2**20,
                "max_batch_in_budget": fits,
                "quality": measured,
                "build_quality": report.get("quality"),  # the build's own stage (lossy builds)
                "reconstruction_error": collapse.get("reconstruction_error_mean"),
                "reconstruction_error_contiguous": collapse.get(
                    "reconstruction_error_mean_contiguous"
                ),
                "groups": collapse.get("groups"),
            }
            if variant.time_decode:
                log(f"timing {model} {variant.label}: batch 1 and batch {batch} at {args.context}")
                engine = engines_root / name
                row["decode_batch1"] = decode_speed(
                    engine, prompt_ids, 1, args.decode_tokens, args.runs
                )
                row["decode_max_batch"] = decode_speed(
                    engine, prompt_ids, batch, args.decode_tokens, args.runs
                )
            if model == SMOLLM2 and variant.kv_heads:
                row["sample"] = sample_generation(
                    engines_root / name, "The capital of France is", 16
                )
            results.append(row)
    return {
        "benchmark": "kv-head-collapse",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command_line(),
        "argv": argv,
        "machine": machine_info(),
        "settings": {
            "context_tokens": args.context,
            "decode_tokens": args.decode_tokens,
            "kv_budget_mib": args.kv_budget_mib,
            "runs": args.runs,
            "kv_cache_dtype": "float32",
            "perplexity_text": "pydoc_data held-out half, 1024 tokens",
            "calibration_text": "pydoc_data calibration half, 1024 tokens",
            "mha_models": "random weights (no real MHA checkpoint ships offline); "
            f"mha-clustered: K/V heads = {CLUSTERS} prototypes + {CLUSTER_NOISE} relative noise, "
            "randomly permuted per layer",
        },
        "rows": results,
    }


def _cell(s: dict[str, Any] | None) -> str:
    if not s:
        return "-"
    t = s["tokens_per_s"]
    return f"{t['median']:.1f} [{t['min']:.1f}-{t['max']:.1f}]"


def render(result: dict[str, Any]) -> str:
    s = result["settings"]
    headers = [
        "model",
        "engine",
        "KV B/token",
        f"batch in {s['kv_budget_mib']:g} MiB",
        "ppl",
        "top-1 vs orig",
        "KL vs orig",
        "K/V recon err",
        f"decode tok/s b=1 @{s['context_tokens']}",
        "decode tok/s b=max",
    ]
    rows = []
    for r in result["rows"]:
        q = r["quality"]
        err = r["reconstruction_error"]
        rows.append(
            [
                r["model"],
                r["variant"],
                str(r["kv_bytes_per_token"]),
                str(r["max_batch_in_budget"]),
                f"{q['perplexity_engine']:.2f}",
                f"{q['top1_agreement']:.3f}",
                f"{q['kl_from_reference']:.4f}",
                f"{err['kv']:.3f}" if err else "-",
                _cell(r.get("decode_batch1")),
                _cell(r.get("decode_max_batch")),
            ]
        )
    lines = [
        f"fp32 KV cache; {s['context_tokens']}-token context; decode: {s['decode_tokens']} greedy "
        f"steps, {s['runs']} runs after 1 warm-up, median [min-max], engine steps only",
        "ppl, top-1 agreement and KL(original || engine) vs the original fp32 transformers model "
        "on 1024 held-out pydoc tokens;",
        "recon err: mean over layers of K and V ||x - group mean||^2 / ||x||^2 on 1024 "
        "calibration tokens",
        "",
        format_table(headers, rows),
    ]
    samples = [r for r in result["rows"] if r.get("sample")]
    for r in samples:
        lines.append(
            f"\n{r['model']} {r['variant']} via LLM.generate: "
            f"{r['sample']['prompt']!r} -> {r['sample']['text']!r}"
        )
    return "\n".join(lines)


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.runs < 1 or args.decode_tokens < 1 or args.context <= args.decode_tokens:
        parser.error("need --runs >= 1, --decode-tokens >= 1 and --context > --decode-tokens")
    unknown = set(args.models.split(",")) - {SMOLLM2, *MHA_MODELS}
    if unknown:
        parser.error(f"unknown --models {', '.join(sorted(unknown))}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `scripts/bench-kv` and `python -m enginesmith.scripts.benchmarks.bench_kv`."""
    return bench_main(argv, build_parser(), _check_args, run, render, "kv")


if __name__ == "__main__":
    raise SystemExit(main())
