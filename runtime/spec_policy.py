"""How many draft tokens to propose per request each round.

Expected tokens per target call with K drafts accepted independently at rate a:
(1 - a^(K+1)) / (1 - a). Cost of the round in target-step units: c*K (a model draft's K
steps, c = draft step / target step; 0 for model-free drafts) + v(K, B), where v is the cost of
a step whose B rows carry K + 1 tokens each over a step of B one-token rows. K maximises tokens
per cost; when no K beats plain decode (1 token per 1 step) it is 0, which is what happens when
the batch is large enough that extra tokens are no longer free.

c is measured per batch size at load (a small draft's step grows with the batch faster than
the target's). v comes from a linear step-cost model, time(T tokens) = w + t*T (weights read
once, then per-token work): v(K, B) = (1 + r*B*(K+1)) / (1 + r*B) with r = t / w.
docs/benchmarks.md has the measured v(K) table that r is fitted to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The K cap when neither the build nor the caller gives one. The policy picks K <= cap per
# round, so a high cap costs nothing where acceptance is low: scripts/bench-spec at batch 1, cap
# 6 then cap 10 (separate runs minutes apart, --max-draft-len): ngram grounded 2.14x -> 2.24x,
# suffix 2.05x -> 2.26x, self:int4 free 1.61x -> 1.71x.
DEFAULT_MAX_DRAFT_LEN = 10
# Fitted to the measured v(K) of the SmolLM2 fp32 engine on ONNX Runtime CPU (docs/benchmarks.md).
DEFAULT_TOKEN_COST_RATIO = 0.06
# Acceptance assumed before a request has drafted anything.
PRIOR_ACCEPTANCE = {False: 0.6, True: 0.85}  # model-free, model draft
# A K must beat plain decode by this factor (estimates are noisy, plain decode is the safe bet).
# In a batch the unmodelled costs weigh more (drafting and verifying for every row, rows of
# different lengths padded to the widest): with 1.02 everywhere, scripts/bench-spec measured
# in-flight suffix speculation at 0.96-0.97x plain decode at batch 4 and 0.90x at batch 8, T=0.8.
SINGLE_MARGIN = 1.02
BATCH_MARGIN = 1.10
# Weight of a round's acceptance in the running estimate.
ACCEPTANCE_EMA = 0.3
# Hybrids: while a request's drafts go straight to the model part, its estimate for the
# model-free part moves this share of the way back to the prior each round, so that the free
# part is tried again now and then (on text that starts repeating its input).
FREE_RETRY_DRIFT = 0.05
# Hybrids: the model part goes first only when the formula promises this much more than the free
# part. scripts/bench-spec, batch 1, grounded prompts (six and seven runs): model drafts came
# out at 0.73-0.97 of their predicted speedup (each draft step a call of its own, catching up on
# the prompt), n-gram and suffix drafts at 1.08-1.28 of theirs (their hits are long runs, not
# independent tokens); at parity the hybrid took the model there: 1.49x against ngram's 2.14x
# in the same run. On free prompts both kinds land at 0.88-1.07 (one noisy row: 0.62).
HYBRID_MODEL_MARGIN = 1.25


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a round emits on average: accepted drafts plus the target's own token."""
    a = min(max(acceptance, 0.0), 0.999)
    return (1 - a ** (k + 1)) / (1 - a)


def _at_batch(table: dict[int, float], batch: int, default: float) -> float:
    """TABLE's entry for the largest measured batch size at or below BATCH (the smallest
    measured one below all of them); DEFAULT when nothing was measured."""
    if not table:
        return default
    measured = sorted(table)
    below = [b for b in measured if b <= batch]
    return table[below[-1] if below else measured[0]]


@dataclass
class DraftLengthPolicy:
    max_draft_len: int = DEFAULT_MAX_DRAFT_LEN
    draft_cost: float = 0.0  # c: a draft step / a target step (0: model-free)
    token_cost_ratio: float = DEFAULT_TOKEN_COST_RATIO  # r in v(K, B)
    # r measured per batch size (scripts/bench-spec fits one per B). Empty: token_cost_ratio
    # for every batch.
    ratio_by_batch: dict[int, float] = field(default_factory=dict)
    # c measured per batch size (a draft step of B rows / a target step of B rows). A small
    # draft's step grows with B faster than the target's (int4 is compute-bound where fp32
    # reads weights): self:int4 against SmolLM2 fp32, timed at load: c = 0.37-0.41, 0.41-0.44,
    # 0.49-0.52, 0.61-0.62 at B = 1, 2, 4, 8; with c(1) for every batch ngram+self:int4 ran
    # in-flight batches at 0.66-0.71x plain decode (scripts/bench-spec). Empty: draft_cost.
    draft_cost_by_batch: dict[int, float] = field(default_factory=dict)
    # A model draft that is behind the request by a prompt (a new request, or one that skipped
    # the model for a while) feeds it in a call of its own before drafting, and the whole batch
    # waits: this cost per token fed, in target steps, spread over the rounds the request has
    # left. scripts/bench-spec, ngram+self:int4 in flight at batch 4: 0.69-0.74x plain decode
    # with c(B) alone (an ad-hoc trace of its loop: a fifth of the wall time in the draft's
    # prompt calls), 0.91-0.92x with this term too.
    catch_up_cost: float = 0.0

    def ratio(self, batch: int) -> float:
        return _at_batch(self.ratio_by_batch, batch, self.token_cost_ratio)

    def cost(self, batch: int) -> float:
        """c for a batch of BATCH drafting rows."""
        return _at_batch(self.draft_cost_by_batch, batch, self.draft_cost)

    def verify_cost(self, k: int, batch: int) -> float:
        """v(K, B): a step of B rows with K + 1 tokens each over one of B one-token rows."""
        r = self.ratio(batch)
        return (1 + r * batch * (k + 1)) / (1 + r * batch)

    def rate(
        self, acceptance: float, k: int, batch: int, behind: int = 0, remaining: int = 0
    ) -> float:
        """Tokens per target-step of cost with K drafts (K = 0: plain decode, 1), for a request
        whose draft must first catch up on BEHIND tokens and that has REMAINING tokens left."""
        if k <= 0:
            return 1.0
        tokens = expected_tokens(acceptance, k)
        cost = self.cost(batch) * k + self.verify_cost(k, batch)
        if behind > 0:  # the batch waits for the catch-up; the rounds left share it
            rounds_left = max(remaining, 1) / tokens
            cost += self.catch_up_cost * behind * batch / max(rounds_left, 1.0)
        return tokens / cost

    def choose(self, acceptance: float, batch: int, behind: int = 0, remaining: int = 0) -> int:
        """K for one request at this ACCEPTANCE estimate when BATCH requests decode (BEHIND,
        REMAINING: see rate)."""
        best_k, best = 0, 1.0
        for k in range(1, self.max_draft_len + 1):
            rate = self.rate(acceptance, k, batch, behind, remaining)
            if rate > best * SINGLE_MARGIN:
                best_k, best = k, rate
        # in a batch, drafting must beat plain decode (1 token per step) by the wider margin
        return best_k if batch == 1 or best > BATCH_MARGIN else 0


def batch_width(policy: DraftLengthPolicy, acceptances: list[float], draft_lens: list[int]) -> int:
    """The most draft tokens any row of a B-row decode step should carry.

    Rows are right-padded to the widest, so one row with K drafts costs the whole step
    v(K, B), not a B-th of it: pick the width w that maximises the tokens the batch expects
    (each row keeping min(its drafts, w)) per step cost, against plain decode's B tokens per
    step, with the batch margin."""
    batch = len(draft_lens)
    best_w, best = 0, 0.0
    for w in range(1, max(draft_lens, default=0) + 1):
        tokens = sum(
            expected_tokens(a, min(d, w)) for a, d in zip(acceptances, draft_lens, strict=True)
        )
        rate = tokens / policy.verify_cost(w, batch)
        if rate > best:
            best_w, best = w, rate
    plain = float(batch)  # tokens per step without drafts
    return best_w if best > plain * (SINGLE_MARGIN if batch == 1 else BATCH_MARGIN) else 0


def update_acceptance(estimate: float, proposed: int, accepted: int) -> float:
    """Running per-token acceptance (the a of the geometric model); a round with no draft
    leaves it unchanged. A round is `accepted` successes then one failure, or all successes."""
    if proposed == 0:
        return estimate
    rate = accepted / (accepted + (accepted < proposed))
    return (1 - ACCEPTANCE_EMA) * estimate + ACCEPTANCE_EMA * rate
