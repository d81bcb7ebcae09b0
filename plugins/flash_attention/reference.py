"""NumPy reference implementation of the FlashAttention plugin op (float64 math).

Written from the op's published contract (see schema.py), not from any backend kernel: tests
compare every lowering against it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from enginesmith.plugins.flash_attention.schema import FlashAttentionAttrs


def rotate(
    x: np.ndarray,  # [..., H]
    cos: np.ndarray,  # [rotary_dim / 2]
    sin: np.ndarray,
    interleaved: bool,
) -> np.ndarray:
    """Rotary embedding of the first rotary_dim dimensions of X at one position."""
    half = cos.shape[-1]
    x = x.astype(np.float64)
    out = x.copy()
    if interleaved:
        x1, x2 = x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2]
        out[..., 0 : 2 * half : 2] = x1 * cos - x2 * sin
        out[..., 1 : 2 * half : 2] = x2 * cos + x1 * sin
    else:
        x1, x2 = x[..., :half], x[..., half : 2 * half]
        out[..., :half] = x1 * cos - x2 * sin
        out[..., half : 2 * half] = x2 * cos + x1 * sin
    return out


def flash_attention_reference(
    attrs: FlashAttentionAttrs,
    query: np.ndarray,  # [B, S, N*H], or packed [B, S, (N + 2*Nkv)*H] when key is None
    key: np.ndarray | None,  # [B, S, Nkv*H]
    value: np.ndarray | None,  # [B, S, Nkv*H]
    cache_key: np.ndarray,  # [B, Nkv, MAX, H]
    cache_value: np.ndarray,  # [B, Nkv, MAX, H]
    seqlens_k: np.ndarray,  # [B] int32
    query_seqlens: np.ndarray,  # [B] int32
    cos_cache: np.ndarray | None = None,  # [max_positions, rotary_dim / 2] (rotary = 1)
    sin_cache: np.ndarray | None = None,
    store: Callable[[str, np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (output, cache_key, cache_value); the caches are updated copies.

    STORE("key" | "value", rows [Nkv, Q, H]) -> rows models a lossy cache: what a new token
    reads back after it is written (a quantized cache's round trip, kv_quant.round_trip)."""
    batch, seq, _ = query.shape
    n, nkv, h = attrs.num_heads, attrs.kv_num_heads, attrs.head_dim
    group = n // nkv
    if key is None or value is None:  # packed QKV
        query, key, value = np.split(query, [n * h, (n + nkv) * h], axis=-1)
    cache_key, cache_value = cache_key.copy(), cache_value.copy()
    output = np.zeros((batch, seq, n * h), dtype=query.dtype)
    q_bsnh = query.reshape(batch, seq, n, h).astype(np.float64)
    k_bsnh = key.reshape(batch, seq, nkv, h).astype(np.float64)
    v_bsnh = value.reshape(batch, seq, nkv, h)
    for b in range(batch):
        total, valid = int(seqlens_k[b]) + 1, int(query_seqlens[b])
        past = total - valid
        if attrs.rotary:
            assert cos_cache is not None and sin_cache is not None
            for s in range(valid):  # rotate at the absolute (cache) position
                cos, sin = cos_cache[past + s], sin_cache[past + s]
                inter = bool(attrs.rotary_interleaved)
                q_bsnh[b, s] = rotate(q_bsnh[b, s], cos, sin, inter)
                k_bsnh[b, s] = rotate(k_bsnh[b, s], cos, sin, inter)
        # [Nkv, Q, H] -> cache positions [past, total)
        new_k, new_v = k_bsnh[b, :valid].transpose(1, 0, 2), v_bsnh[b, :valid].transpose(1, 0, 2)
        if store is not None:
            new_k, new_v = store("key", new_k), store("value", new_v)
        cache_key[b, :, past:total] = new_k
        cache_value[b, :, past:total] = new_v
        keys = cache_key[b, :, :total].astype(np.float64)  # [Nkv, T, H]
        values = cache_value[b, :, :total].astype(np.float64)
        for s in range(valid):
            pos = past + s
            lo = 0 if attrs.local_window_size < 0 else max(0, pos - attrs.local_window_size + 1)
            for head in range(n):
                kv = head // group  # query head -> its KV group
                scores = keys[kv, lo : pos + 1] @ q_bsnh[b, s, head] * attrs.scale
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                output[b, s, head * h : (head + 1) * h] = weights @ values[kv, lo : pos + 1]
    return output, cache_key, cache_value
