"""fuse-attention on real exports: counts per layer, a near miss that must not fuse (with the
reason reported), and numerical equivalence of the fused engine with the unfused graph run by
ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from enginesmith.compiler import export
from enginesmith.compiler.pipeline import check_ir, onnxruntime_passes, run_pipeline
from enginesmith.passes.fuse_attention import FuseAttentionPass
from enginesmith.plugins.flash_attention import schema
from tests.conftest import TINY_PRESETS

FUSED_VS_UNFUSED_ATOL = 1e-4


@pytest.fixture(scope="module")
def exports(hf_models):  # type: ignore[no-untyped-def]
    cache: dict[str, export.ExportResult] = {}

    def get(preset: str) -> export.ExportResult:
        if preset not in cache:
            cache[preset] = export.export_model(hf_models(preset).model)
        # Each test gets its own copy: passes rewrite in place.
        proto = ir.serde.serialize_model(cache[preset].model)
        return export.ExportResult(ir.serde.deserialize_model(proto), cache[preset].dims, 0.0, 0)

    return get


def session(model: ir.Model) -> ort.InferenceSession:
    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_every_layer_fuses(preset: str, exports) -> None:  # type: ignore[no-untyped-def]
    result = exports(preset)
    passes = onnxruntime_passes(result.dims)
    records = run_pipeline(result.model, passes)
    fuse = records[0].report
    assert fuse == {
        "attention_nodes": result.dims.num_layers,
        "fused": result.dims.num_layers,
        "fused_layers": list(range(result.dims.num_layers)),
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


def test_fused_matches_unfused_graph(exports) -> None:  # type: ignore[no-untyped-def]
    """Prefill 7 tokens then decode 1 through the unfused export (Concat cache) and through the
    fused, lowered graph (in-place cache); logits must agree."""
    unfused = exports("tiny-qwen2")
    fused = exports("tiny-qwen2")
    dims = fused.dims
    run_pipeline(fused.model, onnxruntime_passes(dims))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, dims.vocab_size, (1, 8))
    ref_sess, fused_sess = session(unfused.model), session(fused.model)

    empty = np.zeros((1, dims.num_kv_heads, 0, dims.head_dim), np.float32)
    feeds = {
        "input_ids": ids[:, :7],
        "position_ids": np.arange(7)[None],
        "logits_indices": np.arange(7),
    }
    feeds |= {f"past_{k}.{i}": empty for i in range(dims.num_layers) for k in ("key", "value")}
    ref_prefill = ref_sess.run(None, feeds)
    feeds = {
        "input_ids": ids[:, 7:],
        "position_ids": np.array([[7]]),
        "logits_indices": np.array([0]),
    }
    names = [o.name for o in ref_sess.get_outputs()]
    feeds |= {
        n.replace("present", "past"): v for n, v in zip(names[1:], ref_prefill[1:], strict=True)
    }
    ref_decode = ref_sess.run(None, feeds)[0]

    caches = {
        f"past_{k}.{i}": np.zeros((1, dims.num_kv_heads, 16, dims.head_dim), np.float32)
        for i in range(dims.num_layers)
        for k in ("key", "value")
    }
    out = fused_sess.run(
        None,
        {
            "input_ids": ids[:, :7],
            "position_ids": np.arange(7)[None],
            "logits_indices": np.arange(7),
            schema.SEQLENS_K: np.array([6], np.int32),
            schema.QUERY_SEQLENS: np.array([7], np.int32),
            **caches,
        },
    )
    np.testing.assert_allclose(out[0], ref_prefill[0], atol=FUSED_VS_UNFUSED_ATOL)
    names = [o.name for o in fused_sess.get_outputs()]
    caches = {n.replace("present", "past"): v for n, v in zip(names[1:], out[1:], strict=True)}
    out = fused_sess.run(
        None,
        {
            "input_ids": ids[:, 7:],
            "position_ids": np.array([[7]]),
            "logits_indices": np.array([0]),
            schema.SEQLENS_K: np.array([7], np.int32),
            schema.QUERY_SEQLENS: np.array([1], np.int32),
            **caches,
        },
    )
    np.testing.assert_allclose(out[0], ref_decode, atol=FUSED_VS_UNFUSED_ATOL)
    print("max |fused - unfused| decode:", float(np.abs(out[0] - ref_decode).max()))
