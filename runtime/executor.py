"""The executor interface: what every backend's engine runner implements, and what they share
(`step` inputs, slot checks, warm-up, steps wider than an engine allows).

An executor runs one engine step over the engine's KV slots: rows are slots, each row with its
own cached length and number of new tokens (0 = idle), the cache updated in place. Prefill,
chunked prefill, decode and multi-token verification are the same call with different token
counts. `runtime/executors.py` picks the implementation from the manifest.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import numpy as np

# How a CPU executor's worker threads wait between kernels: "always" spin (fastest for one
# caller); "in_run" spin but stop when a run returns (sessions that take turns: a draft and its
# target); "never" spin (an asyncio server shares the cores). GPU executors ignore it.
SpinMode = Literal["always", "in_run", "never"]


class Executor(Protocol):
    """One engine's step runner over its slot-based KV cache (ONNX Runtime CPU or CUDA,
    TensorRT)."""

    max_batch: int  # KV slots
    max_seq_len: int  # tokens one slot holds
    vocab_size: int

    def warmup(self) -> None:
        """Run idle steps of each shape so that first-call costs stay out of request timings."""
        ...

    def step(
        self,
        start: int,
        input_ids: np.ndarray,  # [n, S] int64, right-padded
        position_ids: np.ndarray,  # [n, S] int64
        seqlens_k: np.ndarray,  # [n] int32: tokens in the slot after this step - 1
        query_seqlens: np.ndarray,  # [n] int32: valid new tokens per row (0 = idle)
        logits_indices: np.ndarray,  # [m] int64: flat row * S + s positions that need logits
    ) -> np.ndarray:
        """Run slots [start, start + n); return logits [m, vocab] (float32)."""
        ...


# The step inputs every executor takes besides the caches, with their dtypes.
STEP_INPUTS = (
    ("input_ids", np.int64),  # [n, S], right-padded
    ("position_ids", np.int64),  # [n, S]
    ("seqlens_k", np.int32),  # [n]: tokens in the slot after this step - 1
    ("query_seqlens", np.int32),  # [n]: valid new tokens per row (0 = idle)
    ("logits_indices", np.int64),  # [m]: flat row * S + s positions that need logits
)


def check_slot_range(start: int, rows: int, max_batch: int) -> None:
    if start < 0 or start + rows > max_batch:
        raise ValueError(
            f"slots [{start}, {start + rows}) outside [0, {max_batch}) [developer error]"
        )


def step_arrays(*arrays: np.ndarray) -> dict[str, np.ndarray]:
    """The step inputs (in STEP_INPUTS order) by name, contiguous, in the engine's dtypes."""
    return {
        name: np.ascontiguousarray(array, dtype)
        for (name, dtype), array in zip(STEP_INPUTS, arrays, strict=True)
    }


def bind_step_inputs(binding: Any, *arrays: np.ndarray) -> None:
    """Bind the step inputs (STEP_INPUTS order) to an ONNX Runtime IOBinding from host memory."""
    for name, array in step_arrays(*arrays).items():
        binding.bind_cpu_input(name, array)


def warmup_idle_steps(step: Any, max_step_tokens: int) -> None:
    """One idle step (query_seqlens 0: no cache row is touched) per step shape, decode and
    prefill: first runs allocate, plan and pick kernels; keep that out of request timings. A
    2-token step is too small to set up the CPU prefill path (measured: the first 31-token
    prefill then took ~1 s), hence 16."""
    for seq in (1, min(16, max_step_tokens)):
        ids = np.zeros((1, seq), np.int64)
        zero = np.zeros(1, np.int32)
        step(0, ids, ids, zero, zero, np.zeros(1, np.int64))


def step_in_chunks(
    step: Any,
    max_tokens: int,
    start: int,
    input_ids: np.ndarray,  # [n, S], S > max_tokens
    position_ids: np.ndarray,
    seqlens_k: np.ndarray,
    query_seqlens: np.ndarray,
    logits_indices: np.ndarray,
) -> np.ndarray:
    """Run a step wider than the engine's max step tokens as consecutive narrower steps.

    GPU engines have a fixed largest step (their scratch tail and optimization profile); callers
    like quality.engine_logits prefill longer chunks. Chunk c covers new tokens [c0, c1) of every
    row; a row with Q valid tokens has min(max(Q - c0, 0), c1 - c0) of them in it, cached on top
    of the P + c0 tokens before, and is idle in chunks past its Q.
    """
    seq = input_ids.shape[1]
    valid = np.asarray(query_seqlens, np.int64)
    past = np.where(valid > 0, np.asarray(seqlens_k, np.int64) + 1 - valid, 0)
    pieces: dict[int, np.ndarray] = {}
    wanted = np.asarray(logits_indices, np.int64)
    for c0 in range(0, seq, max_tokens):
        c1 = min(seq, c0 + max_tokens)
        in_chunk = np.clip(valid - c0, 0, c1 - c0)
        chunk_seqk = np.where(in_chunk > 0, past + c0 + in_chunk - 1, 0).astype(np.int32)
        picks = [i for i, flat in enumerate(wanted) if c0 <= flat % seq < c1]
        local = np.array([(wanted[i] // seq) * (c1 - c0) + wanted[i] % seq - c0 for i in picks])
        logits = step(
            start,
            input_ids[:, c0:c1],
            position_ids[:, c0:c1],
            chunk_seqk,
            in_chunk.astype(np.int32),
            local if picks else np.zeros(1, np.int64),
        )
        for i, row in zip(picks, logits, strict=False):
            pieces[i] = row
    if not pieces:
        return np.empty((len(wanted), 0), np.float32)
    return np.stack([pieces[i] for i in range(len(wanted))])
