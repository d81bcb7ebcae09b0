"""Drafts from a second engine (`self:int8`, `self:int4`, or another model with the target's
tokenizer): a second executor over the same slot ids, owned by the speculator.

Its cache follows the target's the same way, without copies: each request remembers which
tokens its draft slot holds; next time the part that still matches the request's known tokens
is kept (the longest common prefix) and the rest is overwritten by passing a smaller cached
length. A round is K steps: the first feeds the tokens the draft has not seen (usually the
target's last token, or a whole prompt), each next one the previous draft token, for every
drafting request in one call. Sampling requests draw each draft token from q (their own
temperature/top-k/top-p, their own rng) and hand q to the verifier.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from enginesmith.runtime.engine_dir import read_manifest
from enginesmith.runtime.errors import InvalidRequestError
from enginesmith.runtime.executor import Executor, SpinMode
from enginesmith.runtime.spec_proposer import Draft, SpecRequest

# Batch sizes at which c is timed at load (DraftLengthPolicy.cost uses the largest at or below).
COST_BATCHES = (1, 2, 3, 4, 6, 8)
CATCH_UP_PROBE_TOKENS = 128  # the row timed for the cost per token of a catch-up call
# Catch-up rows longer than this (a prompt) get a call of their own, not padding in others'.
_SHARED_ROW_TOKENS = 8


class DraftEngineProposer:
    name = "draft-engine"
    is_model = True

    def __init__(self, executor: Executor, draft_cost: float = 0.5) -> None:
        self.executor = executor
        self.draft_cost = draft_cost  # c: one draft step / one target step
        self.cost_by_batch: dict[int, float] = {}  # c per batch size, once measured
        self.catch_up_cost = 0.0  # a token fed in a catch-up call / a target step, once measured
        self._cached: dict[str, tuple[int, list[int]]] = {}  # request id -> slot, tokens held

    @classmethod
    def open(
        cls,
        draft_dir: Path,
        target_manifest: dict[str, Any],
        threads: int | None = None,
        verify_files: bool = True,
        spin: SpinMode = "always",
    ) -> DraftEngineProposer:
        from enginesmith.runtime.executors import open_executor

        manifest = read_manifest(draft_dir, verify_hashes=verify_files)
        check_compatible(draft_dir, manifest, target_manifest)
        executor = open_executor(draft_dir, manifest, threads=threads, spin=spin)
        executor.warmup()
        return cls(executor)

    def measure_cost(self, target: Executor, steps: int = 5) -> dict[int, float]:
        """c(B) = a draft step of B one-token rows / a target step of B one-token rows, for B
        in COST_BATCHES up to both engines' slots, timed on the first slots (empty at load:
        what is written there is overwritten by the first prefill). Sets draft_cost to c(1)."""
        slots = min(self.executor.max_batch, target.max_batch)
        self.cost_by_batch, most = {}, 0.0
        for b in (b for b in COST_BATCHES if b <= slots):
            # never assumed to fall as the batch grows: a noisy timing must not turn drafts on
            most = max(most, _step_s(self.executor, b, steps) / _step_s(target, b, steps))
            self.cost_by_batch[b] = most
        self.draft_cost = self.cost_by_batch[1]
        self.catch_up_cost = (
            _step_s(self.executor, 1, 2, CATCH_UP_PROBE_TOKENS)
            / CATCH_UP_PROBE_TOKENS
            / _step_s(target, 1, steps)
        )
        return self.cost_by_batch

    def behind(self, slot: int, request_id: str, token_ids: list[int]) -> int:
        """Tokens this draft would feed the request in a call of its own (more than
        _SHARED_ROW_TOKENS: a prompt it has not seen) before its first draft token; 0 when they
        ride along in the shared call."""
        held_slot, held = self._cached.get(request_id, (-1, []))
        keep = _common_prefix(held, token_ids) if held_slot == slot else 0
        feed = len(token_ids) - min(keep, len(token_ids) - 1)
        return feed if feed > _SHARED_ROW_TOKENS else 0

    def propose(self, requests: Sequence[SpecRequest]) -> dict[str, Draft]:
        if not requests:
            return {}
        pending: dict[str, list[int]] = {}  # tokens each request feeds next
        starts: dict[str, int] = {}  # cached length before those tokens
        for r in requests:
            slot, held = self._cached.get(r.request_id, (-1, []))
            keep = _common_prefix(held, r.token_ids) if slot == r.slot else 0
            keep = min(keep, len(r.token_ids) - 1)  # the last known token is always fed
            pending[r.request_id] = r.token_ids[keep:]
            starts[r.request_id] = keep
        tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
        probs: dict[str, list[np.ndarray]] = {r.request_id: [] for r in requests}
        by_id = {r.request_id: r for r in requests}
        active = list(requests)
        while active:
            logits = self._step(active, pending, starts)
            for r in active:
                rid = r.request_id
                starts[rid] += len(pending[rid])
                row = logits[rid]
                if r.sampler.params.greedy:
                    token = int(np.argmax(row))
                else:
                    q = r.sampler.probabilities(row)
                    token = r.sampler.draw(q)
                    probs[rid].append(q)
                tokens[rid].append(token)
                pending[rid] = [token]
            active = [r for r in active if len(tokens[r.request_id]) < r.max_draft]
        drafts = {}
        for rid, draft in tokens.items():
            r = by_id[rid]
            # The draft slot now holds the known tokens and every draft but the last.
            self._cached[rid] = (r.slot, r.token_ids + draft[:-1])
            drafts[rid] = Draft(
                draft, np.stack(probs[rid]) if probs[rid] else None, from_model=True
            )
        return drafts

    def _step(
        self,
        requests: Sequence[SpecRequest],
        pending: dict[str, list[int]],
        starts: dict[str, int],
    ) -> dict[str, np.ndarray]:
        """Feed each request's pending tokens; the logits after its last one."""
        short = [r for r in requests if len(pending[r.request_id]) <= _SHARED_ROW_TOKENS]
        calls = [short] if short else []
        calls += [[r] for r in requests if len(pending[r.request_id]) > _SHARED_ROW_TOKENS]
        out: dict[str, np.ndarray] = {}
        for call in calls:
            out.update(self._call(call, pending, starts))
        return out

    def _call(
        self,
        requests: Sequence[SpecRequest],
        pending: dict[str, list[int]],
        starts: dict[str, int],
    ) -> dict[str, np.ndarray]:
        slots = [r.slot for r in requests]
        lo, hi = min(slots), max(slots) + 1
        width = max(len(pending[r.request_id]) for r in requests)
        input_ids = np.zeros((hi - lo, width), np.int64)
        position_ids = np.zeros((hi - lo, width), np.int64)
        seqlens_k = np.zeros(hi - lo, np.int32)  # idle rows: Q = 0, cache untouched
        query_seqlens = np.zeros(hi - lo, np.int32)
        last_position = self.executor.max_seq_len - 1
        wanted = []
        for r in requests:
            row, feed, start = r.slot - lo, pending[r.request_id], starts[r.request_id]
            input_ids[row, : len(feed)] = feed
            position_ids[row] = np.minimum(np.arange(start, start + width), last_position)
            seqlens_k[row] = start + len(feed) - 1
            query_seqlens[row] = len(feed)
            wanted.append(row * width + len(feed) - 1)
        logits = self.executor.step(
            lo, input_ids, position_ids, seqlens_k, query_seqlens, np.array(wanted, np.int64)
        )
        return {r.request_id: logits[i] for i, r in enumerate(requests)}

    def finish(self, request_id: str, token_ids: list[int], num_prompt_tokens: int) -> None:
        self._cached.pop(request_id, None)


def check_compatible(draft_dir: Path, draft: dict[str, Any], target: dict[str, Any]) -> None:
    """The draft must speak the target's token ids and have a slot for each of its slots."""
    if draft["model"]["vocab_size"] != target["model"]["vocab_size"] or _tokenizer_hash(
        draft
    ) != _tokenizer_hash(target):
        raise InvalidRequestError(
            f"{draft_dir}: the draft's tokenizer differs from the target's (token ids would not "
            "mean the same text); use a draft of the same model family, or build with "
            "--draft self:int8"
        )
    if draft["max_batch"] < target["max_batch"] or draft["max_seq_len"] < target["max_seq_len"]:
        raise InvalidRequestError(
            f"{draft_dir}: the draft has {draft['max_batch']} slots of {draft['max_seq_len']} "
            f"tokens, the target {target['max_batch']} of {target['max_seq_len']}: build the "
            "draft with at least the target's --max-batch and --max-seq-len"
        )


def _tokenizer_hash(manifest: dict[str, Any]) -> str:
    """sha256 of the tokenizer's vocabulary file(s), from the manifest's file hashes."""
    root = manifest["files_by_role"]["tokenizer"].rstrip("/")
    files = manifest.get("files", {})
    picked = sorted(
        digest
        for rel, digest in files.items()
        if rel.startswith(root) and rel.endswith(("tokenizer.json", "vocab.json", ".model"))
    )
    return "|".join(picked)


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of A and B. Called per request per step over whole
    contexts, so no Python loop over tokens: slices are compared in C, the first mismatch found
    by halving (usually the whole shorter list matches, one comparison)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo]; the first mismatch is below hi
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _step_s(executor: Executor, batch: int, steps: int, width: int = 1) -> float:
    """Median seconds of a step of BATCH rows of WIDTH new tokens each (slots 0..BATCH-1, empty
    caches) after one untimed."""
    positions = np.tile(np.arange(width, dtype=np.int64), (batch, 1))
    ids = np.zeros((batch, width), np.int64)
    seqlens_k = np.full(batch, width - 1, np.int32)
    lengths = np.full(batch, width, np.int32)
    wanted = np.arange(batch, dtype=np.int64) * width + width - 1
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        executor.step(0, ids, positions, seqlens_k, lengths, wanted)
        if i:
            times.append(time.perf_counter() - start)
    return float(np.median(times))
