"""Runtime behaviour on a tiny engine: in-place KV cache, batching, streaming, stop rules, chat,
seeded sampling."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from enginesmith import LLM, SamplingParams
from enginesmith.runtime.ort_cpu_executor import resident_zeros
from tests.conftest import PROMPTS


def test_kv_cache_is_updated_in_place(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(tiny_engine("tiny-llama"))
    buffers = llm.executor.cache_key + llm.executor.cache_value
    pointers = [b.ctypes.data for b in buffers]
    for b in buffers:
        b[...] = 0.0
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    total = len(out.prompt_token_ids) + len(out.token_ids) - 1  # last sampled token not yet cached
    assert [b.ctypes.data for b in buffers] == pointers  # same arrays, never reallocated
    # The engine wrote exactly the request's tokens into slot 0 of our preallocated arrays:
    # every (layer, kv head, position) row of keys and values up to TOTAL, nothing after it,
    # nothing in another slot.
    for kind, layers in (("key", llm.executor.cache_key), ("value", llm.executor.cache_value)):
        for layer, cache in enumerate(layers):  # [max_batch, kv_heads, max_seq_len, head_dim]
            written = np.abs(cache[0, :, :total]).max(axis=-1)  # [kv_heads, total]
            unwritten = np.argwhere(written == 0).tolist()
            assert not unwritten, (
                f"{kind} layer {layer}: (head, position) never written {unwritten}"
            )
            assert not np.any(cache[0, :, total:]), f"{kind} layer {layer}: written past {total}"
            assert not np.any(cache[1:]), f"{kind} layer {layer}: another slot was written"


def test_batched_equals_one_at_a_time(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(tiny_engine("tiny-qwen2"))
    prompts = list(PROMPTS) * 2  # 6 requests > 4 slots: slots are reused as requests finish
    params = [SamplingParams(max_tokens=4 + 3 * i, ignore_eos=True) for i in range(len(prompts))]
    together = llm.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, together, strict=True):
        alone = llm.generate(prompt, p)[0]
        assert out.token_ids == alone.token_ids
        assert len(out.token_ids) == p.max_tokens


def test_stream_deltas_concatenate_to_text(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(tiny_engine("tiny-llama"))
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    stream = llm.stream(PROMPTS[2], params)
    deltas = list(stream)
    assert len(deltas) > 1
    assert stream.output is not None
    assert "".join(deltas) == stream.output.text == llm.generate(PROMPTS[2], params)[0].text


def test_stop_string_and_stop_token(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(tiny_engine("tiny-llama"))
    full = llm.generate(PROMPTS[1], SamplingParams(max_tokens=24, ignore_eos=True))[0]
    stop = full.text[5:8]
    cut = llm.generate(PROMPTS[1], SamplingParams(max_tokens=24, ignore_eos=True, stop=stop))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    token = full.token_ids[3]
    by_token = llm.generate(
        PROMPTS[1], SamplingParams(max_tokens=24, ignore_eos=True, stop_token_ids=[token])
    )[0]
    assert by_token.finish_reason == "stop"
    assert by_token.token_ids == full.token_ids[: full.token_ids.index(token) + 1]


def test_eos_ends_generation(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(tiny_engine("tiny-llama"))
    full = llm.generate(PROMPTS[0], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    # Make the 3rd generated token count as EOS: generation must end right there.
    llm.eos_token_ids = frozenset({full.token_ids[2]})
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=12))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[: full.token_ids.index(full.token_ids[2]) + 1]


def test_max_seq_len_ends_with_length(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(tiny_engine("tiny-llama", max_seq_len=64))
    out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=500, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.token_ids) == 64


def test_seeded_sampling_is_reproducible_and_mixes_with_greedy(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(tiny_engine("tiny-llama"))
    sampled = SamplingParams(
        max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True
    )
    greedy = SamplingParams(max_tokens=16, ignore_eos=True)
    a = llm.generate([PROMPTS[0], PROMPTS[0]], [sampled, greedy])
    b = llm.generate(PROMPTS[0], sampled)[0]
    other = llm.generate(
        PROMPTS[0], SamplingParams(max_tokens=16, temperature=1.0, seed=8, ignore_eos=True)
    )[0]
    assert a[0].token_ids == b.token_ids  # same seed, same tokens, batched or alone
    assert a[1].token_ids == llm.generate(PROMPTS[0], greedy)[0].token_ids
    assert a[0].token_ids != a[1].token_ids and other.token_ids != b.token_ids


def test_chat_uses_the_chat_template(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(tiny_engine("tiny-llama"))
    messages = [{"role": "user", "content": "Say hello."}]
    out = llm.chat(messages, SamplingParams(max_tokens=6, ignore_eos=True))
    # ChatML, written out (not produced by the code under test).
    expected = "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
    assert out.prompt == expected
    assert (
        out.token_ids
        == llm.generate(expected, SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    )


def test_stats_are_filled(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(tiny_engine("tiny-llama"))
    s = llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, ignore_eos=True))[0].stats
    assert s.generated_tokens == 8 and s.prompt_tokens > 0
    assert 0 < s.time_to_first_token_s <= s.total_s
    assert s.decode_tokens_per_s > 0 and s.prefill_tokens_per_s > 0
    # The engine's decode calls lie inside the first-to-last-token span, host work between.
    assert 0 < s.decode_engine_s < s.decode_s
    assert s.engine_decode_tokens_per_s > s.decode_tokens_per_s
    # One timed call per token after the first.
    assert len(s.decode_call_s) == 7 and min(s.decode_call_s) > 0
    assert s.median_decode_call_tokens_per_s == pytest.approx(1 / sorted(s.decode_call_s)[3])
    assert 0 <= s.slow_decode_call_share < 1


def test_slow_decode_calls_are_measured_beyond_the_median() -> None:
    """Calls of 10, 10, 11, 12 and 50 ms: median 11 ms; only the 50 ms call is over twice the
    median, and it lost 39 of the 93 ms."""
    from enginesmith.runtime.engine_core import RequestStats

    s = RequestStats(decode_call_s=[0.010, 0.010, 0.011, 0.012, 0.050])
    assert s.median_decode_call_tokens_per_s == pytest.approx(1 / 0.011)
    assert s.slow_decode_call_share == pytest.approx(0.039 / 0.093)
    assert RequestStats().median_decode_call_tokens_per_s == 0.0
    assert RequestStats().slow_decode_call_share == 0.0


def _resident_fraction(array: np.ndarray) -> float:
    """Fraction of ARRAY's pages backed by memory now (mincore(2)); pages np.zeros left
    unmapped do not count."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    first = array.ctypes.data // page * page
    length = array.ctypes.data + array.nbytes - first
    pages = (length + page - 1) // page
    vector = (ctypes.c_ubyte * pages)()
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    if libc.mincore(ctypes.c_void_p(first), ctypes.c_size_t(length), vector) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(v & 1 for v in vector) / pages


@pytest.mark.skipif(sys.platform != "linux", reason="mincore(2) residency is measured on Linux")
def test_kv_cache_memory_is_resident_from_load(tiny_engine, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The KV caches are backed by memory at load (resident_zeros), not faulted in by serving
    steps; an unwritten mapping of the same size is the control that shows the measure can
    fail."""
    import mmap

    shape = (16, 1024, 1024)  # 64 MiB
    # Control: zeros in a fresh anonymous mapping, never written (np.zeros may reuse freed,
    # already resident heap memory in a long test process).
    control = np.frombuffer(mmap.mmap(-1, 64 << 20), np.float32).reshape(shape)
    cache = resident_zeros(shape)
    assert _resident_fraction(cache) == 1.0
    assert _resident_fraction(control) < 0.5
    assert not cache.any()
    # The session allocates both caches through it (the tiny engine's are too small to measure).
    from enginesmith.runtime import ort_cpu_executor as session_module

    made = []
    monkeypatch.setattr(
        session_module,
        "resident_zeros",
        lambda s, *dtype: made.append(s) or resident_zeros(s, *dtype),
    )
    llm = LLM(tiny_engine("tiny-llama"))
    assert made[-2:] == [llm.executor.cache_key_all.shape, llm.executor.cache_value_all.shape]
