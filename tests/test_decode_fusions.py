"""The decode-speed fusions (rotary into FlashAttention, layout no-op removal, Q/K/V and
gate/up packing, RMSNorm + residual add): for each rule a positive case (count), a near miss
(count 0 for the broken layer, with the reason) and numerical equivalence of the fused graph with
the unfused export run by ONNX Runtime. Greedy output vs transformers for the fully fused engines
is tests/test_against_transformers.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from enginesmith.compiler import fusion_report
from enginesmith.compiler.pipeline import onnxruntime_passes, run_pipeline
from enginesmith.passes.base import EnginePass
from enginesmith.passes.graph_walk import plugin_nodes
from enginesmith.passes.pack_gate_up import PackGateUpPass
from enginesmith.passes.pack_qkv import PackQKVPass
from enginesmith.passes.remove_layout_noops import RemoveLayoutNoOpsPass
from enginesmith.plugins.flash_attention.onnxruntime import LowerFlashAttentionToORT
from tests.conftest import TINY_PRESETS
from tests.unfused_reference import compare_logits, session

# Every rule reorders float sums at most (packing, fused kernels): fp32 noise only.
FUSED_VS_UNFUSED_ATOL = 1e-4
RULES = ("fuse-rotary", "remove-layout-noops", "pack-qkv", "pack-gate-up", "fuse-rmsnorm")


def passes_through(dims, rule: str) -> list[EnginePass]:  # type: ignore[no-untyped-def]
    """The onnxruntime pipeline up to and including RULE, then lowered (if not yet)."""
    passes = onnxruntime_passes(dims)
    names = [p.name for p in passes]
    kept = passes[: names.index(rule) + 1]
    if not any(isinstance(p, LowerFlashAttentionToORT) for p in kept):
        kept.append(LowerFlashAttentionToORT())
    return kept


def passes_before(dims, rule: str) -> list[EnginePass]:  # type: ignore[no-untyped-def]
    passes = onnxruntime_passes(dims)
    return passes[: [p.name for p in passes].index(rule)]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_rule_matches_unfused_graph(preset: str, rule: str, fresh_export) -> None:  # type: ignore[no-untyped-def]
    """The pipeline through RULE gives the unfused export's logits (prefill 7, decode 3)."""
    unfused, fused = fresh_export(preset), fresh_export(preset)
    records = run_pipeline(fused.model, passes_through(fused.dims, rule))
    assert records[-1].modified or rule == "fuse-rmsnorm"
    diff = compare_logits(unfused.model, fused.model, fused.dims, FUSED_VS_UNFUSED_ATOL)
    print(f"{preset} through {rule}: max |fused - unfused| {diff:.2e}")


EXPECTED_COVERAGE = {  # 2-layer tiny presets: every rule covers every layer / norm
    "attention -> FlashAttention": 2,
    "rotary -> FlashAttention": 2,
    "Q/K/V projection packing": 2,
    "gate/up projection packing": 2,
    "RMSNorm (fused kernel)": 5,
    "residual add + RMSNorm": 4,
}


EXPORT_FORMS = [(23, "sdpa"), (23, "eager"), (18, "sdpa"), (18, "eager")]


@pytest.mark.parametrize("form", EXPORT_FORMS, ids=lambda f: f"opset{f[0]}-{f[1]}")
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_golden_fusion_counts(preset: str, form: tuple[int, str], fresh_export) -> None:  # type: ignore[no-untyped-def]
    """Every export form (decomposed rotary / RMSNorm at opset 18 included: canonicalize lifts
    them) ends as the same fully fused graph; numerics per form: test_fuse_attention.py."""
    result = fresh_export(preset, *form)
    records = run_pipeline(result.model, onnxruntime_passes(result.dims))
    rules = fusion_report.coverage(records, result.dims.num_layers)
    assert {r.rule: len(r.covered) for r in rules} == EXPECTED_COVERAGE
    assert all(r.complete and not r.failures for r in rules)
    ops = [n.op_type for n in result.model.graph]
    for gone in ("Softmax", "Attention", "RotaryEmbedding", "RMSNormalization", "Transpose"):
        assert gone not in ops
    # Per layer: 2 norms, packed QKV, attention, o_proj, packed gate_up, down_proj.
    assert ops.count("MatMul") == 4 * result.dims.num_layers
    assert ops.count("GroupQueryAttention") == result.dims.num_layers


def test_smollm2_golden_fusion_counts(smollm2_engine: Path) -> None:
    report = json.loads((smollm2_engine / "build_report.json").read_text())
    counts = {rule: entry["count"] for rule, entry in report["fusion"].items()}
    assert counts == {
        "attention -> FlashAttention": 30,
        "rotary -> FlashAttention": 30,
        "Q/K/V projection packing": 30,
        "gate/up projection packing": 30,
        "RMSNorm (fused kernel)": 61,
        "residual add + RMSNorm": 60,
    }
    graph = onnx.load(str(smollm2_engine / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert "Softmax" not in ops and "RotaryEmbedding" not in ops and "Transpose" not in ops
    assert ops.count("MatMul") == 4 * 30


# -- near misses: one layer broken, that layer reported with the reason, the others fused ------


def _layer1_plugin(model: ir.Model) -> ir.Node:
    return plugin_nodes(model.graph)[1]


def _insert_neg_before(graph: ir.Graph, node: ir.Node, index: int) -> None:
    """Feed NODE's input INDEX through a Neg: the same projection of a different tensor."""
    neg = ir.node("Neg", [node.inputs[index]])
    graph.insert_before(node, neg)
    node.replace_input_with(index, neg.outputs[0])


def test_rotary_near_miss(fresh_export) -> None:  # type: ignore[no-untyped-def]
    result = fresh_export("tiny-llama")
    rotaries = [n for n in result.model.graph if n.op_type == "RotaryEmbedding"]
    assert len(rotaries) == 4  # q and k of 2 layers
    rotaries[2].attributes["rotary_embedding_dim"] = ir.AttrInt64("rotary_embedding_dim", 8)
    records = run_pipeline(result.model, passes_through(result.dims, "fuse-rotary"))
    report = records[-2].report  # before the lowering
    assert report["fused_layers"] == [0]
    assert report["failures"] == {"layer 1": "query: partial rotary (8 of 16)"}


def test_pack_qkv_near_miss(fresh_export) -> None:  # type: ignore[no-untyped-def]
    result = fresh_export("tiny-qwen2")
    run_pipeline(result.model, passes_before(result.dims, "pack-qkv"))
    q_proj = _layer1_plugin(result.model).inputs[0].producer()  # Add(MatMul, bias)
    matmul = q_proj.inputs[0].producer()  # type: ignore[union-attr]
    _insert_neg_before(result.model.graph, matmul, 0)  # type: ignore[arg-type]
    p = PackQKVPass()
    p(result.model)
    assert p.report["packed_layers"] == [0]
    assert p.report["failures"] == {"layer 1": "q, k and v project different tensors"}


def test_pack_gate_up_near_miss(fresh_export) -> None:  # type: ignore[no-untyped-def]
    result = fresh_export("tiny-mistral")
    run_pipeline(result.model, passes_before(result.dims, "pack-gate-up"))
    graph = result.model.graph
    sigmoid = [n for n in graph if n.op_type == "Sigmoid"][1]  # layer 1's SiLU
    silu = sigmoid.outputs[0].uses()[0].node
    product = silu.outputs[0].uses()[0].node  # SiLU(gate) * up
    up = next(v for v in product.inputs if v is not silu.outputs[0])
    _insert_neg_before(graph, up.producer(), 0)  # type: ignore[union-attr, arg-type]
    p = PackGateUpPass()
    p(result.model)
    assert p.report["packed_layers"] == [0]
    assert p.report["failures"] == {"layer 1": "gate and up project different tensors"}


def test_rmsnorm_near_miss(fresh_export) -> None:  # type: ignore[no-untyped-def]
    """An RMSNormalization over axis 1 (not the hidden axis) is not SimplifiedLayerNorm's
    math: it stays, and the report counts it as unfused."""
    result = fresh_export("tiny-llama")
    norm = [n for n in result.model.graph if n.op_type == "RMSNormalization"][2]
    norm.attributes["axis"] = ir.AttrInt64("axis", 1)
    records = run_pipeline(result.model, onnxruntime_passes(result.dims))
    rules = {r.rule: r for r in fusion_report.coverage(records, result.dims.num_layers)}
    assert len(rules["RMSNorm (fused kernel)"].covered) == 4
    assert list(rules["RMSNorm (fused kernel)"].failures.values()) == [
        "RMSNormalization left as is"
    ]
    assert len(rules["residual add + RMSNorm"].covered) == 3
    with pytest.raises(Exception, match="RMSNorm \\(fused kernel\\): 4 of 5"):
        fusion_report.check(list(rules.values()), strict=True)
    warnings = fusion_report.check(list(rules.values()), strict=False)
    assert len(warnings) == 2 and "--strict-fusion" in warnings[0]


# -- layout no-ops on a hand-made graph ---------------------------------------------------------


def _reshape_graph(inner: list[int], transpose: bool) -> ir.Model:
    """x[b, s, 8] -> Reshape(inner) [-> Transpose] -> Reshape([0, 0, -1]) -> Relu -> y."""
    f32 = ir.TensorType(ir.DataType.FLOAT)
    x = ir.Value(name="x", type=f32, shape=ir.Shape(["b", "s", 8]))
    nodes: list[ir.Node] = []
    inits = []

    def const(name: str, data: list[int]) -> ir.Value:
        v = ir.Value(name=name, const_value=ir.tensor(np.array(data, np.int64)))
        inits.append(v)
        return v

    r1 = ir.node("Reshape", [x, const("inner", inner)])
    nodes.append(r1)
    value = r1.outputs[0]
    if transpose:
        t = ir.node("Transpose", [value], {"perm": [0, 1, 3, 2]})
        nodes.append(t)
        value = t.outputs[0]
    r2 = ir.node("Reshape", [value, const("flat", [0, 0, -1])])
    relu = ir.node("Relu", [r2.outputs[0]])
    nodes += [r2, relu]
    relu.outputs[0].name, relu.outputs[0].type = "y", f32
    graph = ir.Graph(
        [x], [relu.outputs[0]], nodes=nodes, initializers=inits, opset_imports={"": 23}
    )
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize(("transpose", "removed"), [(False, 1), (True, 0)])
def test_layout_noops(transpose: bool, removed: int) -> None:
    """[b,s,8] -> [b,s,2,4] -> [b,s,8] is the identity; with a Transpose in between it is not."""
    model = _reshape_graph([0, 0, 2, 4], transpose)
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    before = session(model).run(None, {"x": x})[0]
    p = RemoveLayoutNoOpsPass()
    p(model)
    assert p.report["reshape_chain"] == removed
    relu = next(n for n in model.graph if n.op_type == "Relu")
    assert (relu.inputs[0] is model.graph.inputs[0]) == bool(removed)
    np.testing.assert_array_equal(session(model).run(None, {"x": x})[0], before)
