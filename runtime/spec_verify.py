"""Verification of draft tokens against the target's logits: one pure function.

The target scored K + 1 positions in one call: row i of `target_logits` is its next-token
distribution after the known tokens and the first i draft tokens. Greedy requests accept the
longest prefix of drafts equal to the target's argmax, then take the target's own next token
(so the output is exactly the target's greedy output). Sampling requests use rejection
sampling (Leviathan et al. 2023, Chen et al. 2023): draft token d_i, drawn from q_i, is kept
with probability min(1, p_i(d) / q_i(d)); the first rejected one is replaced by a draw from
normalize(max(0, p_i - q_i)); when all K are kept one more token is drawn from p_K. Every
emitted token is then distributed exactly as the target's p. Model-free drafts (n-gram,
suffix) are a point mass q = 1 at d_i, so d_i is kept with probability p_i(d) and the residual
is p_i with d_i removed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from enginesmith.runtime.sampling import Sampler


def verify(
    draft_tokens: Sequence[int],  # [K]
    draft_probs: np.ndarray
    | None,  # [K, vocab] q_i (the request's params applied), None = point mass
    target_logits: np.ndarray,  # [K + 1, vocab]
    sampler: Sampler,  # the request's own: its params shape p, its rng draws
) -> list[int]:
    """The tokens to emit: the accepted drafts, then one token from the target (1..K+1)."""
    k = len(draft_tokens)
    if target_logits.shape[0] != k + 1:
        raise ValueError(
            f"{k} draft tokens need {k + 1} target logits rows, got {target_logits.shape[0]} "
            "[developer error]"
        )
    if draft_probs is not None and draft_probs.shape[0] != k:
        raise ValueError(f"{k} draft tokens but {draft_probs.shape[0]} q rows [developer error]")
    if sampler.params.greedy:
        return _verify_greedy(draft_tokens, target_logits)
    out: list[int] = []
    for i, token in enumerate(draft_tokens):
        p = sampler.probabilities(target_logits[i])  # [vocab] float64, the request's filters
        q_token = 1.0 if draft_probs is None else float(draft_probs[i, token])
        # Accept with min(1, p/q): u < p/q  <=>  u * q < p (no division by a zero q).
        if sampler.rng.random() * q_token < p[token]:
            out.append(int(token))
            continue
        if draft_probs is None:
            residual = p
            residual[token] = 0.0
        else:
            residual = np.maximum(p - draft_probs[i], 0.0)
        if not residual.sum() > 0:  # p <= q everywhere yet rejected: only by rounding
            residual = sampler.probabilities(target_logits[i])
        out.append(sampler.draw(residual))
        return out
    out.append(sampler.sample(target_logits[k]))  # all K kept: a bonus token from p_K
    return out


def _verify_greedy(draft_tokens: Sequence[int], target_logits: np.ndarray) -> list[int]:
    # Row by row, up to the first mismatch: each argmax reads a vocab-sized row, and the rows
    # after a rejected draft are not needed.
    out: list[int] = []
    for i, token in enumerate(draft_tokens):
        target = int(np.argmax(target_logits[i]))  # the target's greedy token after i drafts
        if target != token:
            out.append(target)
            return out
        out.append(target)
    out.append(int(np.argmax(target_logits[len(draft_tokens)])))
    return out
