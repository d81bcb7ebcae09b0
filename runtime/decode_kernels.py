"""Decode-step kernels for the CPU: one compiled function runs every layer of a decode step.

A decode step at batch 1 reads every weight once and does ~2 FLOPs per weight: it is bound by
memory bandwidth, and what ONNX Runtime adds on top (a kernel launch per node, a
GroupQueryAttention that reads each KV head once per query head, three nodes for a SiLU
product) costs a quarter of the step on this machine (docs/benchmarks.md, issue 7). These
kernels are compiled by numba (LLVM, the host's vector ISA) into one function per model shape:

* weight products stream each weight row once for all rows of the step (weights stored
  [N, K], as the LM head already is), split over threads by contiguous row ranges;
* attention is split-K flash decoding: each (row, KV head, context chunk) work item reads its
  keys and values once for all query heads of the group, and the partial softmax states are
  merged exactly (the FlashAttention plugin contract, plugins/flash_attention/schema.py);
* RMSNorm, residual adds, rotary, the cache write and SiLU(gate) * up run between them in the
  same compiled code: no per-op dispatch.

Prefill and mixed steps stay on ONNX Runtime; both share the same KV buffers.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

ATTENTION_CHUNK = 128  # context positions per attention work item
# fastmath without "nnan"/"ninf": reassociation lets LLVM vectorize the reductions, but the
# code must keep its comparisons (an empty softmax chunk is tested, not assumed away).
FAST = {"reassoc", "contract", "arcp", "nsz", "afn"}


@njit(parallel=True, fastmath=FAST, cache=True, error_model="numpy")
def matmul_nk(x, w, out):  # type: ignore[no-untyped-def]
    """out[M, N] = x[M, K] @ w[N, K]^T: each weight row is read once, contiguously, for all M
    rows. Four output rows at a time give four independent accumulator chains: a single
    chain waits on the latency of each fused multiply-add."""
    rows, k_total = x.shape
    n_total = w.shape[0]
    quads = n_total // 4
    blocks = 64
    step = (quads + blocks - 1) // blocks
    for b in prange(blocks):
        for quad in range(b * step, min(quads, (b + 1) * step)):
            j = quad * 4
            w0, w1, w2, w3 = w[j], w[j + 1], w[j + 2], w[j + 3]
            for m in range(rows):
                a0 = a1 = a2 = a3 = np.float32(0.0)
                for k in range(k_total):
                    xv = x[m, k]
                    a0 += xv * w0[k]
                    a1 += xv * w1[k]
                    a2 += xv * w2[k]
                    a3 += xv * w3[k]
                out[m, j], out[m, j + 1], out[m, j + 2], out[m, j + 3] = a0, a1, a2, a3
    for j in range(quads * 4, n_total):
        for m in range(rows):
            acc = np.float32(0.0)
            for k in range(k_total):
                acc += x[m, k] * w[j, k]
            out[m, j] = acc


@njit(fastmath=FAST, cache=True, error_model="numpy")
def rms_norm(x, weight, eps, out):  # type: ignore[no-untyped-def]
    """ONNX SimplifiedLayerNormalization over the last axis (fp32 statistics)."""
    rows, width = x.shape
    for m in range(rows):
        sq = np.float32(0.0)
        for j in range(width):
            sq += x[m, j] * x[m, j]
        inv = np.float32(1.0) / np.sqrt(sq / np.float32(width) + np.float32(eps))
        for j in range(width):
            out[m, j] = x[m, j] * inv * weight[j]


@njit(fastmath=FAST, cache=True, error_model="numpy")
def add_into(residual, x):  # type: ignore[no-untyped-def]
    rows, width = x.shape
    for m in range(rows):
        for j in range(width):
            residual[m, j] += x[m, j]


@njit(fastmath=FAST, cache=True, error_model="numpy")
def silu_product(gate_up, out):  # type: ignore[no-untyped-def]
    """out = SiLU(gate_up[:, :I]) * gate_up[:, I:] (the packed gate/up projection)."""
    rows, width = out.shape
    for m in range(rows):
        for j in range(width):
            g = gate_up[m, j]
            out[m, j] = g / (np.float32(1.0) + np.exp(-g)) * gate_up[m, width + j]


@njit(fastmath=FAST, cache=True, error_model="numpy")
def rotate_in_place(vec, cos, sin, interleaved):  # type: ignore[no-untyped-def]
    half = cos.shape[0]
    if interleaved:
        for i in range(half):
            x1, x2 = vec[2 * i], vec[2 * i + 1]
            vec[2 * i] = x1 * cos[i] - x2 * sin[i]
            vec[2 * i + 1] = x2 * cos[i] + x1 * sin[i]
    else:
        for i in range(half):
            x1, x2 = vec[i], vec[half + i]
            vec[i] = x1 * cos[i] - x2 * sin[i]
            vec[half + i] = x2 * cos[i] + x1 * sin[i]


@njit(fastmath=FAST, cache=True, error_model="numpy")
def rotary_and_cache_write(  # type: ignore[no-untyped-def]
    qkv,
    positions,
    slot0,
    cache_k,
    cache_v,
    n_heads,
    n_kv,
    head_dim,
    cos_cache,
    sin_cache,
    rotary,
    interleaved,
):
    """Rotate q and k of each row at its position and write k, v into the row's cache slot
    (row m is slot slot0 + m of the [max_batch, Nkv, MAX, H] caches)."""
    q_width = n_heads * head_dim
    kv_width = n_kv * head_dim
    for m in range(qkv.shape[0]):
        p = positions[m]
        if p < 0:  # idle row: no token, nothing cached
            continue
        if rotary:
            cos, sin = cos_cache[p], sin_cache[p]
            for h in range(n_heads + n_kv):
                rotate_in_place(qkv[m, h * head_dim : (h + 1) * head_dim], cos, sin, interleaved)
        for g in range(n_kv):
            k_off = q_width + g * head_dim
            v_off = q_width + kv_width + g * head_dim
            for d in range(head_dim):
                cache_k[slot0 + m, g, p, d] = qkv[m, k_off + d]
                cache_v[slot0 + m, g, p, d] = qkv[m, v_off + d]


@njit(parallel=True, fastmath=FAST, cache=True, error_model="numpy")
def attention_decode(  # type: ignore[no-untyped-def]
    qkv,
    positions,
    slot0,
    cache_k,
    cache_v,
    n_heads,
    n_kv,
    head_dim,
    scale,
    window,
    chunk,
    part_max,
    part_sum,
    part_acc,
    out,
):
    """Causal (optionally windowed) GQA for one new token per row, split-K over the context.

    part_max/part_sum [items, G], part_acc [items, G, head_dim] hold each work item's softmax
    state; items = rows * n_kv * chunks_per_row.
    """
    rows = qkv.shape[0]
    group = n_heads // n_kv
    per_row = part_max.shape[0] // rows // n_kv
    items = rows * n_kv * per_row
    for it in prange(items):
        m = it // (n_kv * per_row)
        g = (it // per_row) % n_kv
        j = it % per_row
        part_sum[it] = 0.0  # 0 marks an empty chunk (a non-empty one sums to >= 1)
        p = positions[m]
        if p < 0:
            continue
        lo = 0 if window < 0 else max(0, p - window + 1)
        start = lo + j * chunk
        stop = min(p + 1, start + chunk)
        if start >= stop:
            continue
        span = stop - start
        q = np.empty((group, head_dim), np.float32)  # the group's query heads, pre-scaled
        for hh in range(group):
            q_off = (g * group + hh) * head_dim
            for d in range(head_dim):
                q[hh, d] = qkv[m, q_off + d] * scale
        keys = cache_k[slot0 + m, g]
        values = cache_v[slot0 + m, g]
        scores = np.empty((group, span), np.float32)
        for t in range(span):
            for hh in range(group):
                s = np.float32(0.0)
                for d in range(head_dim):
                    s += q[hh, d] * keys[start + t, d]
                scores[hh, t] = s
        acc = np.zeros((group, head_dim), np.float32)
        for hh in range(group):
            mx = scores[hh, 0]
            for t in range(1, span):
                mx = max(mx, scores[hh, t])
            total = np.float32(0.0)
            for t in range(span):
                e = np.exp(scores[hh, t] - mx)
                scores[hh, t] = e
                total += e
            part_max[it, hh] = mx
            part_sum[it, hh] = total
        for t in range(span):
            for hh in range(group):
                w = scores[hh, t]
                for d in range(head_dim):
                    acc[hh, d] += w * values[start + t, d]
        part_acc[it] = acc
    for m in range(rows):  # exact merge of the partial softmax states
        for g in range(n_kv):
            base = (m * n_kv + g) * per_row
            for hh in range(group):
                o_off = (g * group + hh) * head_dim
                out[m, o_off : o_off + head_dim] = 0.0
                mx = np.float32(0.0)
                seen = False
                for j in range(per_row):
                    if part_sum[base + j, hh] > 0.0 and (not seen or part_max[base + j, hh] > mx):
                        mx = part_max[base + j, hh]
                        seen = True
                if not seen:  # idle row: zero output, as GroupQueryAttention gives
                    continue
                total = np.float32(0.0)
                for j in range(per_row):
                    if part_sum[base + j, hh] > 0.0:
                        f = np.exp(part_max[base + j, hh] - mx)
                        total += f * part_sum[base + j, hh]
                        for d in range(head_dim):
                            out[m, o_off + d] += f * part_acc[base + j, hh, d]
                for d in range(head_dim):
                    out[m, o_off + d] /= total


def chunks_per_row(max_context: int, chunk: int = ATTENTION_CHUNK) -> int:
    return max(1, math.ceil(max_context / chunk))


@njit(fastmath=FAST, cache=True, error_model="numpy")
def decode_step(  # type: ignore[no-untyped-def]
    ids,
    positions,
    logits_rows,
    slot0,
    embed,
    lm_head,
    w_qkv,
    b_qkv,
    w_o,
    w_gate_up,
    w_down,
    norm_in,
    norm_post,
    norm_final,
    eps,
    cos_cache,
    sin_cache,
    rotary,
    interleaved,
    cache_k,
    cache_v,
    n_heads,
    n_kv,
    head_dim,
    scale,
    window,
    chunk,
    per_row,
    part_max,
    part_sum,
    part_acc,
    hidden,
    normed,
    qkv,
    attn,
    proj,
    gate_up,
    act,
    logits,
):
    """One decode step over rows [0, M): token ids [M], positions [M] (-1 = idle row),
    logits_rows [R] -> logits [R, V]. Row m is cache slot slot0 + m of the caches
    [L, max_batch, Nkv, MAX, H], updated in place."""
    rows = ids.shape[0]
    layers = w_qkv.shape[0]
    items = rows * n_kv * per_row
    for m in range(rows):
        hidden[m, :] = embed[ids[m]]
    for layer in range(layers):
        rms_norm(hidden, norm_in[layer], eps, normed)
        matmul_nk(normed, w_qkv[layer], qkv)
        if b_qkv.shape[0]:
            add_into(qkv, b_qkv[layer : layer + 1])
        rotary_and_cache_write(
            qkv,
            positions,
            slot0,
            cache_k[layer],
            cache_v[layer],
            n_heads,
            n_kv,
            head_dim,
            cos_cache,
            sin_cache,
            rotary,
            interleaved,
        )
        attention_decode(
            qkv,
            positions,
            slot0,
            cache_k[layer],
            cache_v[layer],
            n_heads,
            n_kv,
            head_dim,
            scale,
            window,
            chunk,
            part_max[:items],
            part_sum[:items],
            part_acc[:items],
            attn,
        )
        matmul_nk(attn, w_o[layer], proj)
        add_into(hidden, proj)
        rms_norm(hidden, norm_post[layer], eps, normed)
        matmul_nk(normed, w_gate_up[layer], gate_up)
        silu_product(gate_up, act)
        matmul_nk(act, w_down[layer], proj)
        add_into(hidden, proj)
    selected = np.empty((logits_rows.shape[0], hidden.shape[1]), np.float32)
    for r in range(logits_rows.shape[0]):
        selected[r, :] = hidden[logits_rows[r]]
    final = np.empty_like(selected)
    rms_norm(selected, norm_final, eps, final)
    matmul_nk(final, lm_head, logits)
