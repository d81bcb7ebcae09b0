"""Speculative decoding: the verifier (pure), proposers, the scheduler's draft tokens, and the
whole loop on tiny engines, where greedy output must equal target-only output exactly."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from enginesmith import LLM, SamplingParams
from enginesmith.runtime.proposer_ngram import NgramIndex, ngram_lookup
from enginesmith.runtime.sampling import Sampler
from enginesmith.runtime.scheduler import KVCacheManager, SchedRequest, Scheduler
from enginesmith.runtime.spec_policy import (
    PRIOR_ACCEPTANCE,
    DraftLengthPolicy,
    batch_width,
    expected_tokens,
)
from enginesmith.runtime.spec_proposer import Draft, SpecRequest
from enginesmith.runtime.spec_verify import verify
from enginesmith.runtime.speculation import SpecStats, Speculator
from tests.conftest import PROMPTS

MANY_PROMPTS = [f"{p} {i}" for i, p in enumerate(PROMPTS * 3)]

# -- the verifier, greedy ------------------------------------------------------------------


def one_hot_rows(tokens: Sequence[int], vocab: int = 10) -> np.ndarray:
    logits = np.zeros((len(tokens), vocab), np.float32)
    logits[np.arange(len(tokens)), tokens] = 5.0
    return logits


GREEDY = Sampler(SamplingParams())


@pytest.mark.parametrize("wrong_at", [0, 1, 2, 3, None])
def test_greedy_verify_accepts_the_exact_prefix_then_the_target_token(wrong_at) -> None:  # type: ignore[no-untyped-def]
    target = [3, 1, 4, 1, 5]  # the target's argmax after 0..4 drafts
    draft = target[:4]
    if wrong_at is not None:
        draft[wrong_at] = 9
    out = verify(draft, None, one_hot_rows(target), GREEDY)
    keep = 4 if wrong_at is None else wrong_at
    assert out == target[: keep + 1]


def test_verify_checks_row_counts() -> None:
    with pytest.raises(ValueError, match="developer error"):
        verify([1, 2], None, one_hot_rows([1, 2]), GREEDY)


# -- the verifier, rejection sampling ------------------------------------------------------

VOCAB = 5


def random_dists(rng: np.random.Generator, rows: int) -> np.ndarray:
    return rng.dirichlet(np.ones(VOCAB) * 0.7, size=rows)


def chi_square_ok(counts: np.ndarray, probs: np.ndarray) -> bool:
    """Pearson's test at a false-failure rate of 1e-4: the chi-square critical value by the
    Wilson-Hilferty approximation (24.2 for 4 degrees of freedom where the exact one is 23.5;
    58.9 for 24, exact 59.0)."""
    n = counts.sum()
    mask = probs > 0
    assert counts[~mask].sum() == 0, "a token the target gives probability 0 was emitted"
    stat = float((((counts - n * probs) ** 2)[mask] / (n * probs[mask])).sum())
    df = int(mask.sum()) - 1
    z = 3.719  # the standard normal's 1 - 1e-4 quantile
    critical = df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3
    return stat < critical


@pytest.mark.parametrize("model_draft", [True, False])
def test_rejection_sampling_keeps_the_target_distribution(model_draft: bool) -> None:
    """Target rows independent of context (an i.i.d. model), K = 2: the first two emitted
    tokens must be distributed as p0 x p1, whatever q proposes. Seeded, so it never flakes;
    over random seeds it fails with probability ~2e-4 (two tests at 1e-4)."""
    rng = np.random.default_rng(0)
    p = random_dists(rng, 3)  # [K + 1, vocab]
    q = random_dists(rng, 2)
    logits = np.log(p).astype(np.float64)
    sampler = Sampler(SamplingParams(temperature=1.0, seed=1))
    draws = 40_000
    first = np.zeros(VOCAB)
    pairs = np.zeros((VOCAB, VOCAB))
    for _ in range(draws):
        if model_draft:
            draft = [int(rng.choice(VOCAB, p=q[i])) for i in range(2)]
            out = verify(draft, q, logits, sampler)
        else:  # a point mass on fixed tokens: model-free drafts
            out = verify([0, 3], None, logits, sampler)
        first[out[0]] += 1
        if len(out) >= 2:
            pairs[out[0], out[1]] += 1
        else:  # rejected at 0: the next token would come from a fresh step on p1
            pairs[out[0], sampler.draw(p[1])] += 1
    assert chi_square_ok(first, p[0])
    assert chi_square_ok(pairs.ravel(), np.outer(p[0], p[1]).ravel())


def test_rejection_sampling_applies_the_request_filters_to_p_and_q() -> None:
    """top_k=2 on the target: no token outside its two most likely ever comes out."""
    rng = np.random.default_rng(3)
    logits = np.log(random_dists(rng, 2))
    allowed = set(np.argsort(logits[0])[-2:]) | set(np.argsort(logits[1])[-2:])
    sampler = Sampler(SamplingParams(temperature=0.8, top_k=2, seed=2))
    for token in range(VOCAB):
        assert set(verify([token], None, logits, sampler)) <= allowed


def test_seeded_verification_is_reproducible() -> None:
    logits = np.log(random_dists(np.random.default_rng(5), 4))
    runs = []
    for _ in range(2):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=7))
        runs.append([verify([1, 2, 3], None, logits, sampler) for _ in range(50)])
    assert runs[0] == runs[1]


# -- proposers and the policy ---------------------------------------------------------------


def test_ngram_lookup_takes_the_most_recent_longest_match() -> None:
    assert ngram_lookup([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 2) == [7, 5]
    assert ngram_lookup([4, 5, 6], 3) == []
    assert ngram_lookup([8, 8], 3) == [8, 8, 8]  # a run continues itself
    assert ngram_lookup([1, 2, 1], 4) == [2, 1, 2, 1]


def test_ngram_index_grown_token_by_token_answers_as_ngram_lookup() -> None:
    rng = np.random.default_rng(0)
    for trial in range(100):
        vocab, min_n, max_n = (2, 3, 5, 20)[trial % 4], 1 + trial % 2, 2 + trial % 3
        seq = [int(t) for t in rng.integers(vocab, size=int(rng.integers(1, 20)))]
        index = NgramIndex(min_n, max_n)
        for _ in range(30):
            index.update(seq)
            k = int(rng.integers(0, 6))
            assert index.lookup(k) == ngram_lookup(seq, k, min_n, max_n), (seq, k)
            seq = seq + [int(t) for t in rng.integers(vocab, size=int(rng.integers(1, 4)))]
    index = NgramIndex()
    index.update([1, 2, 3, 4])
    index.update([7, 8, 7])  # not a continuation of what it holds: rebuilt
    assert index.lookup(2) == ngram_lookup([7, 8, 7], 2) == [8, 7]


def test_suffix_trie_keeps_each_nodes_total_and_best_child() -> None:
    from enginesmith.runtime.proposer_suffix import SuffixTrie, _Node

    def check(node: _Node) -> None:
        if node.children:
            assert node.total == sum(c.count for c in node.children.values())
            # max() over insertion order: the first child with the highest count
            assert node.best_child() == max(node.children.items(), key=lambda kv: kv[1].count)
        for child in node.children.values():
            check(child)

    rng = np.random.default_rng(1)
    for depth, vocab in ((4, 2), (8, 3), (24, 6)):
        trie = SuffixTrie(depth)
        seq: list[int] = []
        for _ in range(40):
            new = [int(t) for t in rng.integers(vocab, size=int(rng.integers(1, 5)))]
            trie.extend(new)
            seq += new
            check(trie.root)
            for k in (1, 3):
                assert trie.lookup_own(k) == trie.lookup(seq, k)


def test_suffix_proposer_drafts_the_same_with_a_shallower_own_trie() -> None:
    from enginesmith.runtime.proposer_suffix import SuffixProposer

    rng = np.random.default_rng(2)
    full, shallow = SuffixProposer(), SuffixProposer(max_draft_len=4)
    assert shallow.own_depth < full.own_depth
    seq = [int(t) for t in rng.integers(4, size=30)]
    for _ in range(60):
        for k in (1, 4):
            ask = SpecRequest("r", list(seq), 5, slot=0, max_draft=k, sampler=GREEDY)
            assert full.propose([ask]).get("r") == shallow.propose([ask]).get("r")
        seq += [int(t) for t in rng.integers(4, size=int(rng.integers(1, 4)))]


def test_policy_drafts_less_as_the_batch_grows() -> None:
    policy = DraftLengthPolicy(max_draft_len=7, token_cost_ratio=0.06)
    ks = [policy.choose(0.75, batch) for batch in (1, 4, 16, 64)]
    assert ks == sorted(ks, reverse=True) and ks[0] >= 3 and ks[-1] == 0
    assert policy.choose(0.05, 1) == 0  # drafts that are never accepted are not worth a token
    assert expected_tokens(0.5, 1) == pytest.approx(1.5)


def test_policy_uses_the_ratio_measured_for_the_batch() -> None:
    """A step-cost ratio measured per batch size replaces the single one: a costlier batch
    drafts less, a batch between two measured sizes takes the smaller size's ratio."""
    flat = DraftLengthPolicy(max_draft_len=6, token_cost_ratio=0.04)
    measured = DraftLengthPolicy(
        max_draft_len=6, token_cost_ratio=0.04, ratio_by_batch={1: 0.04, 4: 0.2}
    )
    assert measured.verify_cost(3, 1) == pytest.approx(flat.verify_cost(3, 1))
    assert measured.verify_cost(3, 4) > flat.verify_cost(3, 4)
    assert measured.verify_cost(3, 3) == pytest.approx(flat.verify_cost(3, 3))  # B=1's ratio
    assert measured.verify_cost(3, 8) == pytest.approx(
        DraftLengthPolicy(token_cost_ratio=0.2).verify_cost(3, 8)
    )
    assert measured.choose(0.5, 8) < flat.choose(0.5, 8)


def test_policy_uses_the_draft_cost_measured_for_the_batch() -> None:
    """A model draft whose step grows with the batch (c per B) drafts at batch 1 and stops
    where its steps cost more than its tokens save; a hybrid's model-free part costs nothing
    at any batch."""
    flat = DraftLengthPolicy(max_draft_len=6, draft_cost=0.4)
    growing = DraftLengthPolicy(
        max_draft_len=6, draft_cost=0.4, draft_cost_by_batch={1: 0.4, 4: 0.7, 8: 0.8}
    )
    assert growing.cost(1) == 0.4 and growing.cost(6) == 0.7 and growing.cost(16) == 0.8
    assert growing.choose(0.9, 1) == flat.choose(0.9, 1) > 0
    assert flat.choose(0.9, 8) > 0  # c(1) everywhere: still drafting at batch 8
    assert growing.choose(0.9, 8) == 0
    from enginesmith.runtime.proposer_hybrid import HybridProposer

    hybrid = HybridProposer([FixedProposer(None, False), FixedProposer(5, True)])
    free = Speculator(hybrid, growing, 512).free_policy
    assert free.cost(8) == 0.0 and free.choose(0.9, 8) > 0


def test_batch_width_prices_the_padding_of_the_widest_row() -> None:
    """Rows are padded to the widest: one drafting row among idle ones costs the whole step, so
    a lone draft at middling acceptance is dropped in a batch; drafts every row can use stay."""
    policy = DraftLengthPolicy(max_draft_len=6, ratio_by_batch={1: 0.06, 4: 0.04})
    assert batch_width(policy, [0.5, 0.5, 0.5, 0.5], [4, 0, 0, 0]) == 0
    assert batch_width(policy, [0.9, 0.9, 0.9, 0.9], [4, 4, 4, 4]) >= 3
    assert batch_width(policy, [0.9, 0.9, 0.9, 0.1], [4, 4, 4, 4]) >= 2
    assert batch_width(policy, [0.05], [4]) == 0  # drafts never accepted: plain decode
    assert batch_width(policy, [0.9, 0.9], [0, 0]) == 0


# -- the scheduler with draft tokens --------------------------------------------------------


def test_drafts_count_in_the_budget_and_rejection_rolls_back() -> None:
    s = Scheduler(KVCacheManager(2, 64), max_num_tokens=6)
    r = SchedRequest(list(range(4)), 10, request_id="r")
    s.add_request(r)
    out = s.schedule()
    s.update(out, {"r": 7})  # prefill 4, first token sampled
    r.spec_token_ids = [1, 2, 3, 4, 5, 6]
    out = s.schedule()
    (chunk,) = out.chunks
    assert chunk.num_new_tokens == 6 and chunk.spec_token_ids == [1, 2, 3, 4, 5]  # budget cut
    assert chunk.token_ids() == [7, 1, 2, 3, 4, 5] and chunk.samples
    s.update(out, {"r": [1, 2, 9]})  # two drafts kept, the third rejected, 9 from the target
    assert r.output_token_ids == [7, 1, 2, 9]
    assert r.num_computed_tokens == 4 + 1 + 2  # prompt, 7 and the two kept drafts; not 9
    assert r.spec_token_ids == []


def test_common_prefix_matches_the_definition() -> None:
    """The draft cache's kept prefix (slices compared by halving) equals an element-by-element
    scan: equal lists, one a prefix of the other, a mismatch at every position, empty lists."""
    from enginesmith.runtime.proposer_draft_engine import _common_prefix

    def scan(a: list[int], b: list[int]) -> int:
        i = 0
        while i < min(len(a), len(b)) and a[i] == b[i]:
            i += 1
        return i

    rng = np.random.default_rng(0)
    base = [int(t) for t in rng.integers(0, 5, 40)]
    cases = [([], []), ([], base), (base, base), (base[:17], base), (base, base[:3])]
    for j in range(len(base)):
        changed = list(base)
        changed[j] += 1
        cases += [(base, changed), (changed[: j + 5], base)]
    for a, b in cases:
        assert _common_prefix(a, b) == scan(a, b), (a, b)


def test_known_tokens_are_scheduled_before_drafts() -> None:
    """A new request's prompt and every running request's known tokens get the budget first;
    drafts share what is left (a prefill split by drafts costs a whole extra step)."""
    s = Scheduler(KVCacheManager(3, 64), max_num_tokens=8)
    r = SchedRequest(list(range(4)), 10, request_id="r")
    s.add_request(r)
    s.update(s.schedule(), {"r": 7})
    q = SchedRequest(list(range(5)), 10, request_id="q")  # arrives while r decodes
    s.add_request(q)
    r.spec_token_ids = [1, 2, 3, 4, 5, 6]
    out = s.schedule()
    by_id = {c.request.request_id: c for c in out.chunks}
    assert by_id["q"].num_new_tokens == 5 and by_id["q"].spec_token_ids == []  # whole prompt
    assert by_id["r"].spec_token_ids == [1, 2] and by_id["r"].num_new_tokens == 3  # the rest
    assert out.num_scheduled_tokens == 8


# -- the whole loop on a tiny engine --------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_engine):  # type: ignore[no-untyped-def]
    return tiny_engine("tiny-llama", max_batch=4, max_seq_len=128)


def greedy_params(n: int) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=5 + (9 * i) % 31, ignore_eos=True) for i in range(n)]


@pytest.fixture(scope="module")
def reference(engine):  # type: ignore[no-untyped-def]
    """Target-only greedy token ids of MANY_PROMPTS, each alone."""
    llm = LLM(engine)
    params = greedy_params(len(MANY_PROMPTS))
    return [llm.generate(p, sp)[0].token_ids for p, sp in zip(MANY_PROMPTS, params, strict=True)]


@pytest.mark.parametrize("draft", ["ngram", "suffix"])
def test_speculative_greedy_equals_target_greedy(engine, reference, draft: str) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(engine, draft=draft)
    params = greedy_params(len(MANY_PROMPTS))
    alone = [llm.generate(p, sp)[0] for p, sp in zip(MANY_PROMPTS, params, strict=True)]
    assert [o.token_ids for o in alone] == reference
    batched = llm.generate(MANY_PROMPTS, params)
    assert [o.token_ids for o in batched] == reference
    stats = llm.spec_stats
    assert stats is not None and stats.accepted_tokens > 0 and stats.tokens_per_target_call > 1
    assert sum(o.stats.spec.accepted_tokens for o in batched + alone) == stats.accepted_tokens


def test_speculation_with_preemption_and_a_small_budget(engine, reference) -> None:  # type: ignore[no-untyped-def]
    params = greedy_params(len(MANY_PROMPTS))
    tight = LLM(engine, draft="ngram", kv_budget_tokens=160, max_num_tokens=7)
    outs = tight.generate(MANY_PROMPTS, params)
    assert [o.token_ids for o in outs] == reference
    assert tight.core.scheduler.kv.tokens_in_use == 0
    long = [PROMPTS[1] * 2] * 6
    long_params = [SamplingParams(max_tokens=40, ignore_eos=True)] * 6
    expected = LLM(engine).generate(long, long_params)
    outs = LLM(engine, draft="ngram", kv_budget_tokens=160).generate(long, long_params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
    assert sum(o.stats.num_preemptions for o in outs) > 0


class OracleProposer:
    """Proposes the target's own continuation, wrong from draft position WRONG_AT on."""

    name = "oracle"
    is_model = False

    def __init__(self, answers: dict[str, list[int]], wrong_at: int) -> None:
        self.answers, self.wrong_at = answers, wrong_at

    def propose(self, requests: Sequence[SpecRequest]) -> dict[str, Draft]:
        drafts = {}
        for r in requests:
            full = self.answers[r.request_id]
            tokens = full[len(r.token_ids) : len(r.token_ids) + r.max_draft]
            tokens = [t if i < self.wrong_at else (t + 1) % 50 for i, t in enumerate(tokens)]
            drafts[r.request_id] = Draft(tokens)
        return drafts

    def finish(self, request_id: str, token_ids: list[int], num_prompt_tokens: int) -> None:
        pass


@pytest.mark.parametrize("wrong_at", [0, 1, 2, 3, 4])
def test_rollback_at_every_draft_position(engine, wrong_at: int) -> None:  # type: ignore[no-untyped-def]
    """Drafts right up to position WRONG_AT of 4: exactly WRONG_AT are kept each round, the
    rest roll back, and the output is the target's."""
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    plain = LLM(engine)
    expected = {p: plain.generate(p, params)[0] for p in PROMPTS}
    llm = LLM(engine, draft="ngram", max_draft_len=4)
    assert llm.core.speculator is not None
    llm.core.speculator.policy = DraftLengthPolicy(max_draft_len=4, token_cost_ratio=0.0)
    requests = llm._make_requests(list(PROMPTS), params)
    answers = {
        r.request_id: r.sched.prompt_token_ids + expected[p].token_ids
        for r, p in zip(requests, PROMPTS, strict=True)
    }
    llm.core.speculator.proposer = OracleProposer(answers, wrong_at)
    for _ in llm._drive(requests):
        pass
    for r, p in zip(requests, PROMPTS, strict=True):
        assert r.output().token_ids == expected[p].token_ids
        stats = r.stats.spec
        assert stats.accepted_tokens == sum(min(wrong_at, k) for k in _round_sizes(stats))
        assert stats.rounds > 0


def _round_sizes(stats) -> list[int]:  # type: ignore[no-untyped-def]
    """Draft sizes are 4 except near max_tokens; with a perfect prefix of WRONG_AT each round
    keeps min(WRONG_AT, size): checked through totals (every round but the last has 4)."""
    full, rest = divmod(stats.draft_tokens, 4)
    return [4] * full + ([rest] if rest else [])


def test_stops_and_max_tokens_behave_as_without_speculation(engine) -> None:  # type: ignore[no-untyped-def]
    plain, spec = LLM(engine), LLM(engine, draft="ngram")
    base = plain.generate(PROMPTS[0], SamplingParams(max_tokens=40, ignore_eos=True))[0]
    stop = base.text[len(base.text) // 2 : len(base.text) // 2 + 3]
    for params in (
        SamplingParams(max_tokens=7, ignore_eos=True),
        SamplingParams(max_tokens=40, ignore_eos=True, stop=[stop]),
        SamplingParams(max_tokens=40, stop_token_ids=[base.token_ids[11]]),
    ):
        a = plain.generate(PROMPTS[0], params)[0]
        b = spec.generate(PROMPTS[0], params)[0]
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)


def test_speculative_false_never_speculates(engine) -> None:  # type: ignore[no-untyped-def]
    assert LLM(engine, draft="ngram", speculative=False).core.speculator is None
    assert LLM(engine).core.speculator is None  # no draft in the manifest


def test_seeded_sampling_with_speculation_is_reproducible(engine) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(max_tokens=30, temperature=0.8, seed=11, ignore_eos=True)
    a = LLM(engine, draft="ngram").generate(PROMPTS, params)
    b = LLM(engine, draft="ngram").generate(PROMPTS, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_a_speculator_is_built_for_model_free_sources(engine) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(engine, draft="ngram", max_draft_len=3)
    assert isinstance(llm.core.speculator, Speculator)
    assert llm.core.speculator.policy.max_draft_len == 3


def test_suffix_trie_follows_the_most_frequent_continuation() -> None:
    from enginesmith.runtime.proposer_suffix import SuffixTrie

    trie = SuffixTrie(depth=8)
    trie.extend([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 5, 6])
    assert trie.lookup([9, 1, 2], 4)[0] == [3, 4, 1, 2]  # "1 2" went on to 3 twice, to 5 once
    assert trie.lookup([7, 7], 4) == ([], 0.0)
    assert trie.lookup([2, 5], 1)[0] == [6]


def test_suffix_proposer_learns_from_finished_requests() -> None:
    from enginesmith.runtime.proposer_suffix import SuffixProposer

    proposer = SuffixProposer()
    proposer.finish("old", [0, 0, 4, 5, 6, 7, 8, 9], num_prompt_tokens=2)
    ask = SpecRequest("new", [1, 2, 4, 5], 2, slot=0, max_draft=3, sampler=GREEDY)
    assert proposer.propose([ask])["new"].tokens == [6, 7, 8]


# -- model drafts ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_with_draft(tiny_engine):  # type: ignore[no-untyped-def]
    return tiny_engine("tiny-llama", max_batch=4, max_seq_len=128, draft="suffix+self:int8")


def always_draft(llm: LLM) -> LLM:
    """Tiny drafts cost about a target step; make the policy draft anyway (K = max)."""
    assert llm.core.speculator is not None
    llm.core.speculator.policy = DraftLengthPolicy(max_draft_len=4, token_cost_ratio=0.0)
    return llm


@pytest.mark.parametrize("draft", [None, "self:int8", "ngram+self:int8"])
def test_model_drafts_keep_greedy_output(engine_with_draft, draft) -> None:  # type: ignore[no-untyped-def]
    params = greedy_params(len(MANY_PROMPTS))
    expected = LLM(engine_with_draft, speculative=False).generate(MANY_PROMPTS, params)
    llm = always_draft(LLM(engine_with_draft, draft=draft, kv_budget_tokens=200))
    outs = llm.generate(MANY_PROMPTS, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
    assert llm.spec_stats is not None and llm.spec_stats.accepted_tokens > 0


def test_sessions_taking_turns_stop_spinning_after_each_run(engine_with_draft) -> None:  # type: ignore[no-untyped-def]
    """A model draft and its target alternate: each session's workers must stop spinning when
    its run returns (spinning on would slow the other; off wakes workers per kernel)."""

    def stops(executor) -> str | None:  # type: ignore[no-untyped-def]
        options = executor.session.get_session_options()
        try:
            return str(options.get_session_config_entry("session.force_spinning_stop"))
        except RuntimeError:  # unset: ONNX Runtime's default (workers spin on after a run)
            return None

    llm = LLM(engine_with_draft, draft="self:int8")
    assert llm.core.speculator is not None
    draft_executor = llm.core.speculator.proposer.executor  # type: ignore[attr-defined]
    assert stops(llm.executor) == "1" and stops(draft_executor) == "1"
    assert stops(LLM(engine_with_draft, draft="ngram").executor) is None  # one session


def test_model_draft_sampling_is_seeded(engine_with_draft) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(max_tokens=20, temperature=0.8, seed=5, ignore_eos=True)
    runs = [
        always_draft(LLM(engine_with_draft, draft="self:int8")).generate(PROMPTS, params)
        for _ in range(2)
    ]
    assert [o.token_ids for o in runs[0]] == [o.token_ids for o in runs[1]]


def test_build_records_the_draft_and_hashes_it(engine_with_draft) -> None:  # type: ignore[no-untyped-def]
    import json

    manifest = json.loads((engine_with_draft / "manifest.json").read_text())
    assert manifest["speculative"]["draft"] == "suffix+self:int8"
    assert "draft/model.onnx" in manifest["files"]
    draft = json.loads((engine_with_draft / "draft" / "manifest.json").read_text())
    assert draft["quantization"]["mode"] == "int8"
    assert manifest["speculative"]["draft_manifest_sha256"] == draft["manifest_sha256"]


def test_a_draft_with_another_tokenizer_is_refused(engine, tiny_engine) -> None:  # type: ignore[no-untyped-def]
    from enginesmith.runtime.errors import InvalidRequestError

    other = tiny_engine("tiny-qwen2", max_batch=4, max_seq_len=128)
    with pytest.raises(InvalidRequestError, match="tokenizer differs"):
        LLM(engine, draft=str(other))


def test_a_self_draft_needs_a_built_draft(engine) -> None:  # type: ignore[no-untyped-def]
    from enginesmith.runtime.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="--draft self:int8"):
        LLM(engine, draft="self:int8")


def test_build_config_checks_the_draft() -> None:
    from pathlib import Path

    from enginesmith.compiler.config import BuildConfig
    from enginesmith.runtime.errors import BuildError

    with pytest.raises(BuildError, match="self:int8 or self:int4"):
        BuildConfig("tiny-llama", Path("x"), draft="self:fp8")
    with pytest.raises(BuildError, match="at most one"):
        BuildConfig("tiny-llama", Path("x"), draft="self:int8+self:int4")
    assert BuildConfig("tiny-llama", Path("x"), draft="suffix+self:int4").draft_model == "self:int4"


def test_generate_cli_speculates_unless_told_not_to(engine_with_draft, capsys) -> None:  # type: ignore[no-untyped-def]
    from enginesmith.runtime.cli import main

    args = ["generate", str(engine_with_draft), PROMPTS[1], "--max-tokens", "24", "--ignore-eos"]
    assert main([*args, "--draft", "ngram", "--no-stream"]) == 0
    with_spec = capsys.readouterr()
    assert "[speculation:" in with_spec.err
    assert main([*args, "--no-speculation", "--no-stream"]) == 0
    without = capsys.readouterr()
    assert "[speculation:" not in without.err and without.out == with_spec.out


# -- differential: verification rows against a plain prefill --------------------------------


def _prefill_logits(executor, slot: int, tokens: list[int]) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The reference path: the whole sequence prefilled into SLOT, logits at every position."""
    n = len(tokens)
    return executor.step(
        slot,
        np.array([tokens]),
        np.arange(n)[None],
        np.array([n - 1], np.int32),
        np.array([n], np.int32),
        np.arange(n),
    )


@pytest.mark.parametrize("ks", [(1, 0, 3), (7, 2, 0), (4, 4, 4)])
def test_verification_rows_match_prefill_and_roll_back(engine, ks) -> None:  # type: ignore[no-untyped-def]
    """Rows with K + 1 new tokens (K = 0: a decode row) and an idle row, in one call, give the
    logits a prefill of the same sequence gives at those positions; then each row rolls back
    to a different accepted length and continues with other tokens, still matching."""
    from enginesmith.runtime.engine_dir import read_manifest
    from enginesmith.runtime.executors import open_executor

    executor = open_executor(engine, read_manifest(engine))
    rng = np.random.default_rng(sum(ks))
    contexts = [list(rng.integers(3, 200, size=n)) for n in (5, 17, 30)]
    for slot, ctx in enumerate(contexts):
        _prefill_logits(executor, slot, ctx)
    rows = len(ks) + 1  # slot 3 idle
    width = max(ks) + 1
    drafts = [list(rng.integers(3, 200, size=k + 1)) for k in ks]
    ids = np.zeros((rows, width), np.int64)
    pos = np.zeros((rows, width), np.int64)
    seqk = np.zeros(rows, np.int32)
    q = np.zeros(rows, np.int32)
    wanted = []
    for r, (ctx, d) in enumerate(zip(contexts, drafts, strict=True)):
        ids[r, : len(d)] = d
        pos[r] = np.arange(len(ctx), len(ctx) + width)
        seqk[r], q[r] = len(ctx) + len(d) - 1, len(d)
        wanted += [r * width + s for s in range(len(d))]
    out = executor.step(0, ids, pos, seqk, q, np.array(wanted))
    at = 0
    for ctx, d in zip(contexts, drafts, strict=True):
        got = out[at : at + len(d)]
        at += len(d)
        ref = _prefill_logits(executor, 3, ctx + d)[len(ctx) :]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    # Roll back: row r keeps r of its drafts (capped), then two other tokens follow.
    for r, (ctx, d) in enumerate(zip(contexts, drafts, strict=True)):
        kept = ctx + d[: min(r, len(d) - 1) + 1]
        new = list(rng.integers(3, 200, size=2))
        n = len(kept)
        got = executor.step(
            r,
            np.array([new]),
            np.arange(n, n + 2)[None],
            np.array([n + 1], np.int32),
            np.array([2], np.int32),
            np.arange(2),
        )
        ref = _prefill_logits(executor, 3, kept + new)[n:]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


class FixedProposer:
    """Proposes max_draft copies of TOKEN (or nothing), recording what it was asked."""

    def __init__(self, token: int | None, is_model: bool) -> None:
        self.token, self.is_model, self.name = token, is_model, "fixed"
        self.asked: list[int] = []

    def propose(self, requests: Sequence[SpecRequest]) -> dict[str, Draft]:
        self.asked += [r.max_draft for r in requests]
        if self.token is None:
            return {}
        return {
            r.request_id: Draft([self.token] * r.max_draft, from_model=self.is_model)
            for r in requests
        }

    def finish(self, request_id: str, token_ids: list[int], num_prompt_tokens: int) -> None:
        pass


def test_hybrid_asks_the_model_only_when_free_drafts_find_nothing() -> None:
    from enginesmith.runtime.proposer_hybrid import HybridProposer

    free, model = FixedProposer(None, False), FixedProposer(5, True)
    hybrid = HybridProposer([free, model])
    spec = Speculator(hybrid, DraftLengthPolicy(max_draft_len=6, draft_cost=0.5), 512)
    r = SchedRequest([1, 2, 3], 100, request_id="r")
    r.slot, r.num_computed_tokens = 0, 2
    spec.track("r", SpecStats())
    spec.draft([(r, Sampler(SamplingParams(max_tokens=100)))])
    k_free = spec.free_policy.choose(PRIOR_ACCEPTANCE[False], 1)
    k_model = spec.policy.choose(PRIOR_ACCEPTANCE[True], 1)
    assert free.asked == [k_free] and model.asked == [k_model] and k_model < k_free
    assert r.spec_token_ids == [5] * k_model


def test_hybrid_goes_straight_to_the_model_when_it_promises_more() -> None:
    """Each part keeps its own acceptance: a request whose free drafts mostly fail while the
    model's hold skips the free part, and the verdict updates the model's estimate only."""
    from enginesmith.runtime.proposer_hybrid import HybridProposer
    from enginesmith.runtime.scheduler import ScheduledChunk
    from enginesmith.runtime.spec_policy import FREE_RETRY_DRIFT

    free, model = FixedProposer(7, False), FixedProposer(5, True)
    spec = Speculator(
        HybridProposer([free, model]), DraftLengthPolicy(max_draft_len=6, draft_cost=0.3), 512
    )
    r = SchedRequest([1, 2, 3], 100, request_id="r")
    r.slot, r.num_computed_tokens = 0, 2
    spec.track("r", SpecStats())
    state = spec._state("r")
    state.acceptance.update({False: 0.1, True: 0.95})
    sampler = Sampler(SamplingParams(max_tokens=100))
    spec.draft([(r, sampler)])
    k_model = spec.policy.choose(0.95, 1)
    assert free.asked == [] and model.asked == [k_model] and r.spec_token_ids == [5] * k_model
    drifted = 0.1 + FREE_RETRY_DRIFT * (PRIOR_ACCEPTANCE[False] - 0.1)
    assert state.acceptance[False] == pytest.approx(drifted)
    # the target agrees with the first two drafts only
    logits = np.zeros((k_model + 1, 10), np.float32)
    logits[0, 5] = logits[1, 5] = logits[2, 9] = 1.0
    chunk = ScheduledChunk.of(r, k_model + 1, r.spec_token_ids)
    free_before = state.acceptance[False]
    assert spec.emit(chunk, sampler, logits) == [5, 5, 9]
    assert state.acceptance[False] == free_before and state.acceptance[True] < 0.95


# -- the whole loop, sampling: a bigram "engine" with a 6-token vocabulary --------------------


class BigramExecutor:
    """An Executor whose next-token logits depend on the current token only (no cache needed,
    so rollback is trivially right): the exact distribution of any sequence is known."""

    vocab_size = 6

    def __init__(self, table: np.ndarray, max_batch: int = 64, max_seq_len: int = 32) -> None:
        self.table, self.max_batch, self.max_seq_len = table, max_batch, max_seq_len

    def warmup(self) -> None:
        pass

    def step(self, start, input_ids, position_ids, seqlens_k, query_seqlens, logits_indices):  # type: ignore[no-untyped-def]
        return self.table[input_ids.reshape(-1)[logits_indices]]


@pytest.mark.parametrize("source", ["ngram", "model"])
def test_sampling_through_the_loop_keeps_the_target_distribution(source: str) -> None:
    """20,000 requests of 3 tokens each at temperature 1 through EngineCore with drafts (t2
    drafted, t3 the bonus or the resample's follower): the joint distribution of (t1, t2, t3)
    must be the target's bigram product (chi-square, 215 degrees of freedom, false-failure rate
    1e-4; seeded, so deterministic)."""
    from enginesmith.runtime.engine_core import EngineCore
    from enginesmith.runtime.proposer_draft_engine import DraftEngineProposer
    from enginesmith.runtime.proposer_ngram import NgramProposer

    rng = np.random.default_rng(9)
    target = np.log(rng.dirichlet(np.ones(6), size=6))  # [vocab, vocab] logits
    draft = np.log(rng.dirichlet(np.ones(6), size=6))
    proposer = (
        NgramProposer() if source == "ngram" else DraftEngineProposer(BigramExecutor(draft), 0.0)
    )
    policy = DraftLengthPolicy(max_draft_len=3, token_cost_ratio=0.0)
    core = EngineCore(
        BigramExecutor(target),
        decode=lambda ids: "",
        eos_token_ids=frozenset(),
        max_num_tokens=512,
        speculator=Speculator(proposer, policy, 32),
    )
    draws = 20_000
    prompt = [0, 1, 2, 0, 1]  # n-gram drafts find "2 0 1" after "0 1"
    requests = []
    for seed in range(draws):
        params = SamplingParams(max_tokens=3, temperature=1.0, seed=seed, ignore_eos=True)
        r = core.new_request("", prompt, params)
        core.add(r)
        requests.append(r)
    while core.has_unfinished:
        core.step()
    triples = np.zeros((6, 6, 6))
    for r in requests:
        t1, t2, t3 = r.sched.output_token_ids
        triples[t1, t2, t3] += 1
    p = np.exp(target) / np.exp(target).sum(-1, keepdims=True)
    # P(t1) P(t2 | t1) P(t3 | t2)
    expected = p[prompt[-1]][:, None, None] * p[:, :, None] * p[None, :, :]
    assert chi_square_ok(triples.ravel(), expected.ravel())
    assert core.speculator is not None and core.speculator.totals.rounds > draws // 5
