"""fuse-attention on real exports of every tiny preset in every export form (ONNX Attention at
opset 23 with SDPA; the decomposed MatMul -> scale -> mask -> Softmax -> MatMul chain with eager
attention or at opset 18): counts per layer, near misses that must not fuse (with the reason
reported), and numerical equivalence of the fused engine with the unfused graph run by ONNX
Runtime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from enginesmith.compiler import export
from enginesmith.compiler.pipeline import check_ir, onnxruntime_passes, run_pipeline
from enginesmith.passes.fuse_attention import FuseAttentionPass
from enginesmith.runtime.errors import BuildError
from tests.conftest import TINY_PRESETS
from tests.unfused_reference import compare_logits

FUSED_VS_UNFUSED_ATOL = 1e-4
# Export forms are a property of the architecture: tiny-qwen2-gqa has tiny-qwen2's (its fused
# numerics are in test_decode_fusions.py and test_differential.py); 4 more exports cost ~40 s.
FORM_PRESETS = [p for p in TINY_PRESETS if p != "tiny-qwen2-gqa"]
# Prompt length of the equivalence test: longer than tiny-mistral's sliding window (16), so the
# window is exercised in prefill and decode.
PREFILL = 20

# (opset, attn_implementation) -> the attention form the export holds.
EXPORT_FORMS = {
    (23, "sdpa"): "onnx_attention",
    (23, "eager"): "decomposed",
    (18, "sdpa"): "decomposed",
    (18, "eager"): "decomposed",
}
DECOMPOSED = [key for key, form in EXPORT_FORMS.items() if form == "decomposed"]


def form_id(key: tuple[int, str]) -> str:
    return f"opset{key[0]}-{key[1]}"


@pytest.fixture
def exports(fresh_export):  # type: ignore[no-untyped-def]
    """exports(preset, opset, attn_implementation) -> a private copy of that export."""
    return fresh_export


@pytest.mark.parametrize("form", EXPORT_FORMS, ids=form_id)
@pytest.mark.parametrize("preset", FORM_PRESETS)
def test_every_layer_fuses(preset: str, form: tuple[int, str], exports) -> None:  # type: ignore[no-untyped-def]
    result = exports(preset, *form)
    passes = onnxruntime_passes(result.dims)
    records = run_pipeline(result.model, passes)
    fuse = next(r for r in records if r.name == "fuse-attention").report
    # Golden: every tiny preset has 2 layers, each exported in exactly one form.
    assert fuse == {
        "attention_nodes": 2,
        "forms": {"onnx_attention": 0, "decomposed": 0} | {EXPORT_FORMS[form]: 2},
        "fused": 2,
        "fused_layers": [0, 1],
        "failures": {},
    }
    ops = [n.op_type for n in result.model.graph]
    assert ops.count("GroupQueryAttention") == result.dims.num_layers
    assert "Softmax" not in ops and "Attention" not in ops
    check_ir(result.model)


def test_near_miss_reports_why(exports) -> None:  # type: ignore[no-untyped-def]
    """Layer 1's cache Concat no longer starts from its past input: that layer must not fuse,
    and the report names the reason; layer 0 still fuses."""
    result = exports("tiny-llama")
    graph = result.model.graph
    concat = next(v.producer() for v in graph.outputs if v.name == "present_key.1")
    neg = ir.node("Neg", [concat.inputs[0]])
    graph.insert_before(concat, neg)
    concat.replace_input_with(0, neg.outputs[0])
    p = FuseAttentionPass(4, 2, 16)
    p(result.model)
    assert p.report["fused_layers"] == [0]
    (reason,) = p.report["failures"].values()
    assert "past_key.i graph input" in reason


def _mask_add(softmax: ir.Node) -> tuple[ir.Node, int]:
    """The exported mask Add feeding SOFTMAX and the index of its scores operand."""
    add = softmax.inputs[0].producer()  # type: ignore[union-attr]
    assert add is not None and add.op_type == "Add"
    ops = [v.producer().op_type if v is not None and v.producer() else None for v in add.inputs]
    return add, next(i for i, op in enumerate(ops) if op in ("Mul", "MatMul"))


def _constant(graph: ir.Graph, name: str, x: float) -> ir.Value:
    value = ir.Value(name=f"{name}_{len(graph.initializers)}", const_value=ir.tensor(np.float32(x)))
    graph.register_initializer(value)
    return value


def _drop_mask(softmax: ir.Node) -> None:
    """Softmax reads the scores before the mask Add: a non-causal chain."""
    add, scores = _mask_add(softmax)
    softmax.replace_input_with(0, add.inputs[scores])


def _softmax_axis_2(softmax: ir.Node) -> None:
    softmax.attributes["axis"] = ir.AttrInt64("axis", 2)


def _runtime_scale(softmax: ir.Node) -> None:
    """Scores times a value computed at run time (Identity of a constant): scale unknown."""
    add, scores = _mask_add(softmax)
    graph = softmax.graph
    assert graph is not None
    identity = ir.node("Identity", [_constant(graph, "near_miss_one", 1.0)])
    mul = ir.node("Mul", [add.inputs[scores], identity.outputs[0]])
    graph.insert_before(add, [identity, mul])
    add.replace_input_with(scores, mul.outputs[0])


def _masked_fill(softmax: ir.Node) -> None:
    """Softmax(Add(scores, mask)) -> Softmax(Where(mask == 0, scores, finfo.min)): the same
    values (the exported mask is 0 or finfo.min), in the masked_fill form."""
    add, scores = _mask_add(softmax)
    graph = softmax.graph
    assert graph is not None
    keep = ir.node("Equal", [add.inputs[1 - scores], _constant(graph, "zero", 0.0)])
    fill = _constant(graph, "fill", float(np.finfo(np.float32).min))
    where = ir.node("Where", [keep.outputs[0], add.inputs[scores], fill])
    graph.insert_before(softmax, [keep, where])
    softmax.replace_input_with(0, where.outputs[0])


NEAR_MISSES = {
    "no-mask": (_drop_mask, "not a mask Add or Where"),
    "softmax-axis": (_softmax_axis_2, "Softmax on axis 2, expected the key axis (-1)"),
    "runtime-scale": (_runtime_scale, "the softmax scale cannot be read"),
}


@pytest.mark.parametrize("near_miss", NEAR_MISSES)
@pytest.mark.parametrize("form", DECOMPOSED, ids=form_id)
def test_decomposed_near_miss_reports_why(form: tuple[int, str], near_miss: str, exports) -> None:  # type: ignore[no-untyped-def]
    """Layer 1's decomposed chain is broken: that layer must not fuse and the report names the
    layer and the part that differs; layer 0 still fuses and its Softmax is gone."""
    result = exports("tiny-llama", *form)
    graph = result.model.graph
    mutate, why = NEAR_MISSES[near_miss]
    mutate([n for n in graph if n.op_type == "Softmax"][1])
    p = FuseAttentionPass(4, 2, 16)
    p(result.model)
    assert p.report["attention_nodes"] == 2 and p.report["forms"]["decomposed"] == 2
    assert p.report["fused_layers"] == [0]
    ((where, reason),) = p.report["failures"].items()
    assert where.startswith("layer 1 ") and why in reason, (where, reason)
    assert [n.op_type for n in graph].count("Softmax") == 1


@pytest.mark.parametrize("form", EXPORT_FORMS, ids=form_id)
@pytest.mark.parametrize("preset", FORM_PRESETS)
def test_fused_matches_unfused_graph(preset: str, form: tuple[int, str], exports) -> None:  # type: ignore[no-untyped-def]
    """Prefill PREFILL tokens then decode 1 through the unfused export (Concat cache) and
    through the fused, lowered graph (in-place cache); logits must agree."""
    unfused = exports(preset, *form)
    fused = exports(preset, *form)
    run_pipeline(fused.model, onnxruntime_passes(fused.dims))
    assert_same_logits(unfused.model, fused.model, fused.dims)


def test_masked_fill_form_fuses(exports) -> None:  # type: ignore[no-untyped-def]
    """The decomposed chain with Where(mask, scores, -big) instead of the mask Add fuses too,
    to the same logits."""
    unfused = exports("tiny-llama", 23, "eager")
    fused = exports("tiny-llama", 23, "eager")
    for softmax in [n for n in fused.model.graph if n.op_type == "Softmax"]:
        _masked_fill(softmax)
    records = run_pipeline(fused.model, onnxruntime_passes(fused.dims))
    assert next(r for r in records if r.name == "fuse-attention").report["fused_layers"] == [0, 1]
    assert "Softmax" not in [n.op_type for n in fused.model.graph]
    assert_same_logits(unfused.model, fused.model, fused.dims)


def assert_same_logits(unfused: ir.Model, fused: ir.Model, dims: export.ModelDims) -> None:
    """Prefill PREFILL tokens, then decode 1: the unfused graph with its growing Concat cache,
    the fused one with in-place caches (tests/unfused_reference.py)."""
    diff = compare_logits(unfused, fused, dims, FUSED_VS_UNFUSED_ATOL, prefill=PREFILL, decode=1)
    print(f"max |fused - unfused|: {diff:.2e}")


def test_export_refuses_unknown_forms(hf_models) -> None:  # type: ignore[no-untyped-def]
    model = hf_models("tiny-llama").model
    with pytest.raises(BuildError, match="use one of sdpa, eager"):
        export.export_model(model, attn_implementation="flash_attention_2")
    with pytest.raises(BuildError, match="use opset 18 or newer"):
        export.export_model(model, opset=17)
