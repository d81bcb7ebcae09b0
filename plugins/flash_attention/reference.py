"""NumPy reference implementation of the FlashAttention plugin op (float64 math).

Written from the op's published contract (see schema.py), not from any backend kernel: tests
compare every lowering against it.
"""

from __future__ import annotations

import numpy as np

from enginesmith.plugins.flash_attention.schema import FlashAttentionAttrs


def flash_attention_reference(
    attrs: FlashAttentionAttrs,
    query: np.ndarray,  # [B, S, N*H]
    key: np.ndarray,  # [B, S, Nkv*H]
    value: np.ndarray,  # [B, S, Nkv*H]
    cache_key: np.ndarray,  # [B, Nkv, MAX, H]
    cache_value: np.ndarray,  # [B, Nkv, MAX, H]
    seqlens_k: np.ndarray,  # [B] int32
    query_seqlens: np.ndarray,  # [B] int32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (output, cache_key, cache_value); the caches are updated copies."""
    batch, seq, _ = query.shape
    n, nkv, h = attrs.num_heads, attrs.kv_num_heads, attrs.head_dim
    group = n // nkv
    cache_key, cache_value = cache_key.copy(), cache_value.copy()
    output = np.zeros((batch, seq, n * h), dtype=query.dtype)
    q_bsnh = query.reshape(batch, seq, n, h).astype(np.float64)
    k_bsnh = key.reshape(batch, seq, nkv, h)
    v_bsnh = value.reshape(batch, seq, nkv, h)
    for b in range(batch):
        total, valid = int(seqlens_k[b]) + 1, int(query_seqlens[b])
        past = total - valid
        # [Nkv, Q, H] -> cache positions [past, total)
        cache_key[b, :, past:total] = k_bsnh[b, :valid].transpose(1, 0, 2)
        cache_value[b, :, past:total] = v_bsnh[b, :valid].transpose(1, 0, 2)
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
