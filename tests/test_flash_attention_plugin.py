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


def plugin_model(attrs: schema.FlashAttentionAttrs, packed: bool = False) -> ir.Model:
    """A one-node graph: FlashAttention lowered for ORT, caches as inputs/outputs."""
    f32, i32 = ir.TensorType(ir.DataType.FLOAT), ir.TensorType(ir.DataType.INT32)
    n, nkv, h = attrs.num_heads, attrs.kv_num_heads, attrs.head_dim
    width = attrs.packed_width if packed else n * h
    node_inputs: list[ir.Value | None] = [
        ir.Value(name="query", type=f32, shape=ir.Shape(["B", "S", width])),
        None if packed else ir.Value(name="key", type=f32, shape=ir.Shape(["B", "S", nkv * h])),
        None if packed else ir.Value(name="value", type=f32, shape=ir.Shape(["B", "S", nkv * h])),
        ir.Value(name="cache_key", type=f32, shape=ir.Shape(["B", nkv, "MAX", h])),
        ir.Value(name="cache_value", type=f32, shape=ir.Shape(["B", nkv, "MAX", h])),
        ir.Value(name="seqlens_k", type=i32, shape=ir.Shape(["B"])),
        ir.Value(name="query_seqlens", type=i32, shape=ir.Shape(["B"])),
    ]
    if attrs.rotary:
        node_inputs += [
            ir.Value(name="cos_cache", type=f32, shape=ir.Shape(["MAX", h // 2])),
            ir.Value(name="sin_cache", type=f32, shape=ir.Shape(["MAX", h // 2])),
        ]
    node = ir.node(
        schema.OP_TYPE,
        node_inputs,
        attrs.as_node_attributes(),
        domain=schema.DOMAIN,
        num_outputs=3,
    )
    for out, name in zip(node.outputs, schema.OUTPUTS, strict=True):
        out.name, out.type = name, f32
    inputs = [v for v in node_inputs if v is not None]
    graph = ir.Graph(
        inputs, list(node.outputs), nodes=[node], opset_imports={"": 23, schema.DOMAIN: 1}
    )
    model = ir.Model(graph, ir_version=10)
    LowerFlashAttentionToORT()(model)
    return model


def run_both(  # type: ignore[no-untyped-def]
    attrs, q, k, v, ck, cv, seqlens_k, query_seqlens, packed=False, cos=None, sin=None
):
    proto = ir.serde.serialize_model(plugin_model(attrs, packed))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = dict(cache_key=ck, cache_value=cv, seqlens_k=seqlens_k, query_seqlens=query_seqlens)
    if packed:
        q, k, v = np.concatenate([q, k, v], axis=-1), None, None
        feeds.update(query=q)
    else:
        feeds.update(query=q, key=k, value=v)
    if attrs.rotary:
        feeds.update(cos_cache=cos, sin_cache=sin)
    got = session.run(None, feeds)
    ref = flash_attention_reference(attrs, q, k, v, ck, cv, seqlens_k, query_seqlens, cos, sin)
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


def rope_tables(max_len: int, head_dim: int, base: float = 10000.0):  # type: ignore[no-untyped-def]
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim)
    angles = np.arange(max_len)[:, None] * inv_freq[None]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_rotary_and_packed_match_reference(
    heads: tuple[int, int], interleaved: int, packed: bool
) -> None:
    """Fused rotary rotates each valid row at its cache position P + s (rows at different
    lengths, right padding, an idle row), packed QKV splits like separate inputs."""
    rng = np.random.default_rng(2)
    attrs = schema.FlashAttentionAttrs(
        heads[0], heads[1], 16, scale=0.25, rotary=1, rotary_interleaved=interleaved
    )
    seqlens_k = np.array([3, 9, 8, 5], np.int32)
    query_seqlens = np.array([4, 1, 3, 0], np.int32)
    q, k, v, ck, cv = random_case(rng, attrs, batch=4, seq=4, max_len=32)
    cos, sin = rope_tables(32, 16)
    (out, ok, _), (ref_out, ref_k, _) = run_both(
        attrs, q, k, v, ck, cv, seqlens_k, query_seqlens, packed, cos, sin
    )
    for b, (total, valid) in enumerate(zip(seqlens_k + 1, query_seqlens, strict=True)):
        np.testing.assert_allclose(
            out[b, :valid], ref_out[b, :valid], atol=ATOL, err_msg=f"row {b}"
        )
        np.testing.assert_allclose(
            ok[b, :, :total], ref_k[b, :, :total], atol=ATOL, err_msg=f"row {b}"
        )


def test_reference_rotary_is_hf_rotary() -> None:
    """The reference's rotate-half rotary equals transformers' apply_rotary_pos_emb."""
    torch = pytest.importorskip("torch")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from enginesmith.plugins.flash_attention.reference import rotate

    rng = np.random.default_rng(3)
    cos, sin = rope_tables(8, 16)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)  # [heads, positions, head_dim]
    pos = np.array([0, 3, 4, 6, 7])
    full_cos = np.concatenate([cos[pos], cos[pos]], -1)[None]  # HF duplicates the halves
    full_sin = np.concatenate([sin[pos], sin[pos]], -1)[None]
    hf_q, _ = apply_rotary_pos_emb(
        torch.from_numpy(x)[None],
        torch.from_numpy(x)[None],
        torch.from_numpy(full_cos),
        torch.from_numpy(full_sin),
    )
    ours = np.stack([rotate(x[:, i], cos[p], sin[p], False) for i, p in enumerate(pos)], 1)
    np.testing.assert_allclose(ours, hf_q[0].numpy(), atol=1e-6)


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
