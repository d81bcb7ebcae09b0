"""Tests for enginesmith.runtime.sampling: params validation, samplers, stop strings, detokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from enginesmith.runtime.errors import EnginesmithError, InvalidRequestError
from enginesmith.runtime.sampling import (
    IncrementalDetokenizer,
    Sampler,
    SamplingParams,
    StopChecker,
)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def draw_many(params: SamplingParams, logits: np.ndarray, n: int) -> np.ndarray:
    sampler = Sampler(params)
    return np.array([sampler.sample(logits) for _ in range(n)])


# --- SamplingParams -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1 (got 0)"),
        ({"max_tokens": -3}, "max_tokens must be >= 1"),
        ({"max_tokens": 2.5}, "max_tokens must be >= 1"),
        ({"temperature": -0.1}, "temperature must be a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"top_p": float("nan")}, "top_p must be in (0, 1]"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"stop_token_ids": [1, "2"]}, "stop_token_ids must hold non-negative integer"),
        ({"stop_token_ids": [1.0]}, "stop_token_ids must hold non-negative integer"),
        ({"stop_token_ids": [-1]}, "stop_token_ids must hold non-negative integer"),
        ({"stop": ["ok", ""]}, "stop must hold non-empty strings"),
        ({"seed": 1.5}, "seed must be a non-negative integer or None"),
    ],
)
def test_invalid_params_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert ": " in text  # every message names a fix after the colon
    assert isinstance(info.value, EnginesmithError)


def test_max_tokens_message_names_fix() -> None:
    with pytest.raises(InvalidRequestError, match="ask for at least one token"):
        SamplingParams(max_tokens=0)


def test_stop_normalization() -> None:
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=7).stop_token_ids == (7,)
    ids = SamplingParams(stop_token_ids=np.array([1, 2])).stop_token_ids
    assert ids == (1, 2)
    assert all(type(i) is int for i in ids)
    params = SamplingParams(stop=["x"], stop_token_ids=[3])
    hash(params)  # tuples keep the frozen dataclass hashable


def test_greedy_property() -> None:
    assert SamplingParams().greedy
    assert SamplingParams(temperature=0.7, top_k=1).greedy
    assert not SamplingParams(temperature=0.7).greedy
    assert not SamplingParams(temperature=0.7, top_k=2).greedy


# --- Sampler --------------------------------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    rng = np.random.default_rng(0)
    sampler = Sampler(SamplingParams())
    for _ in range(20):
        logits = rng.standard_normal(1000).astype(np.float32)
        assert sampler.sample(logits) == int(np.argmax(logits))
    ties = np.array([0.0, 3.0, 3.0, 1.0])
    assert sampler.sample(ties) == 1  # first index on ties
    probs = sampler.probabilities(ties)
    assert probs.dtype == np.float64
    assert probs.tolist() == [0.0, 1.0, 0.0, 0.0]


def test_seeded_sampling_is_reproducible_and_seeds_differ() -> None:
    logits = np.zeros(100)
    a = draw_many(SamplingParams(temperature=1.0, seed=1), logits, 200)
    b = draw_many(SamplingParams(temperature=1.0, seed=1), logits, 200)
    c = draw_many(SamplingParams(temperature=1.0, seed=2), logits, 200)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(set(a.tolist())) > 50  # actually random, not stuck on one token


def test_top_k_one_is_argmax() -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(500)
    samples = draw_many(SamplingParams(temperature=1.5, top_k=1, seed=0), logits, 200)
    assert set(samples.tolist()) == {int(np.argmax(logits))}


def test_top_k_restricts_support() -> None:
    rng = np.random.default_rng(2)
    logits = rng.standard_normal(1000) * 0.1  # flat, so all k candidates get drawn
    k = 5
    samples = draw_many(SamplingParams(temperature=1.0, top_k=k, seed=3), logits, 2000)
    top = set(np.argsort(logits)[-k:].tolist())
    assert set(samples.tolist()) == top


def test_top_p_support_is_nucleus() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(temperature=1.0, top_p=0.8, seed=4)
    samples = draw_many(params, logits, 2000)
    assert set(samples.tolist()) == {0, 1}
    probs = Sampler(params).probabilities(logits)
    np.testing.assert_allclose(probs, [0.625, 0.375, 0.0, 0.0], atol=1e-12)


def test_top_p_always_keeps_top_token() -> None:
    logits = np.log(np.array([0.4, 0.35, 0.25]))
    probs = Sampler(SamplingParams(temperature=1.0, top_p=0.01)).probabilities(logits)
    assert probs.tolist() == [1.0, 0.0, 0.0]


def test_top_p_large_vocab_matches_full_sort() -> None:
    # The nucleus spans far more than the initial candidate window, so it must grow.
    rng = np.random.default_rng(5)
    logits = rng.standard_normal(49152) * 0.5
    params = SamplingParams(temperature=0.9, top_p=0.9)
    probs = Sampler(params).probabilities(logits)
    full = softmax(logits / 0.9)
    order = np.argsort(full)[::-1]
    count = int(np.searchsorted(np.cumsum(full[order]), 0.9)) + 1
    expected = np.zeros_like(full)
    expected[order[:count]] = full[order[:count]] / full[order[:count]].sum()
    assert np.count_nonzero(probs) == count
    np.testing.assert_allclose(probs, expected, rtol=1e-9, atol=1e-15)


def test_top_k_and_top_p_combine() -> None:
    logits = np.log(np.array([0.05, 0.4, 0.3, 0.2, 0.05]))
    params = SamplingParams(temperature=1.0, top_k=3, top_p=0.7)
    probs = Sampler(params).probabilities(logits)
    # top-k keeps {1, 2, 3} -> renormalized {0.444, 0.333, 0.222}; top-p 0.7 keeps {1, 2}.
    np.testing.assert_allclose(probs, [0.0, 4 / 7, 3 / 7, 0.0, 0.0], atol=1e-12)


def test_empirical_frequencies_match_softmax() -> None:
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 20000
    samples = draw_many(SamplingParams(temperature=1.0, seed=6), logits, n)
    freq = np.bincount(samples, minlength=logits.size) / n
    np.testing.assert_allclose(freq, softmax(logits), atol=0.03)


def test_temperature_scaling() -> None:
    logits = np.array([2.0, 1.0, 0.0, -1.0])
    for t in (0.5, 2.0):
        probs = Sampler(SamplingParams(temperature=t)).probabilities(logits)
        np.testing.assert_allclose(probs, softmax(logits / t), rtol=1e-12)
    cold = Sampler(SamplingParams(temperature=0.5)).probabilities(logits)
    hot = Sampler(SamplingParams(temperature=2.0)).probabilities(logits)
    assert cold[0] > softmax(logits)[0] > hot[0]
    n = 20000
    samples = draw_many(SamplingParams(temperature=0.5, seed=7), logits, n)
    freq = np.bincount(samples, minlength=logits.size) / n
    np.testing.assert_allclose(freq, softmax(logits / 0.5), atol=0.03)


def test_probabilities_sum_to_one_and_masked_logits_never_drawn() -> None:
    logits = np.array([1.0, -np.inf, 0.5, -np.inf, 0.0], dtype=np.float32)
    params = SamplingParams(temperature=1.0, top_k=4, top_p=0.99, seed=8)
    probs = Sampler(params).probabilities(logits)
    assert probs.dtype == np.float64
    assert probs.sum() == pytest.approx(1.0)
    samples = draw_many(params, logits, 1000)
    assert not {1, 3} & set(samples.tolist())


def test_bad_logits_raise() -> None:
    sampler = Sampler(SamplingParams(temperature=1.0))
    with pytest.raises(ValueError, match="1-D"):
        sampler.sample(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="finite maximum"):
        sampler.sample(np.array([0.0, np.nan]))


def test_draw_uses_given_weights() -> None:
    sampler = Sampler(SamplingParams(temperature=1.0, seed=9))
    assert {sampler.draw(np.array([0.0, 0.0, 2.0])) for _ in range(50)} == {2}


# --- StopChecker ----------------------------------------------------------------------------------


def test_stop_without_stop_strings_passes_through() -> None:
    checker = StopChecker(())
    assert checker.feed("hello") == ("hello", False)
    assert checker.flush() == ""


def test_stop_within_one_feed() -> None:
    checker = StopChecker(("STOP",))
    assert checker.feed("abcSTOPdef") == ("abc", True)
    assert checker.matched == "STOP"
    assert checker.feed("more") == ("", True)
    assert checker.flush() == ""


def test_stop_spanning_feeds_never_leaks() -> None:
    checker = StopChecker(("</end>",))
    emitted = []
    for piece in ["Hello wor", "ld<", "/e", "nd", ">tail"]:
        text, stopped = checker.feed(piece)
        emitted.append(text)
        assert "<" not in text  # no part of the stop string is ever streamed
        if stopped:
            break
    assert stopped
    assert "".join(emitted) == "Hello world"
    assert checker.flush() == ""


def test_held_back_partial_is_released() -> None:
    checker = StopChecker(("###",))
    assert checker.feed("a#") == ("a", False)
    assert checker.feed("#") == ("", False)
    assert checker.feed("b") == ("##b", False)
    assert checker.feed("c#") == ("c", False)
    assert checker.flush() == "#"
    assert checker.flush() == ""


def test_stop_earliest_of_several() -> None:
    checker = StopChecker(("world", "lo w"))
    text, stopped = checker.feed("hello world")
    assert (text, stopped) == ("hel", True)
    assert checker.matched == "lo w"


def test_stop_holds_back_longest_candidate() -> None:
    checker = StopChecker(("abc", "bcd"))
    assert checker.feed("xab") == ("x", False)  # "ab" may start "abc"
    assert checker.feed("cd") == ("", True)  # "abc" completes first
    assert checker.matched == "abc"


# --- IncrementalDetokenizer -----------------------------------------------------------------------


def byte_decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


class ChunkTokenizer:
    """Toy tokenizer whose tokens are byte chunks that can split UTF-8 characters."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.window_lengths: list[int] = []

    def decode(self, ids: list[int]) -> str:
        self.window_lengths.append(len(ids))
        return b"".join(self.chunks[i] for i in ids).decode("utf-8", errors="replace")


TEXT = "héllo wörld — 世界 🙂 naïve café!"


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add(i) for i in ids]


def test_detokenizer_byte_level() -> None:
    ids = list(TEXT.encode("utf-8"))
    deltas = stream(IncrementalDetokenizer(byte_decode), ids)
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # partial characters were held back rather than emitted


def test_detokenizer_chunks_split_characters() -> None:
    data = TEXT.encode("utf-8")
    chunks = [data[i : i + 3] for i in range(0, len(data), 3)]  # cuts through multi-byte chars
    tok = ChunkTokenizer(chunks)
    deltas = stream(IncrementalDetokenizer(tok.decode), list(range(len(chunks))))
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas)


def test_detokenizer_with_prompt_context() -> None:
    prompt = list(b"prompt: ")
    ids = list(TEXT.encode("utf-8"))
    detok = IncrementalDetokenizer(byte_decode, prompt_ids=prompt)
    deltas = stream(detok, ids)
    assert "".join(deltas) == TEXT
    assert detok.token_ids == ids


def test_detokenizer_uses_sliding_window() -> None:
    text = "streaming text " * 200 + "世界"
    chunks = [bytes([b]) for b in range(256)]
    tok = ChunkTokenizer(chunks)
    deltas = stream(IncrementalDetokenizer(tok.decode), list(text.encode("utf-8")))
    assert "".join(deltas) == text
    assert max(tok.window_lengths) <= 8  # never re-decodes the whole sequence


def test_detokenizer_flush_releases_invalid_tail() -> None:
    detok = IncrementalDetokenizer(byte_decode)
    assert detok.add(ord("a")) == "a"
    assert detok.add(0xE4) == ""  # first byte of a 3-byte character that never completes
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""
