"""`scripts/bench-quant`: the CPU decode race of weight-only quantization (issue 5).

One process measures, on the same machine and the same token ids:

* decode speed at batch 1: --decode-tokens greedy tokens (EOS ignored) after a
  --prompt-tokens real-text prompt (Python's own docs, `pydoc_data.topics`), timed from the
  first to the last generated token (prefill excluded), for
    - the fp32, int8 and int4 SmolLM2 engines (built into the cache first if missing),
    - llama.cpp (llama-cpp-python) on the SmolLM2 Q4_1 GGUF the engines are built from,
    - transformers (`model.generate`) on the same fp32 weights;
  one warm-up, then --runs repetitions, every implementation once per repetition (the order
  rotating), so that machine noise hits all of them;
* perplexity of each on the same --ppl-tokens held-out token ids (`quality.heldout_text()`):
  one logits row per position, in 512-token chunks for the engines and transformers, one
  `Llama.eval` of the ids (logits_all) for llama.cpp.

The table goes to stdout, progress to stderr, everything (raw samples included) to a JSON file
under <cache>/bench.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from enginesmith.scripts.benchmarks.bench import (
    DEFAULT_MODEL,
    bench_main,
    command_line,
    common_prefix_len,
    default_engine_dir,
    format_cell,
    format_ratio,
    format_table,
    machine_info,
    ours_decode,
    package_version,
    peer_decode,
    ratio,
    real_text_prompt,
    summarize,
    torch_weight_bytes,
)

MODES = ("fp32", "int8", "int4")
PEERS = ("llama.cpp", "transformers")
IMPLEMENTATIONS = tuple(f"enginesmith {m}" for m in MODES) + PEERS
# llama-cpp-python built without AMX (its AMX path crashes on this machine): scripts/bench-quant
# installs it with these options when it is missing.
LLAMA_CPP_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
    "-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON "
    "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
)


def log(msg: str) -> None:
    print(f"[bench-quant] {msg}", file=sys.stderr, flush=True)


# --- engines --------------------------------------------------------------------------------------


def engine_dir(root: Path, mode: str, block_size: int) -> Path:
    if mode == "fp32":
        return default_engine_dir()  # the engine `scripts/bench` uses
    return root / f"{DEFAULT_MODEL}-{mode}-b{block_size}"


def ensure_engine(path: Path, mode: str, block_size: int, rebuild: bool) -> Path:
    """PATH, (re)built from the SmolLM2 preset when missing, stale or when REBUILD."""
    from enginesmith.compiler.config import BuildConfig
    from enginesmith.scripts.benchmarks.bench import cached_engine

    if mode == "fp32":  # the engine `scripts/bench` uses: its settings exactly
        config = BuildConfig(model=DEFAULT_MODEL, output=path)
    else:
        config = BuildConfig(model=DEFAULT_MODEL, output=path, quantize=mode, block_size=block_size)
    return cached_engine(config, rebuild=rebuild)


@dataclass
class GraphWeights:
    """Weight bytes of an engine, read from its ONNX graph (not the data file)."""

    total_bytes: int
    per_token_bytes: int  # what one decoded token reads: a lookup table counts one row
    by_dtype: dict[str, int] = field(default_factory=dict)


_LOOKUP_OPS = ("Gather", "GatherBlockQuantized")


def graph_weights(path: Path, manifest: dict[str, Any]) -> GraphWeights:
    """Initializer bytes; tables read only by (quantized) Gathers count one row per token."""
    import onnx

    model = onnx.load(str(path / manifest["files_by_role"]["model"]), load_external_data=False)
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    total = per_token = 0
    by_dtype: dict[str, int] = {}
    for init in model.graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        dims = [int(d) for d in init.dims]
        nbytes = int(np.prod(dims)) * dtype.itemsize
        total += nbytes
        by_dtype[dtype.name] = by_dtype.get(dtype.name, 0) + nbytes
        lookup_only = readers.get(init.name, set()) <= set(_LOOKUP_OPS) and dims
        per_token += nbytes // dims[0] if lookup_only else nbytes
    return GraphWeights(total, per_token, by_dtype)


def gguf_weights(path: Path) -> GraphWeights:
    """Tensor bytes of a GGUF file. token_embd is also the output matrix when no
    output.weight exists (tied), so every tensor is read once per token."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    by_type: dict[str, int] = {}
    for t in reader.tensors:
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    total = sum(by_type.values())
    names = {t.name for t in reader.tensors}
    per_token = total
    if "output.weight" in names:  # untied: the embedding lookup reads one row
        emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
        per_token = total - int(emb.n_bytes) + int(emb.n_bytes) // int(emb.shape[-1])
    return GraphWeights(total, per_token, by_type)


# --- llama.cpp ------------------------------------------------------------------------------------


def _llama_cpp() -> Any:
    from enginesmith.runtime.errors import BackendUnavailableError

    try:
        import llama_cpp
    except ImportError as exc:
        raise BackendUnavailableError(
            "llama-cpp-python is not installed: run scripts/bench-quant (it installs it), or "
            f'CMAKE_ARGS="{LLAMA_CPP_CMAKE_ARGS}" .venv/bin/pip install llama-cpp-python; '
            "or pass --skip llama.cpp"
        ) from exc
    return llama_cpp


def llama_open(gguf: Path, n_ctx: int, threads: int, logits_all: bool) -> Any:
    llama_cpp = _llama_cpp()
    return llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        verbose=False,
    )


def llama_decode(llama: Any, ids: list[int], tokens: int) -> dict[str, Any]:
    """Greedy decode of TOKENS tokens after IDS with llama.cpp (temperature 0, top-k 1), EOS
    ignored; tokens/s from the first to the last token on the caller's clock, like ours."""
    llama.reset()  # no prefix reuse between repetitions: the prompt is evaluated each time
    times: list[float] = []
    out: list[int] = []
    for token in llama.generate(
        ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True
    ):
        times.append(time.perf_counter())
        out.append(int(token))
        if len(out) == tokens:
            break
    steps = len(times) - 1
    wall = times[-1] - times[0] if steps > 0 else 0.0
    return {
        "wall_tokens_per_s": steps / wall if wall > 0 else 0.0,
        "generated_tokens": len(out),
        "token_ids": out,
    }


def llama_logits(gguf: Path, ids: list[int], threads: int) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] for every position of IDS (one eval)."""
    llama = llama_open(gguf, n_ctx=len(ids), threads=threads, logits_all=True)
    try:
        llama.eval(ids)
        return np.array(llama.scores[: len(ids)], dtype=np.float32)
    finally:
        llama.close()


def llama_system_info() -> str | None:
    try:
        info = _llama_cpp().llama_print_system_info()
    except Exception:  # pragma: no cover - informational only
        return None
    return info.decode() if isinstance(info, bytes) else str(info)


# --- the run --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/bench-quant",
        description=(
            "Decode race at batch 1 on CPU: the fp32, int8 and int4 SmolLM2 engines against "
            "llama.cpp on the Q4_1 GGUF and transformers, in one run, with the perplexity of "
            "each on the same held-out tokens. Prints a table; writes every raw sample to JSON."
        ),
    )
    p.add_argument(
        "--runs",
        type=int,
        default=3,
        metavar="N",
        help="timed repetitions after one warm-up; the table shows median [min-max] "
        "(default: 3, minimum 1)",
    )
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=128,
        metavar="N",
        help="real-text prompt length in tokens before decoding (default: 128)",
    )
    p.add_argument(
        "--decode-tokens",
        type=int,
        default=256,
        metavar="N",
        help="greedy tokens decoded per measurement, EOS ignored (default: 256)",
    )
    p.add_argument(
        "--ppl-tokens",
        type=int,
        default=1024,
        metavar="N",
        help="held-out tokens the perplexity of each implementation is measured on "
        "(default: 1024; 0 skips perplexity)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=32,
        metavar="N",
        help="quantization block size of the int8/int4 engines (default: 32)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="threads for every implementation: onnxruntime intra-op, llama.cpp n_threads, "
        "torch (default: all cores, %(default)s here)",
    )
    p.add_argument(
        "--engines-dir",
        type=Path,
        metavar="DIR",
        help="where the int8/int4 engines are (built if missing; default: <cache>/engines; "
        "the fp32 engine is <cache>/engines/smollm2-135m-bench, shared with `scripts/bench`)",
    )
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="rebuild the int8/int4 engines even if they exist (e.g. after changing the pass)",
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=[*MODES, *PEERS],
        metavar="NAME",
        help=f"leave an implementation out; repeatable; one of {', '.join([*MODES, *PEERS])}",
    )
    p.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="where to write the results (default: <cache>/bench/quant-<timestamp>.json)",
    )
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.runs < 1:
        p.error(f"--runs must be >= 1 (got {args.runs})")
    if args.prompt_tokens < 1:
        p.error(f"--prompt-tokens must be >= 1 (got {args.prompt_tokens})")
    if args.decode_tokens < 2:
        p.error(f"--decode-tokens must be >= 2 (got {args.decode_tokens})")
    if args.ppl_tokens < 0 or args.ppl_tokens == 1:
        p.error(f"--ppl-tokens must be 0 or >= 2 (got {args.ppl_tokens})")
    if args.threads < 1:
        p.error(f"--threads must be >= 1 (got {args.threads})")
    if args.block_size < 16 or args.block_size & (args.block_size - 1):
        p.error(f"--block-size must be a power of two >= 16 (got {args.block_size})")


Decoder = Callable[[], dict[str, Any]]


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Every measurement of one run, as the JSON-able result dict."""
    import torch

    from enginesmith.compiler import quality
    from enginesmith.compiler.presets import cache_dir, smollm2_gguf_path
    from enginesmith.runtime.llm import LLM

    torch.set_num_threads(args.threads)
    root = (args.engines_dir or cache_dir() / "engines").expanduser()
    modes = [m for m in MODES if m not in args.skip]
    gguf = smollm2_gguf_path()
    engines = {
        m: ensure_engine(
            engine_dir(root, m, args.block_size), m, args.block_size, args.rebuild and m != "fp32"
        )
        for m in modes
    }
    llms = {}
    for m, path in engines.items():
        log(f"loading the {m} engine {path}")
        llms[m] = LLM(path, threads=args.threads)
    tokenizer = next(iter(llms.values())).tokenizer if llms else None
    peer = None
    if "transformers" not in args.skip or tokenizer is None:
        from enginesmith.compiler.sources import load_model

        log(f"loading transformers model {DEFAULT_MODEL}")
        peer = load_model(DEFAULT_MODEL)
        peer.model.eval()
        tokenizer = tokenizer or peer.tokenizer
    assert tokenizer is not None

    def encode(s: str) -> list[int]:
        return list(tokenizer(s).input_ids)  # exactly what LLM.generate feeds the engine

    def decode(ids: list[int]) -> str:
        return str(tokenizer.decode(ids))

    prompt, prompt_ids = real_text_prompt(encode, decode, args.prompt_tokens)
    llama = None
    checks: dict[str, Any] = {}
    if "llama.cpp" not in args.skip:
        log(f"loading llama.cpp on {gguf.name} ({args.threads} threads)")
        n_ctx = max(1024, args.prompt_tokens + args.decode_tokens + 8)
        llama = llama_open(gguf, n_ctx=n_ctx, threads=args.threads, logits_all=False)
        # llama.cpp gets the same ids; its own tokenizer is checked against ours.
        theirs = llama.tokenize(prompt.encode(), add_bos=False, special=False)
        checks["llama_cpp_prompt_ids_match"] = list(theirs) == prompt_ids

    decoders: dict[str, Decoder] = {}
    for m, llm in llms.items():
        decoders[f"enginesmith {m}"] = functools.partial(
            ours_decode, llm, prompt, args.decode_tokens
        )
    if llama is not None:
        decoders["llama.cpp"] = lambda: llama_decode(llama, prompt_ids, args.decode_tokens)
    if peer is not None and "transformers" not in args.skip:
        pad = tokenizer.eos_token_id or 0
        decoders["transformers"] = lambda: peer_decode(
            peer.model, prompt_ids, args.decode_tokens, pad
        )

    samples: dict[str, list[float]] = {name: [] for name in decoders}
    step_samples: dict[str, list[float]] = {name: [] for name in decoders if "engine" in name}
    last: dict[str, list[int]] = {}
    names = list(decoders)
    for rep in range(args.runs + 1):
        label = "warm-up" if rep == 0 else f"run {rep}/{args.runs}"
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate the order
        for name in order:
            result = decoders[name]()
            if result["generated_tokens"] != args.decode_tokens:
                raise RuntimeError(f"{name} generated {result['generated_tokens']} tokens")
            last[name] = result["token_ids"]
            log(f"{label}: {name:<20} {result['wall_tokens_per_s']:7.1f} tok/s")
            if rep:
                samples[name].append(result["wall_tokens_per_s"])
                if name in step_samples:
                    step_samples[name].append(result["step_tokens_per_s"])

    ppl: dict[str, Any] = {}
    if args.ppl_tokens:
        ids = encode(quality.heldout_text())[: args.ppl_tokens]
        log(f"perplexity on {len(ids)} held-out tokens")
        for m, llm in llms.items():
            if len(ids) > llm.max_seq_len:
                raise RuntimeError(f"--ppl-tokens {len(ids)} exceeds the {m} engine's capacity")
            ppl[f"enginesmith {m}"] = quality.perplexity(
                quality.engine_logits(llm.executor, ids), ids
            )
        if peer is not None and "transformers" not in args.skip:
            logits = quality.reference_logits_chunked(peer.model, ids)
            ppl["transformers"] = quality.perplexity(logits, ids)
        if llama is not None:
            text = decode(ids)
            theirs = llama.tokenize(text.encode(), add_bos=False, special=False)
            checks["llama_cpp_heldout_ids_match"] = list(theirs) == ids
            llama.close()
            llama = None
            gc.collect()
            ppl["llama.cpp"] = quality.perplexity(llama_logits(gguf, ids, args.threads), ids)
        for name, value in ppl.items():
            log(f"perplexity {name:<20} {value:.3f}")

    weights: dict[str, dict[str, Any]] = {}
    for m, llm in llms.items():
        w = graph_weights(engines[m], llm.manifest)
        weights[f"enginesmith {m}"] = {
            "source": "onnx initializers",
            "total_bytes": w.total_bytes,
            "bytes_per_token": w.per_token_bytes,
            "by_dtype": w.by_dtype,
            "quantization": llm.manifest.get("quantization"),
        }
    if "llama.cpp" not in args.skip:
        w = gguf_weights(gguf)
        weights["llama.cpp"] = {
            "source": "gguf tensors",
            "total_bytes": w.total_bytes,
            "bytes_per_token": w.per_token_bytes,
            "by_type": w.by_dtype,
        }
    if peer is not None and "transformers" not in args.skip:
        tw = torch_weight_bytes(peer.model)
        weights["transformers"] = {
            "source": "torch parameters",
            "total_bytes": tw.total_bytes,
            "bytes_per_token": tw.per_token,
        }
    return {
        "benchmark": "quantized-decode-race",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command_line(),
        "argv": argv,
        "model": DEFAULT_MODEL,
        "gguf": str(gguf),
        "engines": {m: str(p) for m, p in engines.items()},
        "machine": {
            **machine_info(),
            "load_average_1m_end": os.getloadavg()[0],
            "llama_cpp_python": package_version("llama-cpp-python"),
            "llama_cpp_system_info": llama_system_info() if "llama.cpp" not in args.skip else None,
        },
        "settings": {
            "runs": args.runs,
            "warmup_runs": 1,
            "batch": 1,
            "threads": args.threads,
            "prompt_tokens": len(prompt_ids),
            "decode_tokens": args.decode_tokens,
            "ppl_tokens": args.ppl_tokens,
            "block_size": args.block_size,
            "prompt_source": "pydoc_data.topics, sorted keys",
            "ppl_text": "compiler.quality.heldout_text() (odd pydoc paragraphs)",
            "decode_timing": "first to last generated token on the caller's clock "
            "(prefill excluded, sampling included); llama.cpp: Llama.generate(top_k=1, temp=0)",
        },
        "checks": checks,
        "decode_tokens_per_s": {k: summarize(v) for k, v in samples.items()},
        "engine_step_tokens_per_s": {k: summarize(v) for k, v in step_samples.items() if v},
        "perplexity": ppl,
        "weights": weights,
        "greedy_tokens": last,
    }


def render(result: dict[str, Any]) -> str:
    """The human-readable report: a settings header and the table."""
    s = result["settings"]
    speed = result["decode_tokens_per_s"]
    ppl = result["perplexity"]
    weights = result["weights"]
    tokens = result["greedy_tokens"]

    def med(name: str) -> float | None:
        return speed[name]["median"] if name in speed else None

    reference_tokens = tokens.get("enginesmith fp32")
    headers = [
        "implementation",
        "weights/token",
        "decode tok/s",
        "vs llama.cpp",
        "vs transformers",
        "perplexity",
        "greedy = fp32",
    ]
    rows = []
    for name in IMPLEMENTATIONS:
        if name not in speed:
            continue
        w = weights.get(name)
        same = (
            f"{common_prefix_len(tokens[name], reference_tokens)}/{s['decode_tokens']}"
            if reference_tokens is not None and name in tokens
            else "-"
        )
        label = name if name != "llama.cpp" else "llama.cpp Q4_1 GGUF"
        if name == "transformers":
            label = "transformers fp32"
        rows.append(
            [
                label,
                f"{w['bytes_per_token'] / 1e6:.1f} MB" if w else "-",
                format_cell(speed[name]),
                format_ratio(ratio(med(name), med("llama.cpp"))),
                format_ratio(ratio(med(name), med("transformers"))),
                f"{ppl[name]:.3f}" if name in ppl else "-",
                same,
            ]
        )
    machine = result["machine"]
    lines = [
        f"model {result['model']}, batch 1, {s['threads']} threads, {s['runs']} runs after 1 "
        "warm-up: median [min-max]",
        f"decode: {s['decode_tokens']} greedy tokens after a {s['prompt_tokens']}-token prompt; "
        f"perplexity: {s['ppl_tokens']} held-out tokens, the same ids for all",
        f"cpu: {machine.get('cpu_model')}, {machine.get('cpu_count')} cores; "
        f"load average at the end {machine.get('load_average_1m_end', 0):.2f}",
        "",
        format_table(headers, rows),
    ]
    race = ratio(med("enginesmith int4"), med("llama.cpp"))
    if race is not None:
        ours, theirs = speed["enginesmith int4"]["samples"], speed["llama.cpp"]["samples"]
        wins = sum(a >= b for a, b in zip(ours, theirs, strict=True))
        lines += [
            "",
            f"int4 engine vs llama.cpp Q4_1: {race:.2f}x (median decode), at least as fast in "
            f"{wins} of {len(ours)} repetitions",
        ]
    checks = result.get("checks", {})
    if checks:
        lines.append(
            "llama.cpp tokenizer gives our ids: "
            + ", ".join(f"{k.removeprefix('llama_cpp_')}={v}" for k, v in checks.items())
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `scripts/bench-quant` and `python -m enginesmith.scripts.benchmarks.bench_quant`."""
    return bench_main(argv, build_parser(), _check_args, run, render, "quant")


if __name__ == "__main__":
    raise SystemExit(main())
