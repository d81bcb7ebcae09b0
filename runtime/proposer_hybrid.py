"""Hybrid drafts: model-free sources first (free), a model draft for the requests they found
nothing for, and for those the speculator sends straight to the model (`model_first`: its
measured acceptance promises more tokens per cost than the free part's). The model draft's cache
catches up on skipped tokens by itself (it keeps the common prefix and feeds the rest in its
next call)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from enginesmith.runtime.spec_proposer import Draft, Proposer, SpecRequest


class HybridProposer:
    name = "hybrid"

    def __init__(self, parts: Sequence[Proposer]) -> None:
        self.parts = list(parts)
        self.is_model = any(p.is_model for p in self.parts)
        self.draft_cost = max(float(getattr(p, "draft_cost", 0.0)) for p in self.parts)

    def propose(self, requests: Sequence[SpecRequest]) -> dict[str, Draft]:
        drafts: dict[str, Draft] = {}
        left = list(requests)
        for part in self.parts:
            if part.is_model:  # its cost has its own K (0: not worth a model step)
                left = [
                    dataclasses.replace(r, max_draft=r.max_model_draft)
                    if r.max_model_draft is not None
                    else r
                    for r in left
                ]
                asked = [r for r in left if r.max_draft > 0 and not r.shadow]
            else:
                asked = [r for r in left if not r.model_first]
            if asked:
                found = part.propose(asked)
                drafts.update({k: d for k, d in found.items() if d.tokens})
            left = [r for r in left if r.request_id not in drafts]
            if not left:
                break
        return drafts

    def behind(self, slot: int, request_id: str, token_ids: list[int]) -> int:
        """The model part's catch-up (DraftEngineProposer.behind)."""
        parts = [p for p in self.parts if hasattr(p, "behind")]
        return max((p.behind(slot, request_id, token_ids) for p in parts), default=0)

    def finish(self, request_id: str, token_ids: list[int], num_prompt_tokens: int) -> None:
        for part in self.parts:
            part.finish(request_id, token_ids, num_prompt_tokens)
