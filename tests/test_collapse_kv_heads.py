"""--kv-heads (passes/collapse_kv_heads.py): collapsing KV heads by mean-pooling groups.

The reference for every collapsed engine is independent of the pass: a transformers model with
num_key_value_heads = N whose k/v projections are mean-pooled per group (and, for similarity
grouping, whose query heads and output projection are permuted so groups are contiguous), run
by transformers' own GQA attention.
"""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest
import torch

from enginesmith.compiler import presets, quality
from enginesmith.passes.base import PassError
from enginesmith.passes.collapse_kv_heads import (
    CollapseKVHeadsPass,
    contiguous_groups,
    partition_count,
    pooling_error,
    similarity_groups,
)
from enginesmith.runtime.engine_dir import read_manifest
from enginesmith.runtime.errors import BuildError
from enginesmith.runtime.ort_cpu_executor import OrtCpuExecutor
from tests.conftest import build_quiet

TOKENS = 96  # prompt tokens compared against the reference
LOGITS_RTOL = 2e-4  # of the largest |logit|; fp32 engines differ by ~1e-6


# --- helpers --------------------------------------------------------------------------------------


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def pooled_reference(model: Any, groups_per_layer: list[list[list[int]]]) -> Any:
    """MODEL with each layer's KV heads mean-pooled by GROUPS (transformers GQA semantics)."""
    config = copy.deepcopy(model.config)
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, _head_dim(config)
    n = len(groups_per_layer[0])
    config.num_key_value_heads = n
    state = {k: v.clone() for k, v in model.state_dict().items()}
    per_kv = heads // kv_heads
    for layer, groups in enumerate(groups_per_layer):
        prefix = f"model.layers.{layer}.self_attn."
        for name in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
            if prefix + name in state:
                t = state[prefix + name]
                split = t.reshape(kv_heads, d, *t.shape[1:])
                state[prefix + name] = torch.stack([split[g].mean(0) for g in groups]).reshape(
                    n * d, *t.shape[1:]
                )
        # Query head q reads KV head q // per_kv: bring each group's query heads together.
        order = [k * per_kv + i for g in groups for k in g for i in range(per_kv)]
        for name in ("q_proj.weight", "q_proj.bias"):
            if prefix + name in state:
                t = state[prefix + name]
                state[prefix + name] = t.reshape(heads, d, *t.shape[1:])[order].reshape(t.shape)
        w = state[prefix + "o_proj.weight"]  # [hidden, heads * d]
        state[prefix + "o_proj.weight"] = w.reshape(-1, heads, d)[:, order].reshape(w.shape)
    reference = type(model)(config).eval()
    reference.load_state_dict(state)
    return reference


def text_ids(tokenizer: Any, n: int = TOKENS) -> list[int]:
    return tokenizer(quality.heldout_text()).input_ids[:n]


def engine_logits(engine: Path, ids: list[int]) -> np.ndarray:
    return quality.engine_logits(OrtCpuExecutor(engine, read_manifest(engine)), ids)


def assert_matches(engine: Path, model: Any, ids: list[int]) -> None:
    ours = engine_logits(engine, ids)
    ref = quality.reference_logits(model, ids)
    relative = np.abs(ours - ref).max() / np.abs(ref).max()
    assert relative < LOGITS_RTOL, relative
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.98


def collapse_report(engine: Path) -> dict[str, Any]:
    report = json.loads((engine / "build_report.json").read_text())
    return next(p for p in report["passes"] if p["name"] == "collapse-kv-heads")


def write_mha_llama(out: Path, edit: Any = None) -> Path:
    """A random MHA llama (4 query heads, 4 KV heads) HF directory; EDIT(model) may change it."""
    fields = {**presets._TINY_COMMON, "num_key_value_heads": 4, "tie_word_embeddings": False}
    presets.write_tiny_model(out, "llama", fields)
    if edit is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.no_grad():
            edit(model)
        model.save_pretrained(out, safe_serialization=True)
    return out


def copy_kv_heads(model: Any, pairs: list[tuple[int, int]]) -> None:
    """Make KV head b a copy of KV head a (K and V) in every layer, for each (a, b)."""
    d = _head_dim(model.config)
    for layer in model.model.layers:
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            for a, b in pairs:
                proj.weight[b * d : (b + 1) * d] = proj.weight[a * d : (a + 1) * d]


@pytest.fixture(scope="module")
def mha_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mha")
    return {
        "random": write_mha_llama(root / "random"),
        # KV heads 0 == 1 and 2 == 3: contiguous groups of identical heads.
        "pairs": write_mha_llama(root / "pairs", lambda m: copy_kv_heads(m, [(0, 1), (2, 3)])),
        # The same kind of model with heads permuted: 0 == 2 and 1 == 3.
        "permuted": write_mha_llama(
            root / "permuted", lambda m: copy_kv_heads(m, [(0, 2), (1, 3)])
        ),
    }


# --- grouping math --------------------------------------------------------------------------------


def test_pooling_error_is_the_pooled_activation_error() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 6, 8))  # tokens, heads, head_dim
    gram = np.einsum("tad,tbd->ab", x, x)
    groups = [[0, 4], [1, 2], [3, 5]]
    pooled = x.copy()
    for g in groups:
        pooled[:, g] = x[:, g].mean(axis=1, keepdims=True)
    direct = ((x - pooled) ** 2).sum() / (x**2).sum()
    assert abs(pooling_error(gram, groups) - direct) < 1e-12


def test_similarity_grouping_is_the_best_partition() -> None:
    rng = np.random.default_rng(1)
    for heads, target in ((6, 3), (6, 2), (8, 4), (8, 2)):
        a = rng.standard_normal((heads, heads))
        similarity = a @ a.T
        chosen = similarity_groups(similarity, target)
        score = sum(similarity[np.ix_(g, g)].sum() for g in chosen)
        size = heads // target
        best = max(
            sum(similarity[np.ix_(g, g)].sum() for g in np.array(p).reshape(target, size))
            for p in itertools.permutations(range(heads))
        )
        assert abs(score - best) < 1e-9 * abs(best)
    assert partition_count(4, 2) == 3 and partition_count(12, 4) == 15400
    # Equal similarity everywhere: ties keep the contiguous grouping.
    assert similarity_groups(np.ones((4, 4)), 2) == contiguous_groups(4, 2)


# --- identity and exact cases ---------------------------------------------------------------------


def test_current_kv_heads_is_an_exact_identity(tiny_engine, hf_models) -> None:  # type: ignore[no-untyped-def]
    plain = tiny_engine("tiny-llama")
    same = tiny_engine("tiny-llama", kv_heads=2)
    report = collapse_report(same)
    assert report["identity"] is True and report["modified"] is False
    measured = json.loads((same / "build_report.json").read_text())["quality"]
    # Reported like any --kv-heads build: no change beyond fp32 engine-vs-torch noise.
    assert abs(measured["perplexity_delta"]) < 1e-4 * measured["perplexity_reference"]
    assert read_manifest(same)["model"] == read_manifest(plain)["model"]
    ids = text_ids(hf_models("tiny-llama").tokenizer)
    assert np.array_equal(engine_logits(same, ids), engine_logits(plain, ids))


def test_identical_heads_collapse_without_changing_outputs(
    mha_dirs, engines_root, hf_models
) -> None:  # type: ignore[no-untyped-def]
    model_dir = mha_dirs["pairs"]
    engine = build_quiet(
        str(model_dir), engines_root / "pairs-kv2", kv_heads=2, verify=False, kv_recovery_minutes=0
    )
    loaded = hf_models(str(model_dir))
    assert_matches(engine, loaded.model, text_ids(loaded.tokenizer))  # the original model
    report = collapse_report(engine)
    assert report["reconstruction_error_mean"]["kv"] < 1e-12
    assert read_manifest(engine)["model"]["num_kv_heads"] == 2


def test_similarity_beats_contiguous_on_permuted_heads(mha_dirs, engines_root, hf_models) -> None:  # type: ignore[no-untyped-def]
    model_dir = mha_dirs["permuted"]
    engines = {
        g: build_quiet(
            str(model_dir),
            engines_root / f"perm-{g}",
            kv_heads=2,
            kv_grouping=g,
            kv_recovery_minutes=0,  # the ONNX pass's pooling is what these tests check
        )
        for g in ("contiguous", "similarity")
    }
    sim, contig = (collapse_report(engines[g]) for g in ("similarity", "contiguous"))
    assert sim["groups"] == [[[0, 2], [1, 3]]] * 2
    assert sim["reconstruction_error_mean"]["kv"] < 1e-12
    assert sim["reconstruction_error_mean_contiguous"] > 0.2
    assert contig["reconstruction_error_mean"]["kv"] > 0.2
    # Held-out perplexity (measured by the build): similarity is lossless here, contiguous not.
    quality_of = {
        g: json.loads((e / "build_report.json").read_text())["quality"] for g, e in engines.items()
    }
    assert abs(quality_of["similarity"]["perplexity_delta"]) < 1e-3
    assert quality_of["similarity"]["top1_agreement"] > 0.99
    assert quality_of["contiguous"]["perplexity_delta"] > 1.0
    loaded = hf_models(str(model_dir))
    assert_matches(engines["similarity"], loaded.model, text_ids(loaded.tokenizer))


# --- MHA -> GQA / MQA against the pooled reference ------------------------------------------------


@pytest.mark.parametrize(
    ("model", "kv_heads", "grouping"),
    [
        ("tiny-qwen2", 2, "similarity"),  # qwen2: q/k/v biases
        ("tiny-qwen2", 1, "contiguous"),
        ("mha-llama", 2, "similarity"),
        ("mha-llama", 1, "contiguous"),
    ],
)
def test_mha_collapses_to_gqa_and_mqa(  # type: ignore[no-untyped-def]
    model, kv_heads, grouping, mha_dirs, engines_root, hf_models
) -> None:
    source = str(mha_dirs["random"]) if model == "mha-llama" else model
    engine = build_quiet(
        source,
        engines_root / f"{model}-kv{kv_heads}-{grouping}",
        kv_heads=kv_heads,
        kv_grouping=grouping,
        verify=False,
        kv_recovery_minutes=0,
    )
    loaded = hf_models(source)
    assert loaded.config.num_key_value_heads == loaded.config.num_attention_heads == 4
    report = collapse_report(engine)
    layers = loaded.config.num_hidden_layers
    groups = report.get("groups") or [contiguous_groups(4, kv_heads)] * layers
    assert (
        report["kv_bytes_per_token_after"] * (4 // kv_heads) == report["kv_bytes_per_token_before"]
    )
    manifest = read_manifest(engine)
    assert manifest["model"]["num_kv_heads"] == kv_heads
    assert manifest["kv_cache"]["bytes_per_token"] == report["kv_bytes_per_token_after"]
    reference = pooled_reference(loaded.model, groups)
    assert_matches(engine, reference, text_ids(loaded.tokenizer))


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kv_heads", "message"),
    [(3, "does not divide the model's 4 KV heads"), (5, "is not below the model's 4 KV heads")],
)
def test_bad_kv_heads_is_a_clear_error(tmp_path: Path, kv_heads: int, message: str) -> None:
    with pytest.raises(BuildError, match=message) as info:
        build_quiet("tiny-qwen2", tmp_path / "out", kv_heads=kv_heads)
    assert "choose one of 1, 2, 4" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_bad_kv_heads_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "build-engine"), "tiny-qwen2", "-o", str(tmp_path / "o")]
        + ["--kv-heads", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("build-engine: error: --kv-heads 3 ")


def test_no_attention_to_rewrite_is_a_clear_error() -> None:
    x = ir.Value(name="x", shape=ir.Shape([1, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", const_value=ir.tensor(np.ones((4, 4), np.float32), name="w"))
    node = ir.node("MatMul", [x, w])
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 23})
    with pytest.raises(PassError, match="no FlashAttention node to rewrite"):
        CollapseKVHeadsPass(1)(ir.Model(graph, ir_version=10))
