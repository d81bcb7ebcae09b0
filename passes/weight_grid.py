"""Recover a weight's quantization grid when it already sits on one (a GGUF source's Q4_1 / Q8_0).

A model loaded from a GGUF file is dequantized to float32 by transformers, but its values stay
on the file's grid, per block of 32 along K (the input dimension):

  Q4_1:  w = d * q + m, q in [0, 15]   (the block's minimum maps to q = 0, its maximum to 15)
  Q8_0:  w = d * q,     q in [-127, 127] (the block's largest |w| maps to +-127)

Re-rounding such weights onto MatMulNBits' own grid loses what llama.cpp keeps (SmolLM2:
perplexity 15.5 -> 18.7 at int4). Recovered exactly instead, the codes and scales go into
MatMulNBits unchanged; Q4_1's free offset m, which MatMulNBits cannot hold at speed (its integer
zero point cannot express it, a float zero point takes a ~100x slower kernel), becomes one small
extra product per block, sum over the block of x times m: the same split llama.cpp's own Q4_1
dot product makes (d * sum(q * x) + m * sum(x)).

A fit is accepted only when every block of the weight reproduces within GRID_RTOL of its step:
random float weights never pass (their rounding error is up to half a step).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GRID_BLOCK = 32  # Q4_1 and Q8_0 blocks
GRID_RTOL = 1e-3  # of the block's step d: fp16 d and m, dequantized in fp32, round-trip far below


@dataclass
class GridFit:
    """A weight [N, K] on a block grid, in MatMulNBits' terms: w = (code - 2^(bits-1)) * scale
    (the default zero point) + offset."""

    bits: int
    codes: np.ndarray  # uint8 [N, k_blocks, GRID_BLOCK] in [0, 2^bits)
    scales: np.ndarray  # float32 [N, k_blocks]
    offsets: np.ndarray | None  # float32 [N, k_blocks]; None: no offset (Q8_0)

    def dequantize(self) -> np.ndarray:
        """The weight [N, K] the fit represents (float32)."""
        mid = 1 << (self.bits - 1)
        w = (self.codes.astype(np.float32) - mid) * self.scales[..., None]
        if self.offsets is not None:
            w += self.offsets[..., None]
        return w.reshape(self.codes.shape[0], -1)


def _blocks(rows: np.ndarray) -> np.ndarray | None:
    n, k = rows.shape
    if k % GRID_BLOCK:
        return None
    return np.asarray(rows, np.float32).reshape(n, k // GRID_BLOCK, GRID_BLOCK)


def fit_affine4(rows: np.ndarray) -> GridFit | None:
    """ROWS [N, K] on a Q4_1 grid (16 levels spanning each block's range), or None."""
    blocks = _blocks(rows)
    if blocks is None:
        return None
    lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
    step = (hi - lo) / 15
    safe = np.where(step > 0, step, 1.0).astype(np.float32)
    q = np.clip(np.rint((blocks - lo[..., None]) / safe[..., None]), 0, 15)
    error = np.abs(q * safe[..., None] + lo[..., None] - blocks)
    if not np.all(error <= GRID_RTOL * safe[..., None]):
        return None
    # Codes around MatMulNBits' default zero point 8: w = (q - 8) * d + (m + 8 d).
    return GridFit(4, q.astype(np.uint8), safe, (lo + 8 * safe).astype(np.float32))


def fit_symmetric8(rows: np.ndarray) -> GridFit | None:
    """ROWS [N, K] on a Q8_0 grid (d * q, q in [-127, 127] per block), or None."""
    blocks = _blocks(rows)
    if blocks is None:
        return None
    step = np.abs(blocks).max(axis=-1) / 127
    safe = np.where(step > 0, step, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / safe[..., None]), -127, 127)
    if not np.all(np.abs(q * safe[..., None] - blocks) <= GRID_RTOL * safe[..., None]):
        return None
    return GridFit(8, (q + 128).astype(np.uint8), safe, None)


def fit_grid(rows: np.ndarray, bits: int) -> GridFit | None:
    """The grid of BITS that ROWS [N, K] sit on exactly: Q4_1 for 4 bits, Q8_0 for 8; None when
    they do not."""
    return fit_affine4(rows) if bits == 4 else fit_symmetric8(rows) if bits == 8 else None
