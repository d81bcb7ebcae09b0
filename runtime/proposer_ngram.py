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


class NgramIndex:
    """ngram_lookup over a growing token list, kept up to date instead of rescanned: the most
    recent start of every n-gram (min_n..max_n) that ends before the last token. A round costs
    O(max_n) dict lookups plus O(max_n) per new token, not a scan of the whole context."""

    def __init__(self, min_n: int = 1, max_n: int = 4) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self._start: dict[tuple[int, ...], int] = {}  # n-gram -> its most recent start

    def update(self, tokens: Sequence[int]) -> None:
        """TOKENS: the list so far; normally the last one passed plus new tokens."""
        old = len(self.tokens)
        if len(tokens) < old or (old and tokens[old - 1] != self.tokens[-1]):
            self.tokens, self._start, old = [], {}, 0  # not a continuation: start over
        self.tokens.extend(tokens[old:])
        seq = self.tokens
        # n-grams ending at old - 1 .. size - 2 (the one ending at the last token is the
        # pattern itself); later starts overwrite earlier ones.
        for end in range(max(old - 1, 0), len(seq) - 1):
            for n in range(self.min_n, min(self.max_n, end + 1) + 1):
                self._start[tuple(seq[end - n + 1 : end + 1])] = end - n + 1

    def lookup(self, max_draft: int) -> list[int]:
        """ngram_lookup(self.tokens, max_draft, min_n, max_n)."""
        seq, size = self.tokens, len(self.tokens)
        if max_draft <= 0 or size < 2:
            return []
        for n in range(min(self.max_n, size - 1), self.min_n - 1, -1):
            start = self._start.get(tuple(seq[size - n :]))
            if start is not None:
                after = start + n
                out: list[int] = []
                for j in range(max_draft):
                    at = after + j
                    out.append(seq[at] if at < size else out[at - size])
                return out
        return []


class NgramProposer:
    name = "ngram"
    is_model = False

    def __init__(self, min_n: int = 1, max_n: int = 4) -> None:
        self.min_n, self.max_n = min_n, max_n
        self._indexes: dict[str, NgramIndex] = {}  # request id -> its index, until finish

    def propose(self, requests: Sequence[SpecRequest]) -> dict[str, Draft]:
        drafts = {}
        for r in requests:
            index = self._indexes.get(r.request_id)
            if index is None:
                index = self._indexes[r.request_id] = NgramIndex(self.min_n, self.max_n)
            index.update(r.token_ids)
            tokens = index.lookup(r.max_draft)
            if tokens:
                drafts[r.request_id] = Draft(tokens)
        return drafts

    def finish(self, request_id: str, token_ids: list[int], num_prompt_tokens: int) -> None:
        self._indexes.pop(request_id, None)
