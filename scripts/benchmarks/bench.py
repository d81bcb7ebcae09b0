"""`scripts/bench`: prefill and decode speed of an engine vs Hugging Face transformers.

One run measures, on the same machine and the same token ids:

* prefill: a prompt of exactly --prefill-tokens tokens of real text (Python's own docs,
  `pydoc_data.topics`), timed as one engine call for us and one `model(...)` forward for
  transformers;
* decode: batch 1, --decode-tokens greedy tokens after a --decode-prompt-tokens real-text prompt;
* the memory-bandwidth bound of decode: read-only bandwidth measured here, divided by the
  bytes one decoded token has to read: every weight once, and the keys and values of the
  tokens it attends over (a line gives our decode against the weights alone too);
* the same prefill and decode on the model's *unfused* export (scripts/benchmarks/unfused_baseline.py):
  what the compiler's fusions buy over ONNX Runtime's own optimizations on the same weights;
* the MatMul floor (scripts/benchmarks/matmul_floor.py): the engine's weight MatMuls alone, chained, on
  ONNX Runtime's kernels: the fastest decode ONNX Runtime's kernels allow;

Every measurement is repeated --runs times after one warm-up, ours, unfused and transformers'
interleaved in each repetition so that machine noise hits all of them. The table goes to stdout, the
progress to stderr, and everything (raw samples included) to a JSON file.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MODEL = "smollm2-135m"
DECODE_PROMPT_TOKENS = 512  # prompt before decode: a realistic attention length
BANDWIDTH_BYTES = 1 << 30  # 1 GiB: far larger than any CPU cache
BANDWIDTH_REPS = 10  # per method and phase; the max is kept (noise only ever slows a pass)

Encode = Callable[[str], list[int]]
Decode = Callable[[list[int]], str]


# --- pure helpers ---------------------------------------------------------------------------------


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of SAMPLES, with the samples themselves (for the JSON)."""
    if not samples:
        raise ValueError("summarize() needs at least one sample")
    values = [float(x) for x in samples]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "samples": values,
    }


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """OURS / THEIRS, or None when either is missing or THEIRS is zero."""
    if ours is None or not theirs:
        return None
    return ours / theirs


def weight_bytes_per_token(
    total_bytes: int, embedding_bytes: int, tied: bool, embedding_row_bytes: int = 0
) -> int:
    """Weight bytes that one decoded token reads from memory (batch 1).

    Every weight matrix is streamed once per token, except the token-embedding table: the
    embedding lookup reads one row of it. When the embeddings are tied, the LM head is that
    same matrix and reads all of it, so it counts once (TOTAL already holds it once).
    """
    if tied:
        return total_bytes
    return total_bytes - embedding_bytes + embedding_row_bytes


def bound_tokens_per_s(bandwidth_bytes_per_s: float, bytes_per_token: int) -> float:
    """Decode tokens/s if reading BYTES_PER_TOKEN at full memory bandwidth were the only cost."""
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be > 0 (got {bytes_per_token})")
    return bandwidth_bytes_per_s / bytes_per_token


def kv_read_bytes_per_decoded_token(
    bytes_per_cached_token: int, prompt_tokens: int, decode_tokens: int
) -> int:
    """KV-cache bytes that one timed decode step reads, averaged over the timed steps.

    The decode is timed from its first to its last token, and the first comes with the
    prefill: the step that yields token j (j = 2..N) attends over prompt + j - 1 cached
    tokens (the new one included), prompt + N/2 on average. A step must read those keys and
    values once, as it must read every weight once: both make the bandwidth bound.
    """
    if decode_tokens < 2:
        return 0
    return round(bytes_per_cached_token * (prompt_tokens + decode_tokens / 2))


def torch_kv_bytes_per_cached_token(model: Any) -> int:
    """Keys and values of one cached token in a transformers decoder (every layer, its KV
    heads; the parameters' dtype)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize


STEADY_TOLERANCE = 0.10  # bracketing bandwidth passes this close: the level held


def steady_fractions(
    decode_tokens_per_s: Sequence[float],
    brackets: Sequence[tuple[float, float]],
    bytes_per_token: int,
    tolerance: float = STEADY_TOLERANCE,
) -> list[float]:
    """Decode speed over the bound at the bandwidth measured just before and just after it,
    for the repetitions whose two measurements agree within TOLERANCE (the host's bandwidth
    level held through the decode); the faster of the two makes the bound (conservative)."""
    fractions = []
    for decode, (before, after) in zip(decode_tokens_per_s, brackets, strict=True):
        high = max(before, after)
        if high > 0 and min(before, after) >= (1 - tolerance) * high:
            fractions.append(decode / bound_tokens_per_s(high, bytes_per_token))
    return fractions


def best_bandwidth(samples: dict[str, list[float]]) -> tuple[str, float]:
    """(method, bytes/s) of the fastest single pass over all methods.

    The max, not the median: a pass can only be slowed down by noise, never sped up.
    """
    best = max(((m, max(v)) for m, v in samples.items() if v), key=lambda mv: mv[1], default=None)
    if best is None:
        raise ValueError("no bandwidth samples")
    return best


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens A and B share (greedy agreement of two implementations)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def exact_token_prompt(encode: Encode, decode: Decode, text: str, n: int) -> tuple[str, list[int]]:
    """A prefix of TEXT whose tokenization is exactly N tokens: (prompt, its token ids).

    The LLM API takes strings, so the prompt is the decoding of the first ids; re-encoding a
    cut can merge differently at the cut, so cuts near N are tried until one re-encodes to N.
    """
    ids = encode(text)
    if len(ids) < n:
        raise ValueError(f"text has {len(ids)} tokens, fewer than the {n} asked for")
    for delta in range(0, 17):
        for k in (n - delta, n + delta):
            if not 0 < k <= len(ids):
                continue
            prompt = decode(ids[:k])
            prompt_ids = encode(prompt)
            if len(prompt_ids) == n:
                return prompt, prompt_ids
    raise ValueError(f"no prefix of the text re-encodes to exactly {n} tokens")


def pydoc_text() -> str:
    """Real English/Python text shipped with CPython: the pydoc topics, in sorted key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def real_text_prompt(encode: Encode, decode: Decode, n: int) -> tuple[str, list[int]]:
    """A pydoc prompt of exactly N tokens (tokenizes only as much text as it needs)."""
    text = pydoc_text()
    chars = 8 * n + 256  # ~4 chars per token: one try is nearly always enough
    while True:
        try:
            return exact_token_prompt(encode, decode, text[:chars], n)
        except ValueError:
            if chars >= len(text):
                raise
            chars *= 2


def format_cell(s: dict[str, Any] | None, digits: int = 1) -> str:
    """'median [min-max]' of a summary, or '-' when absent."""
    if s is None:
        return "-"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def format_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def format_percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


# --- weights and memory bandwidth -------------------------------------------------------------------


@dataclass
class WeightBytes:
    """Weight sizes of one implementation of the model, for the bandwidth bound."""

    source: str  # where the numbers come from
    total_bytes: int  # every weight tensor once
    embedding_bytes: int  # the token-embedding table
    embedding_row_bytes: int
    tied: bool  # the LM head reads the embedding table

    @property
    def per_token(self) -> int:
        return weight_bytes_per_token(
            self.total_bytes, self.embedding_bytes, self.tied, self.embedding_row_bytes
        )


def engine_weight_bytes(engine_dir: Path, manifest: dict[str, Any]) -> WeightBytes:
    """Sizes of the engine's ONNX initializers (read from the graph, not the 0.5 GB data file).

    The embedding table is the initializer that a Gather on `input_ids` reads; it is tied when
    another node (the LM head's Gemm/MatMul) also reads it.
    """
    import onnx

    model = onnx.load(
        str(engine_dir / manifest["files_by_role"]["model"]), load_external_data=False
    )
    graph = model.graph
    sizes: dict[str, tuple[int, int]] = {}  # name -> (bytes, bytes of the last dim's row)
    for init in graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        dims = [int(d) for d in init.dims]
        sizes[init.name] = (int(np.prod(dims)) * itemsize, (dims[-1] if dims else 1) * itemsize)
    embedding = next(
        (
            n.input[0]
            for n in graph.node
            # GatherBlockQuantized: the packed table of a --quantize engine.
            if n.op_type in ("Gather", "GatherBlockQuantized")
            and n.input[0] in sizes
            and "input_ids" in n.input[1:2]
        ),
        None,
    )
    if embedding is None:
        raise ValueError(f"{engine_dir}: no Gather of input_ids over an initializer in the graph")
    readers = sum(1 for n in graph.node for i in n.input if i == embedding)
    return WeightBytes(
        source="onnx initializers",
        total_bytes=sum(b for b, _ in sizes.values()),
        embedding_bytes=sizes[embedding][0],
        embedding_row_bytes=sizes[embedding][1],
        tied=readers > 1,
    )


def torch_weight_bytes(model: Any) -> WeightBytes:
    """Sizes of a transformers model's parameters (parameters() yields a tied tensor once)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    return WeightBytes(
        source="torch parameters",
        total_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        embedding_bytes=emb.numel() * emb.element_size(),
        embedding_row_bytes=emb.shape[-1] * emb.element_size(),
        tied=head is not None and head.weight.data_ptr() == emb.data_ptr(),
    )


@functools.cache
def _bandwidth_array(nbytes: int) -> np.ndarray:
    """The array the bandwidth passes read, written once so every page is resident, and kept
    for the whole process: a GiB freed just before a decode stalled some of its calls for
    tens of ms on this VM, and the bench samples bandwidth right before its decodes."""
    data = np.empty((nbytes // 4,), np.float32)
    data.fill(1.0)
    return data


def read_bandwidth(reps: int = 3) -> float:
    """bytes/s of the fastest of a short measure_bandwidth: one sample of the host's level."""
    return best_bandwidth(measure_bandwidth(reps=reps)["samples_bytes_per_s"])[1]


def measure_bandwidth(nbytes: int = BANDWIDTH_BYTES, reps: int = BANDWIDTH_REPS) -> dict[str, Any]:
    """Read-only memory bandwidth (bytes/s) of full passes that sum a float32 array.

    numpy's reduction runs on one thread; torch's uses all its threads, which is what a decode
    step does too. Both are kept (raw samples in the JSON) and the faster one is the bound.
    """
    import torch

    data = _bandwidth_array(nbytes)
    tensor = torch.from_numpy(data)
    methods: dict[str, Callable[[], object]] = {
        "numpy np.add.reduce (1 thread)": lambda: np.add.reduce(data),
        f"torch.sum ({torch.get_num_threads()} threads)": lambda: tensor.sum(),
    }
    samples: dict[str, list[float]] = {}
    for name, fn in methods.items():
        fn()  # warm-up
        samples[name] = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples[name].append(data.nbytes / (time.perf_counter() - start))
    return {
        "array_bytes": data.nbytes,
        "reps": reps,
        # Other processes on the machine share the memory bus: the load says how quiet it was.
        "load_average_1m": os.getloadavg()[0],
        "samples_bytes_per_s": samples,
    }


# --- the measurements -----------------------------------------------------------------------------


def ours_prefill(llm: Any, prompt: str, expected_tokens: int) -> float:
    """Prefill tokens/s of the engine: the engine calls that process PROMPT (max_tokens=1)."""
    from enginesmith.runtime.sampling import SamplingParams

    (out,) = llm.generate(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    # The engine must have prefilled exactly the ids transformers gets, or the ratio is moot.
    if out.stats.prompt_tokens != expected_tokens:
        raise RuntimeError(
            f"the engine prefilled {out.stats.prompt_tokens} tokens, expected {expected_tokens}"
        )
    return out.stats.prefill_tokens_per_s


def ours_decode(llm: Any, prompt: str, tokens: int) -> dict[str, Any]:
    """Greedy decode of TOKENS tokens after PROMPT.

    `wall_tokens_per_s` spans first to last token as the caller sees them (sampling and
    detokenizing included): the same clock as transformers' streamer timestamps, so it is the
    one compared. `step_tokens_per_s` is stats.engine_decode_tokens_per_s: the same tokens
    over the engine's decode calls alone, so the gap between the two is the host's time per
    token between calls (scheduling, sampling, detokenizing). `median_call_tokens_per_s` is
    one token per call at the median call's time, and `slow_call_share` what the calls over
    twice the median took beyond it (stalls from outside the process, docs/benchmarks.md).
    """
    from enginesmith.runtime.sampling import SamplingParams

    (out,) = llm.generate(prompt, SamplingParams(max_tokens=tokens, ignore_eos=True))
    s = out.stats
    steps = s.generated_tokens - 1
    wall = s.total_s - s.time_to_first_token_s
    return {
        "wall_tokens_per_s": steps / wall if wall > 0 and steps > 0 else 0.0,
        "step_tokens_per_s": s.engine_decode_tokens_per_s,
        "median_call_tokens_per_s": s.median_decode_call_tokens_per_s,
        "slow_call_share": s.slow_decode_call_share,
        "generated_tokens": s.generated_tokens,
        "token_ids": list(out.token_ids),
    }


def peer_prefill(model: Any, ids: list[int]) -> float:
    """Prefill tokens/s of transformers: one forward of IDS as generate() runs it (KV cache on,
    logits of the last position only)."""
    import torch

    input_ids = torch.tensor([ids])
    with torch.no_grad():
        start = time.perf_counter()
        model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        elapsed = time.perf_counter() - start
    return len(ids) / elapsed


class TokenClock:
    """A generate() streamer that only timestamps each put().

    generate() puts the prompt first, then every new token right after it is chosen, so
    times[1] is the first token (end of prefill) and times[-1] the last.
    """

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def peer_decode(model: Any, ids: list[int], tokens: int, pad_token_id: int) -> dict[str, Any]:
    """Greedy decode with model.generate(); tokens/s from first to last token (streamer clock),
    which excludes prefill exactly like the engine's decode rate."""
    import torch

    input_ids = torch.tensor([ids])
    clock = TokenClock()
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            pad_token_id=pad_token_id,
            streamer=clock,
        )
    new = out[0, len(ids) :].tolist()
    steps = len(clock.times) - 2  # minus the prompt put and the first token
    wall = clock.times[-1] - clock.times[1] if steps > 0 else 0.0
    return {
        "wall_tokens_per_s": steps / wall if wall > 0 else 0.0,
        "generated_tokens": len(new),
        "token_ids": new,
    }


# --- setup ----------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def default_engine_dir() -> Path:
    from enginesmith.compiler.presets import cache_dir

    return cache_dir() / "engines" / f"{DEFAULT_MODEL}-bench"


def cached_engine(config: Any, rebuild: bool = False, check_stale: bool = True) -> Path:
    """CONFIG.output (a compiler.config.BuildConfig), built when it is missing, when REBUILD,
    or (CHECK_STALE) when the engine there is stale: built by other compiler code (the
    manifest's compiler_fingerprint) or with other build settings. Benchmarks of cached
    engines must measure what the current compiler builds."""
    import dataclasses

    from enginesmith.compiler.artifact import stale_reason
    from enginesmith.runtime.errors import EngineDirError

    path = config.output.expanduser()
    if path.exists() and not (path / "manifest.json").is_file():
        raise EngineDirError(f"{path} exists but has no manifest.json: remove it or pass another")
    if rebuild:
        reason: str | None = "--rebuild"
    elif check_stale:
        reason = stale_reason(path, config)
    else:
        reason = None if (path / "manifest.json").is_file() else "no engine there yet"
    if reason is None:
        return path
    from enginesmith.compiler.build import build

    log(f"building {path} ({reason}; about a minute)")
    build(dataclasses.replace(config, output=path, force=True), log=log)
    return path


def command_line() -> str:
    """The command as typed (/proc/self/cmdline keeps `-m module`; sys.argv does not)."""
    try:
        raw = Path("/proc/self/cmdline").read_bytes()
        args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    except OSError:
        args = [sys.executable, *sys.argv]
    return shlex.join(args)


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def rss_bytes() -> int:
    """This process's resident memory (VmRSS), in bytes; 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "enginesmith_threads_env": os.environ.get("ENGINESMITH_THREADS"),
        "versions": {
            name: package_version(name)
            for name in ("enginesmith", "torch", "onnxruntime", "transformers", "numpy", "onnx")
        },
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


# --- the run --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description=(
            "Benchmark prefill and batch-1 decode of an engine against Hugging Face transformers "
            "on the same weights, and decode against the memory-bandwidth bound (the weights and "
            "the KV cache a decoded token reads, over the read bandwidth measured in the same "
            "run). Prints a table and writes every raw sample to a JSON file."
        ),
    )
    p.add_argument(
        "--engine",
        type=Path,
        metavar="DIR",
        help="engine directory to benchmark; built from the smollm2-135m preset if it does not "
        "exist (default: <cache>/engines/smollm2-135m-bench)",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=3,
        metavar="N",
        help="timed repetitions of each measurement after one warm-up; the table shows the "
        "median [min-max] (default: 3, minimum 1)",
    )
    p.add_argument(
        "--prefill-tokens",
        type=int,
        default=512,
        metavar="N",
        help="length of the prefill prompt in tokens, real text from Python's docs (default: 512)",
    )
    p.add_argument(
        "--decode-tokens",
        type=int,
        default=256,
        metavar="N",
        help="greedy tokens to decode at batch 1 after the decode prompt (default: 256)",
    )
    p.add_argument(
        "--decode-prompt-tokens",
        type=int,
        default=DECODE_PROMPT_TOKENS,
        metavar="N",
        help=f"real-text prompt length before decode (default: {DECODE_PROMPT_TOKENS})",
    )
    p.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="where to write the results (default: <cache>/bench/decode-<timestamp>.json)",
    )
    p.add_argument(
        "--skip-transformers",
        action="store_true",
        help="do not measure transformers (no transformers model is loaded; no ratios)",
    )
    p.add_argument(
        "--skip-unfused",
        action="store_true",
        help="do not measure the unfused ONNX export run by ONNX Runtime",
    )
    p.add_argument(
        "--unfused-dir",
        type=Path,
        metavar="DIR",
        help="where the unfused export is cached; exported on first use, about a minute "
        "(default: <cache>/engines/<model>-unfused)",
    )
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.runs < 1:
        p.error(f"--runs must be >= 1 (got {args.runs})")
    if args.prefill_tokens < 1:
        p.error(f"--prefill-tokens must be >= 1 (got {args.prefill_tokens})")
    if args.decode_prompt_tokens < 1:
        p.error(f"--decode-prompt-tokens must be >= 1 (got {args.decode_prompt_tokens})")
    if args.decode_tokens < 2:
        p.error(
            f"--decode-tokens must be >= 2: decode speed excludes the first (got {args.decode_tokens})"
        )


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Every measurement of one benchmark run, as the JSON-able result dict."""
    from enginesmith.compiler.config import BuildConfig
    from enginesmith.runtime.errors import InvalidRequestError
    from enginesmith.runtime.llm import LLM
    from enginesmith.runtime.sampling import SamplingParams

    engine_dir = cached_engine(
        BuildConfig(model=DEFAULT_MODEL, output=args.engine or default_engine_dir()),
        check_stale=args.engine is None,  # an engine the user names is measured as it is
    )
    bandwidth = {"before": measure_bandwidth()}  # before any model takes memory or cache

    log(f"loading engine {engine_dir}")
    rss_before = rss_bytes()
    llm = LLM(engine_dir)
    llm.generate(["Hello"], SamplingParams(max_tokens=4))  # first steps allocate ORT's arenas
    rss_loaded = rss_bytes() - rss_before
    max_seq = llm.max_seq_len
    if args.prefill_tokens >= max_seq or args.decode_prompt_tokens + args.decode_tokens >= max_seq:
        raise InvalidRequestError(
            f"this engine holds {max_seq} tokens per sequence: lower --prefill-tokens or "
            "--decode-tokens"
        )
    tok = llm.tokenizer

    def encode(s: str) -> list[int]:
        return tok(s).input_ids  # exactly what LLM.generate feeds the engine

    def decode(ids: list[int]) -> str:
        return str(tok.decode(ids))

    prefill_prompt, prefill_ids = real_text_prompt(encode, decode, args.prefill_tokens)
    decode_prompt, decode_ids = real_text_prompt(encode, decode, args.decode_prompt_tokens)
    source = llm.manifest.get("source", {}).get("model", DEFAULT_MODEL)

    unfused = None
    if not args.skip_unfused:
        from enginesmith.compiler.presets import cache_dir
        from enginesmith.scripts.benchmarks.unfused_baseline import (
            UnfusedRunner,
            ensure_unfused_export,
        )

        default_dir = cache_dir() / "engines" / f"{Path(str(source)).name}-unfused"
        unfused = UnfusedRunner(ensure_unfused_export(source, args.unfused_dir or default_dir, log))

    from enginesmith.scripts.benchmarks.matmul_floor import MatMulFloor, weight_matmul_shapes

    floor_shapes = weight_matmul_shapes(engine_dir / llm.manifest["files_by_role"]["model"])
    floor = MatMulFloor(floor_shapes) if floor_shapes else None

    peer = None
    if not args.skip_transformers:
        from enginesmith.compiler.sources import load_model

        log(f"loading transformers model {source}")
        peer = load_model(source)
        peer.model.eval()

    # Keys and values per cached token of each implementation's cache (the bound's KV part).
    kv_cached = {"ours": int(llm.manifest["kv_cache"]["bytes_per_token"])}
    if unfused is not None:
        kv_cached["unfused"] = unfused.kv_bytes_per_cached_token
    if peer is not None:
        kv_cached["transformers"] = torch_kv_bytes_per_cached_token(peer.model)

    samples: dict[str, list[float]] = {
        "ours_prefill": [],
        "ours_decode": [],
        "ours_decode_step_only": [],
        "ours_decode_median_call": [],
        "ours_decode_slow_call_share": [],
        "transformers_prefill": [],
        "transformers_decode": [],
        "unfused_prefill": [],
        "unfused_decode": [],
        "matmul_floor_decode": [],
    }
    last: dict[str, Any] = {}
    brackets: list[tuple[float, float]] = []  # (before, after) our decodes, bytes/s
    for rep in range(args.runs + 1):
        label = "warm-up" if rep == 0 else f"run {rep}/{args.runs}"
        log(f"{label}: prefill {len(prefill_ids)} tokens, decode {args.decode_tokens} tokens")
        # Interleaved: ours, unfused, transformers for each phase: a noisy second hits all.
        p_ours = ours_prefill(llm, prefill_prompt, len(prefill_ids))
        p_unfused = unfused.prefill(prefill_ids) if unfused else None
        p_peer = peer_prefill(peer.model, prefill_ids) if peer else None
        # Our decodes (~5 s) between two bandwidth samples: which level they ran at.
        before = read_bandwidth()
        d_ours = ours_decode(llm, decode_prompt, args.decode_tokens)
        after = read_bandwidth()
        d_unfused = unfused.decode(decode_ids, args.decode_tokens) if unfused else None
        d_floor = floor.tokens_per_s() if floor else None
        d_peer = (
            peer_decode(peer.model, decode_ids, args.decode_tokens, tok.eos_token_id or 0)
            if peer
            else None
        )
        last = {
            "ours": d_ours,
            "transformers": d_peer,
            "unfused": d_unfused,
        }
        if rep == 0:
            continue
        # Other guests on the host share the memory bus and come and go: sampling bandwidth in
        # every repetition shows how contended each one was (the bound uses the best pass).
        bandwidth[f"run {rep}"] = measure_bandwidth(reps=BANDWIDTH_REPS // 2)
        brackets.append((before, after))
        samples["ours_prefill"].append(p_ours)
        samples["ours_decode"].append(d_ours["wall_tokens_per_s"])
        samples["ours_decode_step_only"].append(d_ours["step_tokens_per_s"])
        samples["ours_decode_median_call"].append(d_ours["median_call_tokens_per_s"])
        samples["ours_decode_slow_call_share"].append(d_ours["slow_call_share"])
        if p_peer is not None and d_peer is not None:
            samples["transformers_prefill"].append(p_peer)
            samples["transformers_decode"].append(d_peer["wall_tokens_per_s"])
        if d_floor is not None:
            samples["matmul_floor_decode"].append(d_floor)
        if p_unfused is not None and d_unfused is not None:
            samples["unfused_prefill"].append(p_unfused)
            samples["unfused_decode"].append(d_unfused["wall_tokens_per_s"])

    bandwidth["after"] = measure_bandwidth()
    result = _results(
        args,
        argv,
        engine_dir,
        llm,
        peer,
        prefill_ids,
        decode_ids,
        samples,
        last,
        bandwidth,
        brackets,
        kv_cached,
    )
    kv = llm.manifest["kv_cache"]
    result["memory"] = {
        "rss_added_by_engine_load_bytes": rss_loaded,
        "weight_bytes_on_disk": engine_weight_bytes(engine_dir, llm.manifest).total_bytes,
        "kv_cache_bytes": int(kv["bytes_per_token"]) * llm.manifest["max_batch"] * max_seq,
    }
    return result


def _results(
    args: argparse.Namespace,
    argv: list[str],
    engine_dir: Path,
    llm: Any,
    peer: Any,
    prefill_ids: list[int],
    decode_ids: list[int],
    samples: dict[str, list[float]],
    last: dict[str, Any],
    bandwidth: dict[str, Any],
    brackets: list[tuple[float, float]],
    kv_cached: dict[str, int],
) -> dict[str, Any]:
    """Summaries, ratios and the bandwidth bound from the raw samples."""
    summary = {k: summarize(v) for k, v in samples.items() if v}
    all_bw: dict[str, list[float]] = {}
    for phase in bandwidth.values():
        for method, values in phase["samples_bytes_per_s"].items():
            all_bw.setdefault(method, []).extend(values)
    bw_method, bw = best_bandwidth(all_bw)
    weights = {"ours": engine_weight_bytes(engine_dir, llm.manifest)}
    if peer:
        weights["transformers"] = torch_weight_bytes(peer.model)
    if samples.get("unfused_decode"):
        weights["unfused"] = weights["ours"]  # the same fp32 weights, before packing
    if samples.get("matmul_floor_decode"):
        weights["matmul_floor"] = weights["ours"]  # the same shapes (random values)
    # The host's bandwidth flips between levels: each repetition against the bandwidth sampled
    # right after it, besides the conservative best-pass bound.
    run_bw = [
        best_bandwidth(bandwidth[f"run {i + 1}"]["samples_bytes_per_s"])[1]
        for i in range(len(samples["ours_decode"]))
    ]

    def med(key: str) -> float | None:
        return summary[key]["median"] if key in summary else None

    def fractions(decodes: list[float], bytes_per_token: int, steady: bool) -> dict[str, Any]:
        """DECODES (tok/s per repetition) over the best-pass bound, over each repetition's own,
        and (STEADY: our decodes, the ones bracketed by bandwidth passes) over the steady
        repetitions', for a bound of BYTES_PER_TOKEN."""
        per_run = [
            d / bound_tokens_per_s(b, bytes_per_token)
            for d, b in zip(decodes, run_bw, strict=False)
        ]
        out = {
            "bound_tokens_per_s": bound_tokens_per_s(bw, bytes_per_token),
            "decode_fraction_of_bound": ratio(
                statistics.median(decodes) if decodes else None,
                bound_tokens_per_s(bw, bytes_per_token),
            ),
            "decode_fraction_of_same_run_bound": summarize(per_run) if per_run else None,
        }
        if steady:
            held = steady_fractions(decodes, brackets, bytes_per_token)
            out["decode_fraction_of_steady_bound"] = summarize(held) if held else None
            out["steady_runs"] = len(held)
        return out

    impl = {}
    for name in ("ours", "unfused", "matmul_floor", "transformers"):
        if name not in weights:
            continue
        # The MatMul floor reads weights only; a decode also reads its KV cache.
        kv = kv_read_bytes_per_decoded_token(
            kv_cached.get(name, 0), len(decode_ids), args.decode_tokens
        )
        total = weights[name].per_token + kv
        decodes = samples.get(f"{name}_decode", [])
        bracketed = name == "ours"
        impl[name] = {
            "prefill_tokens_per_s": summary.get(f"{name}_prefill"),
            "decode_tokens_per_s": summary.get(f"{name}_decode"),
            "weights": {**asdict(weights[name]), "bytes_per_token": weights[name].per_token},
            "kv_bytes_per_cached_token": kv_cached.get(name, 0),
            "kv_read_bytes_per_token": kv,
            "bytes_per_token": total,
            # Bandwidth the decode actually drew, if weights and KV were its only traffic.
            "decode_effective_bytes_per_s": (
                decode * total if (decode := med(f"{name}_decode")) else None
            ),
            **fractions(decodes, total, bracketed),
            # The same against the weights alone (the bound before the KV cache was counted).
            "weights_only": fractions(decodes, weights[name].per_token, bracketed),
        }
    impl["ours"]["decode_step_only_tokens_per_s"] = summary.get("ours_decode_step_only")
    # Host time per token between the engine's decode calls, per repetition.
    host_ms = [
        1e3 / wall - 1e3 / step
        for wall, step in zip(samples["ours_decode"], samples["ours_decode_step_only"], strict=True)
        if wall > 0 and step > 0
    ]
    impl["ours"]["decode_host_ms_per_token"] = summarize(host_ms) if host_ms else None
    # The engine at its median decode call, against the same bounds as the caller's rate.
    median_call = samples.get("ours_decode_median_call", [])
    if median_call:
        impl["ours"]["decode_median_call"] = {
            "tokens_per_s": summarize(median_call),
            **fractions(median_call, impl["ours"]["bytes_per_token"], steady=True),
            "slow_call_share": summarize(samples["ours_decode_slow_call_share"]),
        }
    peer_tokens = last["transformers"]["token_ids"] if last.get("transformers") else None
    unfused_tokens = last["unfused"]["token_ids"] if last.get("unfused") else None
    return {
        "benchmark": "decode-prefill-vs-transformers",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command_line(),
        "cwd": os.getcwd(),
        "argv": argv,
        "engine_dir": str(engine_dir),
        "model": llm.manifest.get("source", {}).get("model"),
        "machine": machine_info(),
        "settings": {
            "runs": args.runs,
            "warmup_runs": 1,
            "batch": 1,
            "prefill_prompt_tokens": len(prefill_ids),
            "decode_prompt_tokens": len(decode_ids),
            "unfused": "plain ONNX export, ORT_ENABLE_ALL, Concat KV cache fed back each step",
            "matmul_floor": "the engine's weight MatMul shapes alone, chained; median of 64 steps",
            "decode_tokens": args.decode_tokens,
            "prompt_source": "pydoc_data.topics, sorted keys",
            "ours_prefill_timing": "stats.prefill_tokens_per_s (engine calls of the prompt)",
            "ours_decode_timing": "(generated-1)/(total_s - time_to_first_token_s)",
            "transformers_prefill_timing": "one model() forward, no_grad, use_cache, logits_to_keep=1",
            "transformers_decode_timing": "generate() streamer timestamps, first to last token",
        },
        "bandwidth": {
            "best_bytes_per_s": bw,
            "best_method": bw_method,
            "best_bytes_per_s_by_phase": {
                phase: best_bandwidth(p["samples_bytes_per_s"])[1] for phase, p in bandwidth.items()
            },
            "phases": bandwidth,
            "decode_brackets_bytes_per_s": brackets,
            "steady_tolerance": STEADY_TOLERANCE,
        },
        "implementations": impl,
        "ratios": {
            "prefill": ratio(med("ours_prefill"), med("transformers_prefill")),
            "decode": ratio(med("ours_decode"), med("transformers_decode")),
            "unfused_prefill": ratio(med("unfused_prefill"), med("transformers_prefill")),
            "unfused_decode": ratio(med("unfused_decode"), med("transformers_decode")),
            "fused_vs_unfused_prefill": ratio(med("ours_prefill"), med("unfused_prefill")),
            "fused_vs_unfused_decode": ratio(med("ours_decode"), med("unfused_decode")),
            "fused_vs_matmul_floor_decode": ratio(med("ours_decode"), med("matmul_floor_decode")),
        },
        "greedy_agreement": {
            "tokens_compared": args.decode_tokens,
            "common_prefix": (
                common_prefix_len(last["ours"]["token_ids"], peer_tokens) if peer_tokens else None
            ),
            "unfused_common_prefix": (
                common_prefix_len(unfused_tokens, peer_tokens)
                if peer_tokens and unfused_tokens
                else None
            ),
        },
    }


def render(result: dict[str, Any]) -> str:
    """The human-readable report: a settings header and the table."""
    s = result["settings"]
    bw = result["bandwidth"]
    ours = result["implementations"]["ours"]
    peer = result["implementations"].get("transformers")
    r = result["ratios"]
    by_phase = list(bw.get("best_bytes_per_s_by_phase", {}).values()) or [bw["best_bytes_per_s"]]
    headers = [
        "engine",
        "prefill tok/s",
        "decode tok/s",
        "prefill vs hf",
        "decode vs hf",
        "% of bound",
        "% of same-run bound",
    ]
    labels = {
        "ours": "enginesmith (fused)",
        "unfused": "unfused export (onnxruntime)",
        "matmul_floor": "MatMul floor (weights only)",
        "transformers": "transformers (torch)",
    }
    rows = []
    for name, label in labels.items():
        impl = result["implementations"].get(name)
        if impl is None:
            continue
        same_run = impl.get("decode_fraction_of_same_run_bound")
        prefill_vs, decode_vs = {
            "ours": (r["prefill"], r["decode"]),
            "unfused": (r.get("unfused_prefill"), r.get("unfused_decode")),
            "matmul_floor": (None, None),
            "transformers": (1.0 if peer else None, 1.0 if peer else None),
        }[name]
        rows.append(
            [
                label,
                format_cell(impl["prefill_tokens_per_s"], 0),
                format_cell(impl["decode_tokens_per_s"]),
                format_ratio(prefill_vs),
                format_ratio(decode_vs),
                format_percent(impl["decode_fraction_of_bound"]),
                format_percent(same_run["median"]) if same_run else "-",
            ]
        )
    step = ours["decode_step_only_tokens_per_s"]
    agree = result["greedy_agreement"]["common_prefix"]
    lines = [
        f"model {result['model']}, fp32, batch 1, {s['runs']} runs after 1 warm-up: "
        "median [min-max]",
        f"prefill: {s['prefill_prompt_tokens']}-token prompt; decode: {s['decode_tokens']} greedy "
        f"tokens after a {s['decode_prompt_tokens']}-token prompt",
        f"memory bandwidth {bw['best_bytes_per_s'] / 1e9:.1f} GB/s ({bw['best_method']}, best pass;"
        f" best per phase {min(by_phase) / 1e9:.1f}-{max(by_phase) / 1e9:.1f} GB/s)",
        f"read per decoded token: weights {ours['weights']['bytes_per_token'] / 1e6:.1f} MB + "
        f"KV cache {ours['kv_read_bytes_per_token'] / 1e6:.1f} MB (mean "
        f"{s['decode_prompt_tokens'] + s['decode_tokens'] // 2} cached tokens) = "
        f"{ours['bytes_per_token'] / 1e6:.1f} MB -> "
        f"bound {ours['bound_tokens_per_s']:.1f} tok/s",
        "",
        format_table(headers, rows),
        "",
        "engine decode counting its decode calls only (stats.engine_decode_tokens_per_s): "
        f"{format_cell(step)}; host time per token between the calls: "
        f"{format_cell(ours.get('decode_host_ms_per_token'), 2)} ms",
    ]
    if median := ours.get("decode_median_call"):
        steady_median = median["decode_fraction_of_steady_bound"]
        lines.append(
            "engine decode at its median decode call (stats.median_decode_call_tokens_per_s): "
            f"{format_cell(median['tokens_per_s'])}; of the same-run bound "
            f"{format_cell(_percent_summary(median['decode_fraction_of_same_run_bound']))}%, of the "
            "steady bound "
            + (f"{format_cell(_percent_summary(steady_median))}%" if steady_median else "-")
            + "; calls over twice the median lost "
            f"{format_cell(_percent_summary(median['slow_call_share']), 1)}% of the decode calls' time"
        )
    if memory := result.get("memory"):
        lines.append(
            f"memory added by loading the engine (RSS): {memory['rss_added_by_engine_load_bytes'] / 2**20:.0f} "
            f"MiB (weights {memory['weight_bytes_on_disk'] / 2**20:.0f} MiB on disk, KV slots "
            f"{memory['kv_cache_bytes'] / 2**20:.0f} MiB)"
        )
    if r.get("fused_vs_matmul_floor_decode") is not None:
        lines.append(
            "fused decode vs the MatMul floor (its own weight MatMuls, nothing else): "
            f"{format_percent(r['fused_vs_matmul_floor_decode'])}"
        )
    steady = ours.get("decode_fraction_of_steady_bound")
    if "steady_runs" in ours:
        lines.append(
            f"runs whose bandwidth held through our decodes (passes just before and after within "
            f"{bw.get('steady_tolerance', STEADY_TOLERANCE):.0%}): {ours['steady_runs']} of "
            f"{s['runs']}; decode at that bound: "
            + (f"{format_cell(_percent_summary(steady))}%" if steady else "-")
        )
    lines.append(_weights_only_line(result))
    if r.get("fused_vs_unfused_decode") is not None:
        lines.append(
            f"fused vs unfused export: prefill {format_ratio(r['fused_vs_unfused_prefill'])}, "
            f"decode {format_ratio(r['fused_vs_unfused_decode'])}"
        )
    if agree is not None:
        lines.append(
            f"greedy tokens identical to transformers: first {agree} of {s['decode_tokens']}"
        )
    unfused_agree = result["greedy_agreement"].get("unfused_common_prefix")
    if unfused_agree is not None:
        lines.append(
            f"unfused export's greedy tokens identical to transformers: first {unfused_agree} "
            f"of {s['decode_tokens']}"
        )
    return "\n".join(lines)


def _weights_only_line(result: dict[str, Any]) -> str:
    """Our decodes against the bound of the weights alone (the KV cache not counted)."""
    ours = result["implementations"]["ours"]
    w = ours["weights_only"]
    parts = [f"{format_percent(w['decode_fraction_of_same_run_bound']['median'])} of same-run"]
    if w.get("decode_fraction_of_steady_bound"):
        parts.append(
            f"{format_cell(_percent_summary(w['decode_fraction_of_steady_bound']))}% steady"
        )
    return (
        f"against the weights alone ({ours['weights']['bytes_per_token'] / 1e6:.1f} MB, bound "
        f"{w['bound_tokens_per_s']:.1f} tok/s): " + ", ".join(parts)
    )


def _percent_summary(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary[k] * 100 for k in ("median", "min", "max")}


def run_record(args: argparse.Namespace, **fields: Any) -> dict[str, Any]:
    """The JSON record of a measuring script's run: its command line, its arguments (as
    strings), then FIELDS."""
    return {"command": command_line(), "args": {k: str(v) for k, v in vars(args).items()}, **fields}


def save_results(result: dict[str, Any], json_path: Path | None, prefix: str) -> Path:
    """Write RESULT as JSON to JSON_PATH, or to the cache's bench/PREFIX-<timestamp>.json."""
    from enginesmith.compiler.presets import cache_dir

    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = (json_path or cache_dir() / "bench" / f"{prefix}-{stamp}.json").expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def bench_main(
    argv: list[str] | None,
    parser: argparse.ArgumentParser,
    check: Callable[[argparse.ArgumentParser, argparse.Namespace], None],
    run_fn: Callable[[argparse.Namespace, list[str]], dict[str, Any]],
    render_fn: Callable[[dict[str, Any]], str],
    prefix: str,
) -> int:
    """Shared entry point of the benchmark scripts: parse, check, run, save JSON, print."""
    from enginesmith.runtime.errors import EnginesmithError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    check(parser, args)
    try:
        result = run_fn(args, argv)
    except EnginesmithError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    path = save_results(result, args.json, prefix)
    print(render_fn(result))
    print(f"\nresults: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `scripts/bench` and `python -m enginesmith.scripts.benchmarks.bench`."""
    return bench_main(argv, build_parser(), _check_args, run, render, "decode")


if __name__ == "__main__":
    raise SystemExit(main())
