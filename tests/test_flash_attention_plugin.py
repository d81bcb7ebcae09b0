"""The FlashAttention plugin's ONNX Runtime lowering against its NumPy reference, on the
cases the KV-cache design depends on: rows at different lengths, right padding, idle rows,
multi-token (verify) steps, rollback and sliding windows."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from enginesmith.plugins.flash_attention import schema
from enginesmith.plugins.flash_attention.onnxruntime import LowerFlashAttentionToORT
from enginesmith.plugins.flash_attention.reference import flash_attention_reference

ATOL = 1e-5


def plugin_model(attrs: schema.FlashAttentionAttrs) -> ir.Model:
    """A one-node graph: FlashAttention lowered for ORT, caches as inputs/outputs."""
    f32, i32 = ir.TensorType(ir.DataType.FLOAT), ir.TensorType(ir.DataType.INT32)
    n, nkv, h = attrs.num_heads, attrs.kv_num_heads, attrs.head_dim
    inputs = [
        ir.Value(name="query", type=f32, shape=ir.Shape(["B", "S", n * h])),
        ir.Value(name="key", type=f32, shape=ir.Shape(["B", "S", nkv * h])),
        ir.Value(name="value", type=f32, shape=ir.Shape(["B", "S", nkv * h])),
        ir.Value(name="cache_key", type=f32, shape=ir.Shape(["B", nkv, "MAX", h])),
        ir.Value(name="cache_value", type=f32, shape=ir.Shape(["B", nkv, "MAX", h])),
        ir.Value(name="seqlens_k", type=i32, shape=ir.Shape(["B"])),
        ir.Value(name="query_seqlens", type=i32, shape=ir.Shape(["B"])),
    ]
    node = ir.node(
        schema.OP_TYPE, inputs, attrs.as_node_attributes(), domain=schema.DOMAIN, num_outputs=3
    )
    for out, name in zip(node.outputs, schema.OUTPUTS, strict=True):
        out.name, out.type = name, f32
    graph = ir.Graph(
        inputs, list(node.outputs), nodes=[node], opset_imports={"": 23, schema.DOMAIN: 1}
    )
    model = ir.Model(graph, ir_version=10)
    LowerFlashAttentionToORT()(model)
    return model


def run_both(attrs, q, k, v, ck, cv, seqlens_k, query_seqlens):  # type: ignore[no-untyped-def]
    proto = ir.serde.serialize_model(plugin_model(attrs))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = dict(
        query=q,
        key=k,
        value=v,
        cache_key=ck,
        cache_value=cv,
        seqlens_k=seqlens_k,
        query_seqlens=query_seqlens,
    )
    got = session.run(None, feeds)
    ref = flash_attention_reference(attrs, q, k, v, ck, cv, seqlens_k, query_seqlens)
    return got, ref


def random_case(rng, attrs, batch, seq, max_len):  # type: ignore[no-untyped-def]
    n, nkv, h = attrs.num_heads, attrs.kv_num_heads, attrs.head_dim
    q = rng.standard_normal((batch, seq, n * h), dtype=np.float32)
    k = rng.standard_normal((batch, seq, nkv * h), dtype=np.float32)
    v = rng.standard_normal((batch, seq, nkv * h), dtype=np.float32)
    # Garbage everywhere in the caches: only positions < P may be read.
    ck = rng.standard_normal((batch, nkv, max_len, h), dtype=np.float32)
    cv = rng.standard_normal((batch, nkv, max_len, h), dtype=np.float32)
    return q, k, v, ck, cv


@pytest.mark.parametrize("heads", [(4, 2), (4, 1), (4, 4)], ids=["gqa", "mqa", "mha"])
@pytest.mark.parametrize("window", [-1, 5])
def test_mixed_rows_match_reference(heads: tuple[int, int], window: int) -> None:
    rng = np.random.default_rng(0)
    attrs = schema.FlashAttentionAttrs(heads[0], heads[1], 16, scale=0.25, local_window_size=window)
    # rows: fresh prefill of 4 (of S=4), decode 1 token after 9, verify 3 after 6, idle (Q=0)
    seqlens_k = np.array([3, 9, 8, 5], np.int32)
    query_seqlens = np.array([4, 1, 3, 0], np.int32)
    q, k, v, ck, cv = random_case(rng, attrs, batch=4, seq=4, max_len=32)
    (out, ok, ov), (ref_out, ref_k, ref_v) = run_both(
        attrs, q, k, v, ck, cv, seqlens_k, query_seqlens
    )
    for b, (total, valid) in enumerate(zip(seqlens_k + 1, query_seqlens, strict=True)):
        np.testing.assert_allclose(
            out[b, :valid], ref_out[b, :valid], atol=ATOL, err_msg=f"row {b}"
        )
        # cache positions < T are defined; beyond T the contract leaves them unspecified
        np.testing.assert_allclose(
            ok[b, :, :total], ref_k[b, :, :total], atol=0, err_msg=f"row {b}"
        )
        np.testing.assert_allclose(
            ov[b, :, :total], ref_v[b, :, :total], atol=0, err_msg=f"row {b}"
        )


def test_idle_row_cache_untouched_and_rollback() -> None:
    rng = np.random.default_rng(1)
    attrs = schema.FlashAttentionAttrs(4, 2, 8, scale=1 / np.sqrt(8))
    q, k, v, ck, cv = random_case(rng, attrs, batch=2, seq=2, max_len=16)
    # Row 0 is idle: its T = 7 cached positions must come back bit-identical (positions >= T
    # are unspecified by the contract when present is not aliased to past).
    (_, ok, _), _ = run_both(
        attrs, q, k, v, ck, cv, np.array([6, 3], np.int32), np.array([0, 2], np.int32)
    )
    np.testing.assert_array_equal(ok[0, :, :7], ck[0, :, :7])
    # Rollback: writing 2 tokens at P=2 (T=4) after the cache held 4 must equal a fresh write.
    (out_a, _, _), (ref_a, _, _) = run_both(
        attrs, q, k, v, ok, cv, np.array([3, 3], np.int32), np.array([2, 2], np.int32)
    )
    np.testing.assert_allclose(out_a[1, :2], ref_a[1, :2], atol=ATOL)


def test_window_convention_matches_hf() -> None:
    """HF's sliding_window W attends to key positions (q - W, q]: W positions, self included."""
    assert schema.window_from_hf(16) == 16
    assert schema.window_from_hf(None) == -1
    attrs = schema.FlashAttentionAttrs(1, 1, 4, scale=1.0, local_window_size=2)
    # One query at position 4 with all-zero scores attends uniformly to exactly positions 3 and 4.
    q = np.zeros((1, 1, 4), np.float32)
    values = np.arange(5, dtype=np.float32)[None, None, :, None].repeat(4, -1)  # value = position
    cache = np.zeros((1, 1, 5, 4), np.float32)
    cache_v = values.copy()
    out, _, _ = flash_attention_reference(
        attrs,
        q,
        q,
        values[:, :, 4, :].reshape(1, 1, 4),
        cache,
        cache_v,
        np.array([4]),
        np.array([1]),
    )
    np.testing.assert_allclose(out[0, 0], 3.5)
