"""Decode-step kernels for the CPU: one compiled function runs every layer of a decode step.

A decode step at batch 1 reads every weight once and does ~2 FLOPs per weight: it is bound by
memory bandwidth, and what ONNX Runtime adds on top (a kernel launch per node, a
GroupQueryAttention that reads each KV head once per query head, three nodes for a SiLU
product) costs a quarter of the step on this machine (docs/benchmarks.md, issue 7). These
kernels are compiled by numba (LLVM, the host's vector ISA) into one function per model shape:

* weight products stream each weight row once for all rows of the step (weights stored
  [N, K], as the LM head already is), one contiguous segment of rows per thread;
* attention is split-K flash decoding: each (row, KV head, context chunk) work item reads its
  keys and values once for all query heads of the group, and the partial softmax states are
  merged exactly (the FlashAttention plugin contract, plugins/flash_attention/schema.py);
* RMSNorm, residual adds, rotary, the cache write and SiLU(gate) * up run between them in the
  same compiled code: no per-op dispatch;
* the whole step is ONE parallel region (decode_step): its threads go through the phases in
  order, sharing each weight product and the attention items out through atomic counters
  (runtime/intrinsics.py) and waiting for a phase's last chunk, instead of an OpenMP fork and
  join per product (~150 a step, each a futex wake-up once libgomp stops spinning).

Prefill and mixed steps stay on ONNX Runtime; both share the same KV buffers.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from enginesmith.runtime.intrinsics import argmax, atomic_add, atomic_load, prefetch

ATTENTION_CHUNK = 128  # context positions per attention work item
PREFETCH_ROWS = 16  # keys named ahead of the one being read (4 KiB of fp32 rows of 64)
CACHE_LINE_FLOATS = 16
CHUNKS_PER_THREAD = 8  # claims per thread's segment of a weight product (stealing granularity)
PHASES_PER_LAYER = 10
SYNC_STRIDE = 8  # int64s per cache line: each phase counter on a line of its own
# fastmath without "nnan"/"ninf": reassociation lets LLVM vectorize the reductions, but the
# code must keep its comparisons (an empty softmax chunk is tested, not assumed away).
FAST = {"reassoc", "contract", "arcp", "nsz", "afn"}


@njit(fastmath=FAST, cache=True, error_model="numpy", inline="always")
def _dot_1x4(x, m, w, j, out):  # type: ignore[no-untyped-def]
    """out[m, j:j+4] = x[m] . w[j:j+4]: four independent accumulator chains, four weight
    streams in flight (a step of 1-3 rows streams its weights 3-5% faster in runs of four rows
    than of eight, and sixteen were slower still: scripts/compare_kernel_variants.py,
    docs/benchmarks.md)."""
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for k in range(x.shape[1]):
        xv = x[m, k]
        a0 += xv * w[j, k]
        a1 += xv * w[j + 1, k]
        a2 += xv * w[j + 2, k]
        a3 += xv * w[j + 3, k]
    out[m, j], out[m, j + 1], out[m, j + 2], out[m, j + 3] = a0, a1, a2, a3


@njit(fastmath=FAST, cache=True, error_model="numpy", inline="always")
def _dot_4x4(x, m, w, j, out):  # type: ignore[no-untyped-def]
    """out[m:m+4, j:j+4]: a 4x4 register tile, so each loaded weight serves four rows."""
    c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = np.float32(0.0)
    c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = np.float32(0.0)
    for k in range(x.shape[1]):
        x0, x1, x2, x3 = x[m, k], x[m + 1, k], x[m + 2, k], x[m + 3, k]
        w0, w1, w2, w3 = w[j, k], w[j + 1, k], w[j + 2, k], w[j + 3, k]
        c00 += x0 * w0
        c01 += x0 * w1
        c02 += x0 * w2
        c03 += x0 * w3
        c10 += x1 * w0
        c11 += x1 * w1
        c12 += x1 * w2
        c13 += x1 * w3
        c20 += x2 * w0
        c21 += x2 * w1
        c22 += x2 * w2
        c23 += x2 * w3
        c30 += x3 * w0
        c31 += x3 * w1
        c32 += x3 * w2
        c33 += x3 * w3
    out[m, j], out[m, j + 1], out[m, j + 2], out[m, j + 3] = c00, c01, c02, c03
    out[m + 1, j], out[m + 1, j + 1], out[m + 1, j + 2], out[m + 1, j + 3] = c10, c11, c12, c13
    out[m + 2, j], out[m + 2, j + 1], out[m + 2, j + 2], out[m + 2, j + 3] = c20, c21, c22, c23
    out[m + 3, j], out[m + 3, j + 1], out[m + 3, j + 2], out[m + 3, j + 3] = c30, c31, c32, c33


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
def silu_product(gate_up, out, bits):  # type: ignore[no-untyped-def]
    """out = SiLU(gate_up[:, :I]) * gate_up[:, I:] (the packed gate/up projection); bits is
    int32 scratch of length >= I."""
    rows, width = out.shape
    for m in range(rows):
        row = out[m]
        for j in range(width):
            row[j] = -gate_up[m, j]
        _exp_in_place(row, width, bits)  # row = exp(-g)
        for j in range(width):
            row[j] = gate_up[m, j] / (np.float32(1.0) + row[j]) * gate_up[m, width + j]


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


@njit(fastmath=FAST, cache=True, error_model="numpy", inline="always")
def _exp_in_place(x, n, bits):  # type: ignore[no-untyped-def]
    """x[:n] = exp(x[:n]) in loops LLVM vectorizes (libm's expf is a scalar call per
    element). Cephes' expf:
    x = k ln2 + r, |r| <= ln2/2, degree-7 polynomial for e^r, 2^k built in the exponent bits
    of `bits` (int32 scratch, len >= n). Relative error ~1e-7; inputs are clamped to
    [-87, 88] (results ~1e-38 instead of denormals or 0, ~1.7e38 instead of inf)."""
    scaled = bits.view(np.float32)
    for t in range(n):
        y = min(max(x[t], np.float32(-87.0)), np.float32(88.0))
        k = np.floor(y * np.float32(1.4426950408889634) + np.float32(0.5))
        r = y - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        x[t] = p * r * r + r + np.float32(1.0)
        bits[t] = (np.int32(k) + np.int32(127)) << np.int32(23)
    for t in range(n):
        x[t] *= scaled[t]


@njit(fastmath=FAST, cache=True, error_model="numpy", inline="always")
def _scores(q, keys, values, start, span, scores):  # type: ignore[no-untyped-def]
    """scores[:, :span] = q . keys[start + t] for every query head of the group (the rows of
    q) per key row read (the row stays in L1 across the heads; the group is not padded).
    Prefetches the key PREFETCH_ROWS ahead and the
    value row the weighted sum reads next: each run of rows is too short for the hardware's
    prefetchers, and in a step the weights' stream has pushed the cache out of L3."""
    last = keys.shape[0] - 1
    for t in range(span):
        key = keys[start + t]
        ahead = keys[min(start + t + PREFETCH_ROWS, last)]
        for c in range(0, key.shape[0], CACHE_LINE_FLOATS):
            prefetch(ahead, c)
            prefetch(values[start + t], c)
        for hh in range(q.shape[0]):
            qh = q[hh]
            s = np.float32(0.0)
            for d in range(key.shape[0]):
                s += qh[d] * key[d]
            scores[hh, t] = s


@njit(fastmath=FAST, cache=True, error_model="numpy", inline="always")
def _weighted_values(scores, values, start, span, acc):  # type: ignore[no-untyped-def]
    """acc = sum_t scores[:, t] * values[start + t] for every head of the group (the rows of
    acc) per value row read, four value rows per accumulator update (a quarter of the
    accumulator's loads and stores)."""
    width = values.shape[1]
    heads = acc.shape[0]
    acc[:, :] = 0.0
    t = 0
    while t + 4 <= span:
        v0, v1 = values[start + t], values[start + t + 1]
        v2, v3 = values[start + t + 2], values[start + t + 3]
        for hh in range(heads):
            w0, w1, w2, w3 = scores[hh, t], scores[hh, t + 1], scores[hh, t + 2], scores[hh, t + 3]
            a = acc[hh]
            for d in range(width):
                a[d] += w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d]
        t += 4
    while t < span:
        v0 = values[start + t]
        for hh in range(heads):
            w0 = scores[hh, t]
            a = acc[hh]
            for d in range(width):
                a[d] += w0 * v0[d]
        t += 1


@njit(fastmath=FAST, cache=True, error_model="numpy")
def _merge_partials(  # type: ignore[no-untyped-def]
    item_row, item_head, items, group, head_dim, part_max, part_sum, part_acc, out
):
    """Exact merge of the split-K softmax states into out (items of one (row, KV head) are
    consecutive). A function of its own: in a parallel=True function every array expression
    becomes a parallel region, and launching one per head costs more than the merge."""
    first_item = 0
    while first_item < items:
        m, g = item_row[first_item], item_head[first_item]
        end = first_item + 1
        while end < items and item_row[end] == m and item_head[end] == g:
            end += 1
        for hh in range(group):
            o_off = (g * group + hh) * head_dim
            mx = part_max[first_item, hh]
            for j in range(first_item + 1, end):
                mx = max(mx, part_max[j, hh])
            for d in range(head_dim):
                out[m, o_off + d] = 0.0
            total = np.float32(0.0)
            for j in range(first_item, end):
                f = np.exp(part_max[j, hh] - mx)
                total += f * part_sum[j, hh]
                for d in range(head_dim):
                    out[m, o_off + d] += f * part_acc[j, hh, d]
            inv = np.float32(1.0) / total
            for d in range(head_dim):
                out[m, o_off + d] *= inv
        first_item = end


@njit(fastmath=FAST, cache=True, error_model="numpy", inline="always")
def _attention_items(positions, n_kv, window, chunk, cap):  # type: ignore[no-untyped-def]
    """The step's attention work items: one per (row, KV head, chunk of `chunk` keys) that
    holds keys (idle rows, position -1, have none), at most CAP. Returns their rows, KV
    heads, first and stop key positions, and their number."""
    item_row = np.empty(cap, np.int64)
    item_head = np.empty(cap, np.int64)
    item_start = np.empty(cap, np.int64)
    item_stop = np.empty(cap, np.int64)
    items = 0
    for m in range(positions.shape[0]):
        p = positions[m]
        if p < 0:
            continue
        first = 0 if window < 0 else max(0, p - window + 1)
        for g in range(n_kv):
            for begin in range(first, p + 1, chunk):
                item_row[items], item_head[items] = m, g
                item_start[items], item_stop[items] = begin, min(p + 1, begin + chunk)
                items += 1
    return item_row, item_head, item_start, item_stop, items


@njit(fastmath=FAST, cache=True, error_model="numpy", inline="always")
def _attention_item(  # type: ignore[no-untyped-def]
    it, item_row, item_head, item_start, item_stop, qkv, slot0, cache_k, cache_v, head_dim,
    scale, q, scores, bits, part_max, part_sum, part_acc,
):  # fmt: skip
    """One work item: its keys and values read once for the whole query group; its softmax
    state (max, sum, unnormalized output) left in part_max/part_sum/part_acc[it]."""
    group = q.shape[0]
    m, g = item_row[it], item_head[it]
    start, span = item_start[it], item_stop[it] - item_start[it]
    keys = cache_k[slot0 + m, g]
    values = cache_v[slot0 + m, g]
    for hh in range(group):  # the group's query heads, pre-scaled
        q_off = (g * group + hh) * head_dim
        for d in range(head_dim):
            q[hh, d] = qkv[m, q_off + d] * scale
    _scores(q, keys, values, start, span, scores)
    for hh in range(group):
        row = scores[hh]
        mx = row[0]
        for t in range(1, span):
            mx = max(mx, row[t])
        for t in range(span):
            row[t] -= mx
        _exp_in_place(row, span, bits)
        total = np.float32(0.0)
        for t in range(span):
            total += row[t]
        part_max[it, hh] = mx
        part_sum[it, hh] = total
    _weighted_values(scores, values, start, span, part_acc[it])


@njit(fastmath=FAST, cache=True, error_model="numpy", inline="always")
def _zero_idle_rows(positions, out):  # type: ignore[no-untyped-def]
    """Idle rows (position -1) get a zero attention output, as GroupQueryAttention gives."""
    for m in range(positions.shape[0]):
        if positions[m] < 0:
            for j in range(out.shape[1]):
                out[m, j] = 0.0


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
    """Causal (optionally windowed) GQA for one new token per row, split-K over the context,
    as a parallel region of its own (the attention_only diagnostic; a decode step runs the
    same items inside its one region, decode_step).

    One work item is (row, KV head, chunk of `chunk` keys); only chunks that hold keys become
    items, so both threads get work at any context length. Each item reads its keys and
    values once for the whole query group and leaves its softmax state
    (max, sum, unnormalized output) in part_max/part_sum [cap, G] and part_acc [cap, G, H];
    the states of one (row, KV head) are then merged exactly.
    """
    group = n_heads // n_kv
    item_row, item_head, item_start, item_stop, items = _attention_items(
        positions, n_kv, window, chunk, part_max.shape[0]
    )
    for it in prange(items):
        q = np.empty((group, head_dim), np.float32)
        scores = np.empty((group, chunk), np.float32)
        bits = np.empty(chunk, np.int32)
        _attention_item(
            it, item_row, item_head, item_start, item_stop, qkv, slot0, cache_k, cache_v,
            head_dim, scale, q, scores, bits, part_max, part_sum, part_acc,
        )  # fmt: skip
    _merge_partials(item_row, item_head, items, group, head_dim, part_max, part_sum, part_acc, out)
    _zero_idle_rows(positions, out)


def chunks_per_row(max_context: int, chunk: int = ATTENTION_CHUNK) -> int:
    return max(1, math.ceil(max_context / chunk))


@njit(cache=True)
def phases_per_step(layers):  # type: ignore[no-untyped-def]
    """Phases of one decode step: PHASES_PER_LAYER per layer, the final norm, the LM head and
    the token pick of a greedy run."""
    return layers * PHASES_PER_LAYER + 3


def sync_counters(layers: int, threads: int, steps: int = 1) -> int:
    """Length of the int64 counter array that STEPS decode steps over LAYERS layers on THREADS
    threads synchronize on: per phase, one claim counter per thread's segment and a done
    counter; then the counter that numbers the threads."""
    phases = phases_per_step(layers) * steps
    return (phases * (threads + 1) + 1) * SYNC_STRIDE


@njit(cache=True, inline="always")
def _counter(phase, slot, threads):  # type: ignore[no-untyped-def]
    """Index of PHASE's counter SLOT (0..threads-1: segment claims, threads: done chunks)."""
    return (phase * (threads + 1) + slot) * SYNC_STRIDE


@njit(cache=True, inline="always")
def _wait(sync, phase, threads, chunks):  # type: ignore[no-untyped-def]
    """Spin until all CHUNKS chunks of PHASE are done."""
    while atomic_load(sync, _counter(phase, threads, threads)) < chunks:
        pass


@njit(cache=True, inline="always")
def _claims_serial(sync, phase, threads, weights_only):  # type: ignore[no-untyped-def]
    """Whether this thread runs PHASE, a sequential piece (the first to claim it does; none
    in a weights-only step). Every thread then calls _end_serial with the answer."""
    return not weights_only and atomic_add(sync, _counter(phase, 0, threads), 1) == 0


@njit(cache=True, inline="always")
def _end_serial(sync, phase, threads, weights_only, ran):  # type: ignore[no-untyped-def]
    """End PHASE, a sequential piece: the thread that RAN it counts it done (its writes are
    visible to whoever sees the count), every thread waits for that count (none in a
    weights-only step)."""
    if ran:
        atomic_add(sync, _counter(phase, threads, threads), 1)
    _wait(sync, phase, threads, 0 if weights_only else 1)


@njit(cache=True, inline="always")
def _claim_in_segments(sync, phase, me, threads, total, cursor, step=1):  # type: ignore[no-untyped-def]
    """The first of the next STEP (or fewer, at a segment's end) of TOTAL units of PHASE for
    thread ME, or -1 when none is left; cursor[1] is then the end of the claimed run. The units
    are cut into one contiguous segment per thread: ME's own first, front to back (one long
    stream for the hardware prefetchers), then what is left of the others' (a thread the OS
    slows down, or one that never starts, holds no one up). CURSOR (int64[2], cursor[0] = 0 at
    the phase's start) counts the segments ME has used up."""
    while cursor[0] < threads:
        segment = (me + cursor[0]) % threads
        lo, hi = total * segment // threads, total * (segment + 1) // threads
        unit = lo + atomic_add(sync, _counter(phase, segment, threads), step)
        if unit < hi:
            cursor[1] = min(hi, unit + step)
            return unit
        cursor[0] += 1
    return -1


@njit(cache=True, inline="always")
def _finish_phase(sync, phase, threads, done, total):  # type: ignore[no-untyped-def]
    """Count this thread's DONE units of PHASE, then wait for all TOTAL: one count per thread,
    since the done counter is the line every thread writes and moving it between cores per
    unit cost more than the units' bookkeeping."""
    atomic_add(sync, _counter(phase, threads, threads), done)
    _wait(sync, phase, threads, total)


@njit(fastmath=FAST, cache=True, error_model="numpy", inline="always")
def _matmul_rows(x, w, out, j0, j1):  # type: ignore[no-untyped-def]
    """out[:, j0:j1] = x @ w[j0:j1]^T: 8-row weight blocks read once for all rows of x (4x4
    tiles for each four rows, two 1x4 passes for each of the rest, the block then in L1); with
    fewer than four rows, 4-row blocks (_dot_1x4) in a loop of their own (the same calls
    inside the 8-row loop made the 1-row step 8% slower: the compiler laid the step out
    differently, docs/benchmarks.md)."""
    rows = x.shape[0]
    j = j0
    if rows < 4:  # no 4x4 tile: four weight rows at a time (_dot_1x4)
        while j + 4 <= j1:
            for m in range(rows):
                _dot_1x4(x, m, w, j, out)
            j += 4
    while j + 8 <= j1:
        m = 0
        while m + 4 <= rows:
            _dot_4x4(x, m, w, j, out)
            _dot_4x4(x, m, w, j + 4, out)
            m += 4
        while m < rows:
            _dot_1x4(x, m, w, j, out)
            _dot_1x4(x, m, w, j + 4, out)
            m += 1
        j += 8
    while j < j1:
        for m in range(rows):
            acc = np.float32(0.0)
            for k in range(x.shape[1]):
                acc += x[m, k] * w[j, k]
            out[m, j] = acc
        j += 1


@njit(fastmath=FAST, cache=True, error_model="numpy", inline="always")
def _matmul_phase(sync, phase, me, threads, cursor, x, w, out):  # type: ignore[no-untyped-def]
    """out = x @ w^T as one phase over 8-row weight blocks: each thread's segment holds an equal
    share of the blocks, claimed in about CHUNKS_PER_THREAD runs (_claim_in_segments). Segments
    of whole runs instead (15 runs of 64 rows for a 960-row QKV) left one thread a run more, for
    the other to steal cold at the phase's end: 1.6% of a step at two CCXs, 1.1% at one
    (scripts/compare_kernel_variants.py, docs/benchmarks.md)."""
    n = w.shape[0]
    blocks = (n + 7) // 8
    step = max(1, (blocks + threads * CHUNKS_PER_THREAD - 1) // (threads * CHUNKS_PER_THREAD))
    cursor[0], done = 0, 0
    b = _claim_in_segments(sync, phase, me, threads, blocks, cursor, step)
    while b >= 0:
        end = cursor[1]
        _matmul_rows(x, w, out, b * 8, min(n, end * 8))
        done += end - b
        b = _claim_in_segments(sync, phase, me, threads, blocks, cursor, step)
    _finish_phase(sync, phase, threads, done, blocks)


@njit(fastmath=FAST, cache=True, error_model="numpy")
def _step_thread(  # type: ignore[no-untyped-def]
    threads, weights_only, ids, positions, logits_rows, slot0, embed, lm_head, w_qkv, b_qkv, w_o,
    w_gate_up, w_down, norm_in, norm_post, norm_final, eps, cos_cache, sin_cache, rotary,
    interleaved, cache_k, cache_v, n_heads, n_kv, head_dim, scale, window, chunk, part_max,
    part_sum, part_acc, hidden, normed, qkv, attn, proj, gate_up, act, selected, final, logits,
    tokens, stop_ids, sync,
):  # fmt: skip
    """One thread's part of a decode step: the phases in order, each weight product and the
    attention items shared out chunk by chunk, each sequential piece (norms, residual adds,
    rotary and cache write, softmax merge, SiLU product) run by the first thread to claim it.
    A thread waits for a phase's last chunk before the next phase. Correct with any number of
    threads actually running, one included: a thread that arrives late finds every chunk
    claimed and every count reached. WEIGHTS_ONLY runs the weight products alone.

    A non-empty TOKENS (one row) makes it a greedy run of len(TOKENS) steps: after each LM
    head the argmax token is written to TOKENS and becomes the next step's input at the next
    position; a token in STOP_IDS ends the run (the rest of TOKENS keeps its -1)."""
    rows = ids.shape[0]
    steps = max(1, tokens.shape[0])
    picks = tokens.shape[0] > 0 and not weights_only
    per_step = phases_per_step(w_qkv.shape[0])
    me = atomic_add(sync, _counter(per_step * steps, 0, threads), 1) % threads  # its segments
    group = n_heads // n_kv
    q = np.empty((group, head_dim), np.float32)
    scores = np.empty((group, chunk), np.float32)
    attention_bits = np.empty(chunk, np.int32)
    silu_bits = np.empty(act.shape[1], np.int32)
    cursor = np.zeros(2, np.int64)
    phase = 0
    # A greedy run's step s is at positions + s, its input the token step s - 1 picked: each
    # thread derives them, never reading state a thread ahead of it may already have changed
    # (a thread can finish a whole step alone while the other is descheduled).
    step_positions = positions.copy()
    step_ids = ids.copy()
    for step in range(steps):
        if step > 0:
            step_positions[0] = positions[0] + step
            step_ids[0] = tokens[step - 1]
        item_row, item_head, item_start, item_stop, items = _attention_items(
            step_positions, n_kv, window, chunk, part_max.shape[0]
        )
        for layer in range(w_qkv.shape[0]):
            ran = _claims_serial(sync, phase, threads, weights_only)
            if ran:
                if layer == 0:
                    for m in range(rows):
                        hidden[m, :] = embed[step_ids[m]]
                else:
                    add_into(hidden, proj)  # the previous layer's down projection
                rms_norm(hidden, norm_in[layer], eps, normed)
            _end_serial(sync, phase, threads, weights_only, ran)
            phase += 1
            _matmul_phase(sync, phase, me, threads, cursor, normed, w_qkv[layer], qkv)
            phase += 1
            ran = _claims_serial(sync, phase, threads, weights_only)
            if ran:
                if b_qkv.shape[0]:
                    add_into(qkv, b_qkv[layer : layer + 1])
                rotary_and_cache_write(
                    qkv, step_positions, slot0, cache_k[layer], cache_v[layer], n_heads, n_kv,
                    head_dim, cos_cache, sin_cache, rotary, interleaved,
                )  # fmt: skip
            _end_serial(sync, phase, threads, weights_only, ran)
            phase += 1
            if not weights_only:
                cursor[0], done = 0, 0
                it = _claim_in_segments(sync, phase, me, threads, items, cursor)
                while it >= 0:
                    _attention_item(
                        it, item_row, item_head, item_start, item_stop, qkv, slot0, cache_k[layer],
                        cache_v[layer], head_dim, scale, q, scores, attention_bits, part_max,
                        part_sum, part_acc,
                    )  # fmt: skip
                    done += 1
                    it = _claim_in_segments(sync, phase, me, threads, items, cursor)
                _finish_phase(sync, phase, threads, done, items)
            phase += 1
            ran = _claims_serial(sync, phase, threads, weights_only)
            if ran:
                _merge_partials(
                    item_row, item_head, items, group, head_dim, part_max, part_sum, part_acc, attn
                )
                _zero_idle_rows(step_positions, attn)
            _end_serial(sync, phase, threads, weights_only, ran)
            phase += 1
            _matmul_phase(sync, phase, me, threads, cursor, attn, w_o[layer], proj)
            phase += 1
            ran = _claims_serial(sync, phase, threads, weights_only)
            if ran:
                add_into(hidden, proj)
                rms_norm(hidden, norm_post[layer], eps, normed)
            _end_serial(sync, phase, threads, weights_only, ran)
            phase += 1
            _matmul_phase(sync, phase, me, threads, cursor, normed, w_gate_up[layer], gate_up)
            phase += 1
            ran = _claims_serial(sync, phase, threads, weights_only)
            if ran:
                silu_product(gate_up, act, silu_bits)
            _end_serial(sync, phase, threads, weights_only, ran)
            phase += 1
            _matmul_phase(sync, phase, me, threads, cursor, act, w_down[layer], proj)
            phase += 1
        ran = _claims_serial(sync, phase, threads, weights_only)
        if ran:
            add_into(hidden, proj)
            for r in range(logits_rows.shape[0]):
                selected[r, :] = hidden[logits_rows[r]]
            rms_norm(selected, norm_final, eps, final)
        _end_serial(sync, phase, threads, weights_only, ran)
        phase += 1
        _matmul_phase(sync, phase, me, threads, cursor, final, lm_head, logits)
        phase += 1
        if picks:  # the greedy run's token pick; every thread then reads the token it made
            ran = _claims_serial(sync, phase, threads, False)
            if ran:
                tokens[step] = argmax(logits[0])
            _end_serial(sync, phase, threads, False, ran)
            if (stop_ids == tokens[step]).any():
                break
        phase += 1


@njit(parallel=True, fastmath=FAST, cache=True, error_model="numpy")
def decode_step(  # type: ignore[no-untyped-def]
    threads, weights_only, ids, positions, logits_rows, slot0, embed, lm_head, w_qkv, b_qkv,
    w_o, w_gate_up, w_down, norm_in, norm_post, norm_final, eps, cos_cache, sin_cache, rotary,
    interleaved, cache_k, cache_v, n_heads, n_kv, head_dim, scale, window, chunk, part_max,
    part_sum, part_acc, hidden, normed, qkv, attn, proj, gate_up, act, selected, final, logits,
    tokens, stop_ids, sync,
):  # fmt: skip
    """One decode step over rows [0, M) as ONE parallel region: token ids [M], positions [M]
    (-1 = idle row), logits_rows [R] -> logits [R, V]. Row m is cache slot slot0 + m of the
    caches [L, max_batch, Nkv, MAX, H], updated in place. With a non-empty TOKENS [K] (M = 1),
    K greedy steps instead, each step's argmax token written to TOKENS and fed to the next
    (step s at positions[0] + s), up to a token in STOP_IDS. SYNC
    (sync_counters(L, threads, max(1, K)) int64s) must be zero on entry.

    One region instead of one per weight product and attention (~150 a step): libgomp stops
    spinning between regions once its thread teams outnumber the cores (a second thread
    launching kernels, torch's team), and each region then costs a futex wake-up."""
    for _ in prange(threads):
        _step_thread(
            threads, weights_only, ids, positions, logits_rows, slot0, embed, lm_head, w_qkv,
            b_qkv, w_o, w_gate_up, w_down, norm_in, norm_post, norm_final, eps, cos_cache,
            sin_cache, rotary, interleaved, cache_k, cache_v, n_heads, n_kv, head_dim, scale, window,
            chunk, part_max, part_sum, part_acc, hidden, normed, qkv, attn, proj, gate_up, act,
            selected, final, logits, tokens, stop_ids, sync,
        )  # fmt: skip


@njit(fastmath=FAST, cache=True, error_model="numpy")
def attention_only(  # type: ignore[no-untyped-def]
    qkv, positions, cache_k, cache_v, n_heads, n_kv, head_dim, scale, window, chunk, part_max,
    part_sum, part_acc, attn,
):  # fmt: skip
    """Every layer's attention of one decode step over slots [0, M), and nothing else: what
    attention costs of a step (scripts/compare_decode_kernels.py)."""
    for layer in range(cache_k.shape[0]):
        attention_decode(
            qkv, positions, 0, cache_k[layer], cache_v[layer], n_heads, n_kv, head_dim, scale,
            window, chunk, part_max, part_sum, part_acc, attn,
        )  # fmt: skip
