"""What every draft source implements: `propose(requests) -> {request_id: Draft}`.

Proposers are sibling modules (proposer_ngram.py, proposer_suffix.py, proposer_draft_engine.py,
proposer_hybrid.py), chosen in one place (`make_proposer`). The engine core calls `propose`
once per step, before scheduling, for the requests whose next step is a decode; the drafts ride
along in that step as extra tokens and are verified by spec_verify.verify.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from enginesmith.runtime.errors import InvalidRequestError
from enginesmith.runtime.sampling import Sampler

# Draft sources that need no engine.
MODEL_FREE_SOURCES = ("ngram", "suffix")


@dataclass
class SpecRequest:
    """A request as a proposer sees it."""

    request_id: str
    token_ids: list[int]  # every known token: prompt + output
    num_prompt_tokens: int
    slot: int  # KV slot (model drafts keep their cache in the same slot id)
    max_draft: int  # propose at most this many tokens
    sampler: Sampler  # the request's own (model drafts sample q with its params and rng)
    shadow: bool = False  # only probing acceptance: the draft is not verified
    max_model_draft: int | None = None  # hybrids: the model part's own cap (None: max_draft)
    model_first: bool = False  # hybrids: straight to the model part (it expects more per cost)


@dataclass
class Draft:
    tokens: list[int]  # [K]
    probs: np.ndarray | None = None  # [K, vocab] q for model drafts; None = a point mass
    from_model: bool = False  # made by a model draft (acceptance is kept per kind of draft)


class Proposer(Protocol):
    name: str
    is_model: bool  # draft tokens cost an engine call (for the K policy)

    def propose(self, requests: Sequence[SpecRequest]) -> dict[str, Draft]:
        """Drafts for REQUESTS, at most each request's max_draft tokens (an empty or missing
        entry = no draft this step)."""
        ...

    def finish(self, request_id: str, token_ids: list[int], num_prompt_tokens: int) -> None:
        """REQUEST_ID is done (its final tokens, for sources that learn from past outputs)."""
        ...


def parse_draft_source(source: str) -> list[str]:
    """'suffix+self:int8' -> ['suffix', 'self:int8'] (model-free first), checked."""
    parts = [p.strip() for p in source.split("+") if p.strip()]
    if not parts:
        raise InvalidRequestError("the draft source is empty: use ngram, suffix or self:int8")
    for part in parts:
        model_like = part.startswith(("self:", "model:", "/", ".")) or "/" in part
        if part not in MODEL_FREE_SOURCES and part != "draft" and not model_like:
            raise InvalidRequestError(
                f"unknown draft source {part!r}: use ngram, suffix, self:int8, self:int4, "
                "a model path, or a hybrid like suffix+self:int8"
            )
    return parts
