"""The fast step (the fused ONNX Runtime engine, in-place KV slots) against transformers over a
grid of model shapes and step shapes: the differential test every fast path answers to.

Model grid (one tiny random engine per point, 1-2 layers, non-zero random biases): biases (none,
q/k/v as Qwen2, q/k/v/o as Llama's attention_bias) x heads (MHA 4:4, GQA 4:2, GQA 8:2, MQA 6:1)
x head_dim (16, 32, 64, 128) x sliding window (off, 8) x tied / separate LM head, with hidden,
intermediate and vocab sizes that are not multiples of 8. An engine per combination would be 384
builds; `covering_grid()` picks a covering design instead: every value of every axis, and every
pair of values of the axes that interact in the attention code (biases, heads, window,
head_dim) and of those with the LM head's tying, except heads x head_dim.

Step grid (the same on every engine, `STEPS`): rows 1-4 at different cached lengths from start
slots 0, 1 and 2; prefill, chunked prefill on a cached past, decode, verification rows (several
new tokens on a cached past, causal within the row, as speculative decoding sends), idle rows,
and subsets of the logits rows; cached lengths run past the window.

Reference: transformers' logits for the same weights. Each slot's tokens are run through the
model once as one sequence; by causality its logits at position p are what the engine must give
for that slot's position p, whatever steps the engine took to get there. Tolerance: relative to
the largest |logit| of the reference, LOGITS_RTOL; measured on this grid: at most ~1e-6 (fp32).
Greedy tokens of a batched `LLM.generate` must equal transformers' `generate` on every point.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from enginesmith import LLM, SamplingParams
from enginesmith.compiler import presets
from enginesmith.runtime.engine_dir import read_manifest
from enginesmith.runtime.executors import open_executor
from tests.conftest import PROMPTS, build_quiet, check_biases_are_nonzero

# Relative to the largest |reference logit|; fp32 engines measure <= ~1e-6 on this grid.
LOGITS_RTOL = 1e-5
GREEDY_TOKENS = 8
WINDOW = 8
MAX_BATCH = 5  # slots: a 4-row step can start at slot 1
MAX_SEQ_LEN = 64

BIASES = ("none", "qkv", "qkvo")
HEADS = {"MHA": (4, 4), "GQA2": (4, 2), "GQA4": (8, 2), "MQA": (6, 1)}  # name -> (q, kv)
HEAD_DIMS = (16, 32, 64, 128)
WINDOWS = (None, WINDOW)
TIED = (True, False)
HIDDEN_SIZES = (60, 84, 100, 76, 90, 102, 88)
AXES: dict[str, tuple[Any, ...]] = {
    "bias": BIASES,
    "heads": tuple(HEADS),
    "head_dim": HEAD_DIMS,
    "window": WINDOWS,
    "tied": TIED,
}
# Axis pairs whose every combination of values must appear (heads x head_dim would need 16
# engines on its own).
PAIRED_AXES = [
    ("bias", "heads"),
    ("bias", "window"),
    ("heads", "window"),
    ("bias", "head_dim"),
    ("window", "head_dim"),
    ("bias", "tied"),
    ("heads", "tied"),
]


@dataclasses.dataclass(frozen=True)
class GridPoint:
    bias: str
    heads: str
    head_dim: int
    window: int | None
    tied: bool

    @property
    def id(self) -> str:
        window = f"win{self.window}" if self.window else "full"
        return f"{self.bias}-{self.heads}-d{self.head_dim}-{window}-{'tied' if self.tied else 'untied'}"

    def architecture(self) -> str:
        """Llama has biases only as q/k/v/o (attention_bias) and no window; Mistral has a window
        and no biases; Qwen2 has q/k/v biases and an optional window."""
        if self.bias == "qkv":
            return "qwen2"
        return "mistral" if self.window else "llama"

    def config_fields(self, index: int) -> dict[str, Any]:
        num_heads, num_kv_heads = HEADS[self.heads]
        # transformers wants hidden % num_heads == 0; otherwise hidden is not a multiple of 8
        # (8 query heads force one) nor num_heads * head_dim.
        sizes = [h for h in HIDDEN_SIZES if h % num_heads == 0]
        hidden = sizes[index % len(sizes)]
        fields = presets.tiny_config_fields(
            hidden_size=hidden,
            intermediate_size=2 * hidden + 12,
            num_hidden_layers=1 + index % 2,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=self.head_dim,
            tie_word_embeddings=self.tied,
            vocab_size=(1024, 1000)[index % 2],
        )
        arch = self.architecture()
        if arch == "llama":
            fields["attention_bias"] = self.bias == "qkvo"
        if self.window and arch == "qwen2":  # every layer windowed
            fields.update(use_sliding_window=True, sliding_window=self.window, max_window_layers=0)
        elif self.window:
            fields["sliding_window"] = self.window
        elif arch == "mistral":
            fields["sliding_window"] = None
        return fields


def valid(point: dict[str, Any]) -> bool:
    return not (point.get("bias") == "qkvo" and point.get("window"))  # Llama has no window


def covering_grid(axes: dict[str, tuple[Any, ...]] = AXES, pairs: list[tuple[str, str]] = PAIRED_AXES) -> list[GridPoint]:  # fmt: skip
    """A small set of grid points in which every value of every axis and every valid value pair
    of PAIRS appears (greedy covering design: each new point covers the most missing pairs;
    deterministic)."""
    names = list(axes)
    candidates = [
        dict(zip(names, values, strict=True)) for values in itertools.product(*axes.values())
    ]
    candidates = [c for c in candidates if valid(c)]

    def requirements(point: dict[str, Any]) -> set[tuple[Any, ...]]:
        singles = {(a, point[a]) for a in names}
        doubles = {(a, point[a], b, point[b]) for a, b in pairs}
        return singles | doubles

    missing = set().union(*(requirements(c) for c in candidates))
    chosen: list[dict[str, Any]] = []
    while missing:
        best = max(candidates, key=lambda c: len(requirements(c) & missing))
        chosen.append(best)
        missing -= requirements(best)
    return [GridPoint(**c) for c in chosen]


GRID = covering_grid()


# Steps run on every engine: (start slot, new tokens per row, which logits). Rows are slots
# start .. start + len - 1; 0 new tokens = an idle row. "all": every new position; "last":
# each active row's last; "subset": a few rows' last and some interior positions.
STEPS: list[tuple[int, list[int], str]] = [
    (1, [5, 13, 1, 9], "subset"),  # prefill, 4 rows of different lengths from slot 1
    (1, [3, 1, 4, 2], "all"),  # verification rows on a cached past (speculative decoding)
    (0, [6, 1, 0, 1, 1], "last"),  # a new prefill beside decodes, one idle row
    (2, [12, 1, 3], "all"),  # chunked prefill past the window beside a decode and a 3-token row
    (1, [1, 1, 1, 1], "subset"),  # 4-row decode from slot 1, logits of some rows only
    (0, [2], "all"),  # one row, two tokens
    (0, [1, 1, 1, 1, 1], "last"),  # every slot decodes
]


def run_steps(executor: Any, vocab: int, seed: int) -> tuple[dict[int, list[int]], list[tuple[int, int, np.ndarray]]]:  # fmt: skip
    """Run STEPS with random tokens; return each slot's tokens and (slot, position, logits) of
    every logits row the engine returned."""
    rng = np.random.default_rng(seed)
    tokens: dict[int, list[int]] = {slot: [] for slot in range(MAX_BATCH)}
    got: list[tuple[int, int, np.ndarray]] = []
    for start, counts, which in STEPS:
        rows, width = len(counts), max(counts)
        input_ids = np.zeros((rows, width), np.int64)  # right-padded
        position_ids = np.zeros((rows, width), np.int64)
        seqlens_k = np.zeros(rows, np.int32)
        wanted: list[tuple[int, int, int]] = []  # (flat index, slot, position)
        for r, new in enumerate(counts):
            slot = start + r
            past = len(tokens[slot])
            ids = rng.integers(3, vocab, new).tolist()
            input_ids[r, :new] = ids
            position_ids[r, :new] = np.arange(past, past + new)
            seqlens_k[r] = past + new - 1 if new else 0
            tokens[slot] += ids
            if new == 0:
                continue
            if which == "all":
                picks = list(range(new))
            elif which == "last" or r % 2:
                picks = [new - 1]
            else:  # subset: even rows only, their last position and one interior one
                picks = sorted({new // 2, new - 1})
            wanted += [(r * width + s, slot, past + s) for s in picks]
        logits = executor.step(
            start,
            input_ids,
            position_ids,
            seqlens_k,
            np.array(counts, np.int32),
            np.array([flat for flat, _, _ in wanted], np.int64),
        )
        assert logits.shape == (len(wanted), vocab)
        got += [(slot, pos, row) for (_, slot, pos), row in zip(wanted, logits, strict=True)]
    return tokens, got


@pytest.fixture(scope="module")
def grid_engine(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """grid_engine(index) -> (HF model directory, engine directory) of GRID[index]."""
    root = tmp_path_factory.mktemp("grid")
    built: dict[int, tuple[Path, Path]] = {}

    def get(index: int) -> tuple[Path, Path]:
        if index not in built:
            point = GRID[index]
            source = root / f"{point.id}-hf"
            presets.write_tiny_model(
                source, point.architecture(), point.config_fields(index), seed=index
            )
            engine = build_quiet(
                str(source), root / point.id, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ_LEN
            )
            built[index] = (source, engine)
        return built[index]

    return get


def test_grid_covers_every_value_and_every_pair() -> None:
    points = [dataclasses.asdict(p) for p in GRID]
    assert len(GRID) <= 16, f"{len(GRID)} engines: the grid costs too much build time"
    for axis, values in AXES.items():
        assert {p[axis] for p in points} == set(values), axis
    for a, b in PAIRED_AXES:
        seen = {(p[a], p[b]) for p in points}
        possible = {(x, y) for x in AXES[a] for y in AXES[b] if valid({"bias": "none", a: x, b: y})}
        assert seen == possible, (a, b, possible - seen)
    print(f"{len(GRID)} grid points: " + ", ".join(p.id for p in GRID))


def reference_logits(model: Any, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()  # [len(ids), vocab]


@pytest.mark.parametrize("index", range(len(GRID)), ids=[p.id for p in GRID])
def test_fast_step_matches_transformers(index: int, grid_engine) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    point = GRID[index]
    source, engine = grid_engine(index)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    biases = check_biases_are_nonzero(model)
    assert bool(biases) == (point.bias != "none")
    assert getattr(model.config, "sliding_window", None) == point.window
    manifest = read_manifest(engine)
    assert manifest["model"]["head_dim"] == point.head_dim
    assert manifest["model"]["sliding_window"] == point.window

    executor = open_executor(engine, manifest)
    tokens, got = run_steps(executor, model.config.vocab_size, seed=index)
    reference = {slot: reference_logits(model, ids) for slot, ids in tokens.items() if ids}
    scale = max(float(np.abs(r).max()) for r in reference.values())
    diffs = [(float(np.abs(row - reference[slot][pos]).max()), slot, pos) for slot, pos, row in got]
    worst, slot, pos = max(diffs)
    print(
        f"{point.id}: {len(got)} logits rows in {len(STEPS)} steps; largest |diff| {worst:.2e} "
        f"(slot {slot}, position {pos}), relative {worst / scale:.2e} (limit {LOGITS_RTOL})"
    )
    assert worst <= LOGITS_RTOL * scale, (
        f"slot {slot} position {pos}: relative logit diff {worst / scale:.2e} > {LOGITS_RTOL}"
    )
    if point.window:  # some slot's sequence ran past the window
        assert max(len(ids) for ids in tokens.values()) > 2 * point.window


@pytest.mark.parametrize("index", range(len(GRID)), ids=[p.id for p in GRID])
def test_batched_greedy_matches_transformers(index: int, grid_engine) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    source, engine = grid_engine(index)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    llm = LLM(engine)
    params = SamplingParams(max_tokens=GREEDY_TOKENS, ignore_eos=True)
    outputs = llm.generate(list(PROMPTS), params)  # one batch: rows at different lengths
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        ids = llm.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=GREEDY_TOKENS,
                min_new_tokens=GREEDY_TOKENS,
            )[0, ids.shape[1] :].tolist()
        assert out.token_ids == ref, f"{prompt!r}: ours {out.token_ids} != transformers {ref}"
