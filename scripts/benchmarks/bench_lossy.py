"""`scripts/bench-lossy`: every lossy option of build-engine side by side, with llama.cpp.

One run builds (or reuses, when current) a SmolLM2 engine per option and measures, on the same
token ids for everyone:

* held-out perplexity and top-1 agreement with the fp32 engine on --ppl-tokens tokens of the
  pydoc held-out half (calibration uses the other half);
* decode tok/s at batch 1: --decode-tokens greedy steps after a --prompt-tokens real-text prompt,
  engine steps only, --runs repetitions after one warm-up (median);
* decode tok/s at the largest batch whose KV cache fits --kv-budget-mib at a --context-tokens
  context: every row holds the same (context - 16)-token prompt (prefilled once and copied into
  every slot), then 16 greedy steps of all rows are timed;
* KV bytes per token and the engine directory's size;
* llama.cpp on the Q4_1 GGUF the engines come from, with its default f16 KV cache and with a
  q8_0 KV cache (`type_k = type_v = q8_0`, flash attention on), batch 1 only.

With --recovery-sweep, perplexity of the --kv-heads 1 model against the recovery budget (the
collapsed transformers model, which computes what its engine computes).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from enginesmith.scripts.benchmarks.bench import (
    bench_main,
    command_line,
    format_table,
    machine_info,
)

MODEL = "smollm2-135m"
# (key, label, build-engine settings): the options and the useful combinations.
OPTIONS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("fp32", "fp32", {}),
    ("int4", "--quantize int4", {"quantize": "int4"}),
    ("kv8", "--kv-cache-dtype int8", {"kv_cache_dtype": "int8"}),
    ("kv4", "--kv-cache-dtype int4", {"kv_cache_dtype": "int4"}),
    ("kvh1", "--kv-heads 1 (recovery)", {"kv_heads": 1}),
    (
        "int4-kv8",
        "--quantize int4 --kv-cache-dtype int8",
        {"quantize": "int4", "kv_cache_dtype": "int8"},
    ),
    ("int8", "--quantize int8", {"quantize": "int8"}),
    ("int4-rtn", "--quantize int4 --quant-method rtn", {"quantize": "int4", "quant_method": "rtn"}),
    (
        "int4-kvh1-kv8",
        "--quantize int4 --kv-heads 1 --kv-cache-dtype int8",
        {"quantize": "int4", "kv_heads": 1, "kv_cache_dtype": "int8"},
    ),
)
ELEMENT_BYTES = {"float32": 4.0, "int8": 1.0, "int4": 0.5}
GGML_TYPE_Q8_0 = 8
BATCH_DECODE_TOKENS = 16


def log(msg: str) -> None:
    print(f"[bench-lossy] {msg}", flush=True)


def kv_bytes_per_token(config: Any, settings: dict[str, Any]) -> int:
    heads = settings.get("kv_heads") or config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = ELEMENT_BYTES[settings.get("kv_cache_dtype", "float32")]
    return int(2 * config.num_hidden_layers * heads * head_dim * element)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench-lossy",
        description="Every lossy build option (weights, KV cache, KV heads) and llama.cpp Q4_1 "
        "side by side: perplexity, top-1 agreement with fp32, decode tok/s at batch 1 and at "
        "the largest batch in a KV budget, KV bytes per token, engine size.",
    )
    p.add_argument(
        "--only",
        nargs="*",
        default=None,
        metavar="KEY",
        help="options to run: " + ", ".join(k for k, _, _ in OPTIONS) + " (default: all)",
    )
    p.add_argument("--skip-llama-cpp", action="store_true", help="no llama.cpp rows")
    p.add_argument("--ppl-tokens", type=int, default=1024, help="held-out tokens (default 1024)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="batch-1 prompt (default 128)")
    p.add_argument("--decode-tokens", type=int, default=64, help="batch-1 steps (default 64)")
    p.add_argument("--runs", type=int, default=3, help="batch-1 repetitions (default 3)")
    p.add_argument("--context-tokens", type=int, default=2048, help="batched context (2048)")
    p.add_argument("--kv-budget-mib", type=int, default=512, help="KV budget (default 512)")
    p.add_argument("--max-batch-cap", type=int, default=64, help="largest batch run (64)")
    p.add_argument(
        "--recovery-sweep",
        default="0,1",
        help="comma-separated --kv-recovery-minutes budgets (MINUTES or MINUTES@LEARNING_RATE) "
        "whose perplexity is measured on the collapsed transformers model (default 0,1; "
        "empty: none)",
    )
    p.add_argument("--threads", type=int, default=2, help="threads everywhere (default 2)")
    p.add_argument("--rebuild", action="store_true", help="rebuild every engine")
    p.add_argument(
        "--build-only",
        action="store_true",
        help="build the engines that are missing or stale and stop (no measurement: run it "
        "outside a benchmark lock, then the measuring run only measures)",
    )
    p.add_argument("--json", type=Path, default=None, help="results file (default: cache)")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    keys = {k for k, _, _ in OPTIONS}
    for key in args.only or []:
        if key not in keys:
            p.error(f"--only {key}: not one of {', '.join(sorted(keys))}")
    if args.ppl_tokens < 16 or args.ppl_tokens > args.context_tokens:
        p.error("--ppl-tokens must be between 16 and --context-tokens")


def engine_row(
    path: Path,
    ids: list[int],
    reference: np.ndarray | None,
    args: argparse.Namespace,
    prompt_ids: list[int],
    long_ids: list[int],
    batch: int,
) -> tuple[dict[str, Any], np.ndarray]:
    from enginesmith.compiler import quality
    from enginesmith.runtime.engine_dir import read_manifest
    from enginesmith.runtime.ort_cpu_executor import OrtCpuExecutor
    from enginesmith.scripts.benchmarks.bench_kv import decode_speed

    manifest = read_manifest(path)
    executor = OrtCpuExecutor(path, manifest, threads=args.threads)
    logits = quality.engine_logits(executor, ids)
    del executor
    gc.collect()
    row: dict[str, Any] = {
        "engine": str(path),
        "perplexity": quality.perplexity(logits, ids),
        "top1_agreement_fp32": (
            float((logits.argmax(-1) == reference.argmax(-1)).mean())
            if reference is not None
            else 1.0
        ),
        "kv_bytes_per_token": manifest["kv_cache"]["bytes_per_token"],
        "engine_mb": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6,
        "batch_in_budget": batch,
    }
    one = decode_speed(path, prompt_ids, 1, args.decode_tokens, args.runs)
    row["decode_batch1"] = one["tokens_per_s"]
    gc.collect()
    many = decode_speed(path, long_ids, batch, BATCH_DECODE_TOKENS, 1)
    row["decode_batch_budget"] = many["tokens_per_s"]
    gc.collect()
    report = json.loads((path / "build_report.json").read_text())
    if "kv_recovery" in report:
        row["kv_recovery"] = {
            k: v for k, v in report["kv_recovery"].items() if not k.startswith("per_layer")
        }
    return row, logits


def llama_rows(
    ids: list[int], reference: np.ndarray, prompt_ids: list[int], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    from enginesmith.compiler import quality
    from enginesmith.compiler.presets import smollm2_gguf_path
    from enginesmith.runtime.errors import BackendUnavailableError
    from enginesmith.scripts.benchmarks.bench_quant import _llama_cpp, llama_decode

    try:
        llama_cpp = _llama_cpp()
    except BackendUnavailableError as exc:
        log(f"no llama.cpp rows: {exc}")
        return {}
    gguf = smollm2_gguf_path()
    rows: dict[str, dict[str, Any]] = {}
    kv_f16 = 2 * 30 * 3 * 64 * 2
    for key, kwargs, kv_bytes in (
        ("llama.cpp Q4_1", {}, kv_f16),
        (
            "llama.cpp Q4_1, q8_0 KV",
            {"type_k": GGML_TYPE_Q8_0, "type_v": GGML_TYPE_Q8_0, "flash_attn": True},
            kv_f16 * 34 // 64,  # q8_0: 34 bytes per 32 values
        ),
    ):
        llama = llama_cpp.Llama(
            model_path=str(gguf),
            n_ctx=len(ids),
            n_threads=args.threads,
            n_threads_batch=args.threads,
            logits_all=True,
            verbose=False,
            **kwargs,
        )
        llama.eval(ids)
        logits = np.array(llama.scores[: len(ids)], dtype=np.float32)
        llama.close()
        llama = llama_cpp.Llama(
            model_path=str(gguf),
            n_ctx=1024,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            logits_all=False,
            verbose=False,
            **kwargs,
        )
        speeds = [
            llama_decode(llama, prompt_ids, args.decode_tokens)["wall_tokens_per_s"]
            for _ in range(args.runs + 1)
        ][1:]
        llama.close()
        rows[key] = {
            "perplexity": quality.perplexity(logits, ids),
            "top1_agreement_fp32": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
            "kv_bytes_per_token": kv_bytes,
            "engine_mb": gguf.stat().st_size / 1e6,
            "decode_batch1": {"median": statistics.median(speeds), "samples": speeds},
            "settings": kwargs,
        }
        log(
            f"{key}: perplexity {rows[key]['perplexity']:.3f}, "
            f"{rows[key]['decode_batch1']['median']:.1f} tok/s"
        )
    return rows


def recovery_sweep(
    loaded: Any, ids: list[int], reference: np.ndarray, budgets: list[tuple[float, float | None]]
) -> list[dict[str, Any]]:
    from enginesmith.compiler import kv_recovery, quality

    out = []
    for minutes, learning_rate in budgets:
        start = time.perf_counter()
        model, report = kv_recovery.collapse_with_recovery(
            loaded.model,
            loaded.tokenizer,
            1,
            minutes=minutes,
            log=lambda _m: None,
            learning_rate=learning_rate,
        )
        logits = quality.reference_logits_chunked(model, ids)
        out.append(
            {
                "minutes_budget": minutes,
                "learning_rate": learning_rate or kv_recovery.LEARNING_RATE,
                "seconds": round(time.perf_counter() - start, 1),
                "perplexity": quality.perplexity(logits, ids),
                "top1_agreement_fp32": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
                "mean_attention_error": report.as_dict()["mean_error_recovered"],
            }
        )
        log(f"recovery {minutes:g} min: perplexity {out[-1]['perplexity']:.3f}")
        del model
        gc.collect()
    return out


def derive_engine(fp32_dir: Path, config: Any, tokenizer: Any) -> Path:
    """CONFIG's engine made from the fp32 engine's graph by the passes CONFIG adds after the fp32
    pipeline (weight quantization, then the quantized KV cache), built exactly as build-engine
    builds them: the same pass objects compiler/pipeline.py makes for CONFIG, the same KV
    calibration on the written engine. Saves a minute-long load and export per option."""
    import copy

    import onnx_ir as ir

    from enginesmith.compiler import artifact, kv_cache_calibration, pipeline
    from enginesmith.compiler.backends import onnxruntime as ort_backend
    from enginesmith.compiler.export import ModelDims
    from enginesmith.runtime.engine_dir import read_manifest

    out = config.output.expanduser()
    fp32 = read_manifest(fp32_dir)
    if (out / "manifest.json").is_file():
        built = read_manifest(out)
        if (
            built.get("derived_from") == fp32["manifest_sha256"]
            and built.get("build_config") == config.fingerprint_fields()
        ):
            return out
    log(f"deriving {out} from {fp32_dir}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model = ir.load(fp32_dir / fp32["files_by_role"]["model"])
    dims = ModelDims(**fp32["model"])
    extra = [
        p
        for p in pipeline.onnxruntime_passes(dims, pipeline.PassInputs(config=config))
        if p.name == "quantize-weights"
    ]
    records = pipeline.run_pipeline(model, extra)
    manifest = {
        k: copy.deepcopy(v)
        for k, v in fp32.items()
        if k not in ("files", "manifest_sha256", "format_version")
    }
    manifest["files_by_role"] = ort_backend.write_engine_files(model, tokenizer, out)
    manifest["max_batch"] = config.max_batch
    manifest["build_config"] = config.fingerprint_fields()
    manifest["derived_from"] = fp32["manifest_sha256"]
    manifest["passes"] += [r.name for r in records]
    kv = manifest["kv_cache"]
    kv["shape_per_layer"][0] = config.max_batch
    kv["total_bytes"] = kv["bytes_per_token"] * config.max_batch * config.max_seq_len
    report: dict[str, Any] = {"passes": [r.as_dict() for r in records]}
    if records:
        from enginesmith.passes.quantize_weights import manifest_entry

        manifest["quantization"] = manifest_entry(records[0].report)
        manifest["dtypes"]["weights"] = manifest["quantization"]["mode"]
    if config.kv_cache_dtype != "float32":
        report["kv_cache"] = kv_cache_calibration.quantize_engine_kv_cache(
            out, manifest, model, tokenizer, config.kv_cache_dtype, config.calibration
        )
    (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    artifact.write_manifest(out, manifest)
    return out


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    import torch

    from enginesmith.compiler import quality
    from enginesmith.compiler.config import BuildConfig
    from enginesmith.compiler.presets import cache_dir
    from enginesmith.compiler.sources import load_model
    from enginesmith.scripts.benchmarks.bench import cached_engine

    torch.set_num_threads(args.threads)
    loaded = load_model(MODEL)
    encode = lambda s: list(loaded.tokenizer(s).input_ids)  # noqa: E731
    text = quality.heldout_text()
    ids = encode(text)[: args.ppl_tokens]
    prompt_ids = encode(quality.calibration_text())[: args.prompt_tokens]
    long_ids = encode(quality.calibration_text())[: args.context_tokens - BATCH_DECODE_TOKENS]
    budget = args.kv_budget_mib << 20
    root = cache_dir() / "engines" / "bench-lossy"
    partial = cache_dir() / "bench" / "lossy-partial.json"
    partial.parent.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    reference = None
    for key, label, settings in OPTIONS:
        if args.only and key not in args.only and key != "fp32":
            continue
        per_token = kv_bytes_per_token(loaded.config, settings)
        batch = max(1, min(args.max_batch_cap, budget // (per_token * args.context_tokens)))
        config = BuildConfig(
            model=MODEL,
            output=root / key,
            max_batch=batch,
            max_seq_len=args.context_tokens,
            verify=False,
            **settings,
        )
        if key == "fp32" or "kv_heads" in settings:  # a different export: a full build
            path = cached_engine(config, rebuild=args.rebuild)
        else:  # passes after the fp32 pipeline: derived from its engine
            path = derive_engine(root / "fp32", config, loaded.tokenizer)
        if args.build_only:
            continue
        log(f"measuring {label} ({path.name}, batch {batch})")
        row, logits = engine_row(path, ids, reference, args, prompt_ids, long_ids, batch)
        if key == "fp32":
            reference = logits
        row["label"] = label
        row["batch_fits_budget"] = budget // (per_token * args.context_tokens)
        rows[key] = row
        partial.write_text(json.dumps(rows, indent=1) + "\n")  # a crash later keeps the rows
        log(
            f"{label}: perplexity {row['perplexity']:.3f}, top-1 {row['top1_agreement_fp32']:.3f}, "
            f"{row['decode_batch1']['median']:.1f} tok/s at batch 1, "
            f"{row['decode_batch_budget']['median']:.1f} at batch {batch}"
        )
    if args.build_only:
        raise SystemExit(0)
    assert reference is not None
    budgets = [_budget(m) for m in args.recovery_sweep.split(",") if m.strip()]
    sweep = recovery_sweep(loaded, ids, reference, budgets) if budgets else []
    partial.write_text(json.dumps({"engines": rows, "recovery_sweep": sweep}, indent=1) + "\n")
    peers = {} if args.skip_llama_cpp else llama_rows(ids, reference, prompt_ids, args)
    return {
        "model": MODEL,
        "command": command_line(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {**machine_info(), "load_average_1m_end": _load()},
        "engines": rows,
        "llama_cpp": peers,
        "recovery_sweep": sweep,
    }


def _budget(text: str) -> tuple[float, float | None]:
    """'MINUTES' or 'MINUTES@LEARNING_RATE' of --recovery-sweep."""
    minutes, _, rate = text.partition("@")
    return float(minutes), float(rate) if rate else None


def _load() -> float:
    import os

    return os.getloadavg()[0]


def render(result: dict[str, Any]) -> str:
    s = result["settings"]
    rows = []
    for row in result["engines"].values():
        rows.append(
            [
                row["label"],
                f"{row['perplexity']:.3f}",
                f"{row['top1_agreement_fp32']:.3f}",
                f"{row['decode_batch1']['median']:.1f}",
                f"{row['decode_batch_budget']['median']:.0f} (B={row['batch_in_budget']}"
                + (
                    f" of {row['batch_fits_budget']}"
                    if row["batch_fits_budget"] > row["batch_in_budget"]
                    else ""
                )
                + ")",
                str(row["kv_bytes_per_token"]),
                f"{row['engine_mb']:.0f}",
            ]
        )
    for key, row in result["llama_cpp"].items():
        rows.append(
            [
                key,
                f"{row['perplexity']:.3f}",
                f"{row['top1_agreement_fp32']:.3f}",
                f"{row['decode_batch1']['median']:.1f}",
                "-",
                str(row["kv_bytes_per_token"]),
                f"{row['engine_mb']:.0f}",
            ]
        )
    headers = [
        "option",
        "perplexity",
        "top-1 = fp32",
        "tok/s B=1",
        f"tok/s in {s['kv_budget_mib']} MiB KV",
        "KV B/token",
        "size MB",
    ]
    machine = result["machine"]
    lines = [
        f"model {result['model']}, {s['threads']} threads; perplexity and top-1 agreement with "
        f"the fp32 engine on {s['ppl_tokens']} held-out tokens",
        f"batch 1: {s['decode_tokens']} greedy steps after a {s['prompt_tokens']}-token prompt, "
        f"median of {s['runs']}; batched: {BATCH_DECODE_TOKENS} steps of the largest batch whose "
        f"KV fits {s['kv_budget_mib']} MiB at {s['context_tokens']} tokens (capped at "
        f"{s['max_batch_cap']})",
        f"cpu: {machine.get('cpu_model')}, {machine.get('cpu_count')} cores; load average at "
        f"the end {machine.get('load_average_1m_end', 0):.2f}",
        "",
        format_table(headers, rows),
    ]
    int4, peer = result["engines"].get("int4"), result["llama_cpp"].get("llama.cpp Q4_1")
    if int4 and peer:
        lines += [
            "",
            f"int4 engine vs llama.cpp Q4_1 at batch 1: "
            f"{int4['decode_batch1']['median'] / peer['decode_batch1']['median']:.2f}x",
        ]
    kvh1 = result["engines"].get("kvh1", {}).get("kv_recovery")
    if kvh1:
        lines.append(
            f"--kv-heads 1 recovery in the build: {kvh1['seconds']:.0f} s, attention "
            f"error {kvh1['mean_error_pooled']:.3f} pooled -> "
            f"{kvh1['mean_error_recovered']:.3f}"
        )
    if result["recovery_sweep"]:
        lines += [
            "",
            format_table(
                ["--kv-heads 1, recovery budget", "seconds", "perplexity", "top-1 = fp32"],
                [
                    [
                        f"{r['minutes_budget']:g} min, lr {r['learning_rate']:g}",
                        f"{r['seconds']:.0f}",
                        f"{r['perplexity']:.3f}",
                        f"{r['top1_agreement_fp32']:.3f}",
                    ]
                    for r in result["recovery_sweep"]
                ],
            ),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `scripts/bench-lossy`."""
    return bench_main(argv, build_parser(), _check_args, run, render, "lossy")


if __name__ == "__main__":
    raise SystemExit(main())
