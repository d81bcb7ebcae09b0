"""Prompt lookup (n-gram) drafts: find the context's last n tokens earlier in the prompt or
output and propose what followed them (llama.cpp's prompt lookup, vLLM's ngram proposer).
Costs no engine call; drafts are a point mass for rejection sampling."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from enginesmith.runtime.spec_proposer import Draft, SpecRequest


def ngram_lookup(
    tokens: Sequence[int], max_draft: int, min_n: int = 1, max_n: int = 4
) -> list[int]:
    """The tokens after the most recent earlier occurrence of the longest suffix of TOKENS
    (length max_n down to min_n) that occurred before; [] when none did."""
    if max_draft <= 0 or len(tokens) < 2:
        return []
    arr = np.asarray(tokens, np.int64)
    size = arr.shape[0]
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        pattern = arr[size - n :]
        # Windows starting at 0..size-n-1 (the suffix itself, at size-n, is excluded).
        windows = np.lib.stride_tricks.sliding_window_view(arr[: size - 1], n)
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if hits.size:
            after = int(hits[-1]) + n  # most recent occurrence: local context predicts best
            # A continuation that runs into the end goes on with the draft itself (a period).
            out: list[int] = []
            for j in range(max_draft):
                at = after + j
                out.append(int(arr[at]) if at < size else out[at - size])
            return out
    return []


class NgramProposer:
    name = "ngram"
    is_model = False

    def __init__(self, min_n: int = 1, max_n: int = 4) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, requests: Sequence[SpecRequest]) -> dict[str, Draft]:
        drafts = {}
        for r in requests:
            tokens = ngram_lookup(r.token_ids, r.max_draft, self.min_n, self.max_n)
            if tokens:
                drafts[r.request_id] = Draft(tokens)
        return drafts

    def finish(self, request_id: str, token_ids: list[int], num_prompt_tokens: int) -> None:
        pass
