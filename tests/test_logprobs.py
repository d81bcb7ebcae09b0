"""Per-token logprobs (SamplingParams.logprobs): computed from the distribution the sampler
draws from (the raw model distribution for greedy requests), and asking for them never
changes the tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest

from enginesmith import LLM, SamplingParams
from enginesmith.runtime.errors import InvalidRequestError
from enginesmith.runtime.sampling import Sampler
from tests.conftest import PROMPTS


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max()
    return x - math.log(float(np.exp(x).sum()))


@pytest.mark.parametrize("vocab", [5, 64, 1000])
def test_greedy_logprobs_are_the_model_distribution(vocab: int) -> None:
    logits = np.random.default_rng(vocab).normal(size=vocab).astype(np.float32)
    sampler = Sampler(SamplingParams(logprobs=3))
    token = sampler.sample(logits)
    lp = sampler.logprobs(logits, token, 3)
    reference = log_softmax(logits)
    assert lp.logprob == pytest.approx(reference[token], abs=1e-9)
    assert [t for t, _ in lp.top] == list(np.argsort(-reference)[:3])
    assert [v for _, v in lp.top] == pytest.approx(sorted(reference, reverse=True)[:3], abs=1e-9)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, seed=1),
        SamplingParams(temperature=1.3, top_k=10, seed=2),
        SamplingParams(temperature=1.0, top_p=0.5, seed=3),
    ],
)
def test_sampled_logprobs_are_the_processed_distribution(params: SamplingParams) -> None:
    logits = np.random.default_rng(0).normal(scale=3, size=200).astype(np.float32)
    sampler = Sampler(params)
    probs = sampler.probabilities(logits)
    token = sampler.sample(logits)
    lp = sampler.logprobs(logits, token, 20)
    assert lp.logprob == pytest.approx(math.log(probs[token]))
    kept = int((probs > 0).sum())
    assert len(lp.top) == min(20, kept)  # tokens outside the kept set are never listed
    assert all(math.isfinite(v) for _, v in lp.top)
    assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


@pytest.mark.parametrize("bad", [-1, 21, 1.5, "3"])
def test_logprobs_count_is_validated(bad: object) -> None:
    with pytest.raises(InvalidRequestError, match="logprobs"):
        SamplingParams(logprobs=bad)  # type: ignore[arg-type]


def test_logprobs_do_not_change_tokens_and_match_each_token(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(tiny_engine("tiny-llama"))
    for params in (
        SamplingParams(max_tokens=10, ignore_eos=True),
        SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.9, seed=5),
    ):
        plain = llm.generate(list(PROMPTS), params)
        with_lp = llm.generate(list(PROMPTS), SamplingParams(**{**vars(params), "logprobs": 2}))
        for a, b in zip(plain, with_lp, strict=True):
            assert a.token_ids == b.token_ids and a.logprobs is None
            assert b.logprobs is not None and [x.token_id for x in b.logprobs] == b.token_ids
            assert all(x.logprob <= 0 and len(x.top) == 2 for x in b.logprobs)


def test_logprobs_under_speculation_equal_those_without(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    """Several tokens per step (accepted drafts): each token's logprobs come from its own
    verification row, so they equal the plain run's token by token."""
    engine = tiny_engine("tiny-llama")
    params = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=3)
    plain = LLM(engine).generate(list(PROMPTS), params)
    spec_llm = LLM(engine, draft="ngram")
    spec = spec_llm.generate(list(PROMPTS), params)
    stats = spec_llm.spec_stats
    assert stats is not None and stats.accepted_tokens > 0  # some steps emitted several tokens
    worst = 0.0
    for a, b in zip(plain, spec, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs is not None and b.logprobs is not None
        assert len(b.logprobs) == len(b.token_ids)
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.token_id == y.token_id
            assert [t[0] for t in x.top] == [t[0] for t in y.top]
            worst = max(worst, abs(x.logprob - y.logprob))
    print(f"largest logprob difference: {worst:.2e}")
    assert worst < 1e-4  # a verification row and a decode row round differently: ~1e-6
