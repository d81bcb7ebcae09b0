"""Speculative decoding inside the one step loop: drafts before scheduling, verification after
the target's step.

Per step: `draft` asks the proposer for up to K tokens for every request whose next step is a
decode (K from spec_policy, capped by max_tokens and the slot), and hangs them on the
scheduler's request (`spec_token_ids`); the scheduler counts them inside the step's token
budget; the executor scores all K + 1 positions of each row in the same call as every other
decode; `verify` turns those logits into the tokens to emit (spec_verify.verify) and records
the request's statistics. Rejected drafts need no cleanup: the scheduler's computed count does
not include them, so the next step passes a smaller cached length and overwrites them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from enginesmith.runtime.sampling import Sampler
from enginesmith.runtime.scheduler import SchedRequest, ScheduledChunk
from enginesmith.runtime.spec_policy import (
    FREE_RETRY_DRIFT,
    HYBRID_MODEL_MARGIN,
    PRIOR_ACCEPTANCE,
    DraftLengthPolicy,
    batch_width,
    update_acceptance,
)
from enginesmith.runtime.spec_proposer import Draft, Proposer, SpecRequest
from enginesmith.runtime.spec_verify import verify


@dataclass
class SpecStats:
    """Speculation counters of one request, or summed over many (`LLM.spec_stats`)."""

    draft_tokens: int = 0  # proposed and verified
    accepted_tokens: int = 0  # drafts the target kept
    rounds: int = 0  # target calls that verified drafts
    target_calls: int = 0  # target calls that emitted tokens (with or without drafts)
    emitted_tokens: int = 0  # tokens those calls emitted
    draft_s: float = 0.0  # time in the proposer (a call for several requests counts for each)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        return self.emitted_tokens / self.target_calls if self.target_calls else 0.0

    @property
    def mean_draft_len(self) -> float:
        return self.draft_tokens / self.rounds if self.rounds else 0.0

    def add(self, other: SpecStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["acceptance_rate"] = self.acceptance_rate
        out["tokens_per_target_call"] = self.tokens_per_target_call
        out["mean_draft_len"] = self.mean_draft_len
        return out


@dataclass
class _State:
    # Running acceptance per kind of draft (False: model-free, True: model); a hybrid drafts
    # both kinds, any other source one.
    acceptance: dict[bool, float] = field(default_factory=lambda: dict(PRIOR_ACCEPTANCE))
    probs: np.ndarray | None = None  # q of the drafts riding in the current step
    shadow: int | None = None  # a free draft's first token, proposed but not sent (K = 0)
    from_model: bool = False  # the kind of the drafts riding in the current step
    stats: SpecStats = field(default_factory=SpecStats)


class Speculator:
    """Owns a proposer, the draft-length policy and each request's acceptance estimate."""

    def __init__(self, proposer: Proposer, policy: DraftLengthPolicy, max_seq_len: int) -> None:
        self.proposer = proposer
        self.policy = policy
        self.max_seq_len = max_seq_len
        self.totals = SpecStats()
        # Hybrids: model-free parts draft at c = 0, the model part at its own c.
        self.hybrid = proposer.is_model and getattr(proposer, "name", "") == "hybrid"
        # The kind whose K the policy picks first (a hybrid's model-free part).
        self._kind = proposer.is_model and not self.hybrid
        self._states: dict[str, _State] = {}

    @property
    def free_policy(self) -> DraftLengthPolicy:
        if not self.hybrid:
            return self.policy
        return dataclasses.replace(self.policy, draft_cost=0.0, draft_cost_by_batch={})

    def track(self, request_id: str, stats: SpecStats) -> None:
        """Count REQUEST_ID's speculation into STATS (the request's own, live while it runs)."""
        self._states[request_id] = _State(stats=stats)

    def _state(self, request_id: str) -> _State:
        if request_id not in self._states:
            self._states[request_id] = _State()
        return self._states[request_id]

    def draft(self, running: Sequence[tuple[SchedRequest, Sampler]]) -> None:
        """Set `spec_token_ids` of every running request whose next step is a decode."""
        decoding = [(r, s) for r, s in running if r.num_uncomputed == 1 and r.slot is not None]
        for r, _ in running:
            r.spec_token_ids = []
        if not decoding:
            return
        batch = len(decoding)
        asks = []
        # A free draft is still asked for when the policy says K = 0 ("shadow"): its first
        # token checked against the target's keeps the acceptance estimate current, so that
        # K comes back when drafts get good again (a model draft would cost a step: no).
        shadow = not self.proposer.is_model
        free_policy = self.free_policy  # one copy per step, not per request
        for r, sampler in decoding:
            state = self._state(r.request_id)
            state.probs, state.shadow, state.from_model = None, None, False
            room = min(
                sampler.params.max_tokens - len(r.output_token_ids) - 1,  # +1: the target's token
                self.max_seq_len - r.num_tokens - 1,  # the drafts' cache rows must fit the slot
            )
            a = state.acceptance
            # a model draft that would first need a prompt call of its own pays for it
            behind = self._behind(r) if self.proposer.is_model else 0
            model_k = dict(behind=behind, remaining=room)
            k = k_model = min(self.policy.choose(a[self._kind], batch, **model_k), room)
            model_first = False
            if self.hybrid:  # each part its own K from its own acceptance
                k = min(free_policy.choose(a[False], batch), room)
                k_model = min(self.policy.choose(a[True], batch, **model_k), room)
                model_first = self.policy.rate(a[True], k_model, batch, **model_k) > (
                    HYBRID_MODEL_MARGIN * free_policy.rate(a[False], k, batch)
                )
                if model_first:
                    k = k_model
                    a[False] += FREE_RETRY_DRIFT * (PRIOR_ACCEPTANCE[False] - a[False])
            if k == 0 and shadow and room > 0:
                k = -1  # ask for one token, keep it out of the step
            if k != 0:
                assert r.slot is not None
                asks.append(
                    SpecRequest(
                        r.request_id,
                        r.all_token_ids,
                        len(r.prompt_token_ids),
                        r.slot,
                        abs(k),
                        sampler,
                        shadow=k < 0,
                        max_model_draft=k_model,
                        model_first=model_first,
                    )
                )
        if not asks:
            return
        start = time.perf_counter()
        drafts = self.proposer.propose(asks)
        elapsed = time.perf_counter() - start
        by_id = {r.request_id: r for r, _ in decoding}
        width = self._width(decoding, asks, drafts)
        for ask in asks:
            state = self._state(ask.request_id)
            state.stats.draft_s += elapsed
            self.totals.draft_s += elapsed
            d = drafts.get(ask.request_id)
            if d is not None and d.tokens and ask.shadow:
                state.shadow = d.tokens[0]
            elif d is not None and d.tokens:
                # a proposer returns at most the K it was asked for (its part's, in a hybrid);
                # both Ks are within the request's room, which this cap guards
                room_cap = max(ask.max_draft, ask.max_model_draft or 0)
                by_id[ask.request_id].spec_token_ids = list(d.tokens[: min(room_cap, width)])
                state.probs, state.from_model = d.probs, d.from_model

    def _behind(self, r: SchedRequest) -> int:
        """Tokens the model draft must feed R in a call of its own before drafting."""
        behind = getattr(self.proposer, "behind", None)
        return (
            0 if behind is None or r.slot is None else behind(r.slot, r.request_id, r.all_token_ids)
        )

    def _width(
        self,
        decoding: Sequence[tuple[SchedRequest, Sampler]],
        asks: Sequence[SpecRequest],
        drafts: dict[str, Draft],
    ) -> int:
        """The widest verification row this step may carry (spec_policy.batch_width) over every
        decoding request, those without drafts counted as rows of width 0."""
        drafted = {a.request_id for a in asks if not a.shadow and a.request_id in drafts}
        if len(decoding) == 1:
            return max((len(drafts[i].tokens) for i in drafted), default=0)
        ids = [r.request_id for r, _ in decoding]
        kinds = {i: drafts[i].from_model if i in drafted else self._kind for i in ids}
        return batch_width(
            self.policy,
            [self._state(i).acceptance[kinds[i]] for i in ids],
            [len(drafts[i].tokens) if i in drafted else 0 for i in ids],
        )

    def emit(self, chunk: ScheduledChunk, sampler: Sampler, logits: np.ndarray) -> list[int]:
        """The tokens CHUNK's request emits from its logits rows [num_spec + 1, vocab]."""
        request_id = chunk.request.request_id
        state = self._state(request_id)
        k = chunk.num_spec
        if k == 0:
            tokens = [sampler.sample(logits[-1])]
            if state.shadow is not None:  # only model-free sources draft in the shadow
                hit = int(tokens[0] == state.shadow)
                state.acceptance[False] = update_acceptance(state.acceptance[False], 1, hit)
        else:
            probs = None if state.probs is None else state.probs[:k]
            tokens = verify(chunk.spec_token_ids, probs, logits[-(k + 1) :], sampler)
            accepted = len(tokens) - 1
            kind = state.from_model
            state.acceptance[kind] = update_acceptance(state.acceptance[kind], k, accepted)
            for s in (state.stats, self.totals):
                s.draft_tokens += k
                s.accepted_tokens += accepted
                s.rounds += 1
        state.probs, state.shadow, state.from_model = None, None, False
        for s in (state.stats, self.totals):
            s.target_calls += 1
            s.emitted_tokens += len(tokens)
        return tokens

    def finish(self, request: SchedRequest) -> None:
        """Forget REQUEST (its stats object stays with whoever holds it)."""
        self._states.pop(request.request_id, None)
        self.proposer.finish(
            request.request_id, request.all_token_ids, len(request.prompt_token_ids)
        )
