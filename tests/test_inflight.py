"""In-flight batching on a real (tiny) engine: concurrent callers, chunked prefill, KV exhaustion
and cancellation must never change what a request generates."""

from __future__ import annotations

import asyncio

import pytest

from enginesmith import LLM, SamplingParams
from enginesmith.runtime.errors import InvalidRequestError
from tests.conftest import PROMPTS

MANY_PROMPTS = [f"{p} {i}" for i, p in enumerate(PROMPTS * 4)]  # 12 prompts of different lengths


def alone(llm: LLM, prompts: list[str], params: list[SamplingParams]) -> list[list[int]]:
    return [llm.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params, strict=True)]


@pytest.fixture(scope="module")
def engine(tiny_engine):  # type: ignore[no-untyped-def]
    return tiny_engine("tiny-llama", max_batch=4, max_seq_len=128)


def greedy_params(n: int) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=3 + (7 * i) % 17, ignore_eos=True) for i in range(n)]


def test_concurrent_async_callers_get_their_own_greedy_output(engine) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(engine, spin_wait=False)
    params = greedy_params(len(MANY_PROMPTS))
    expected = alone(llm, MANY_PROMPTS, params)

    async def serve() -> list[list[int]]:
        async def one(i: int) -> list[int]:
            await asyncio.sleep(0.002 * i)  # staggered arrivals join running batches
            return (await llm.submit(MANY_PROMPTS[i], params[i])).token_ids

        return list(await asyncio.gather(*(one(i) for i in range(len(MANY_PROMPTS)))))

    try:
        assert asyncio.run(serve()) == expected
    finally:
        llm.close()


def test_async_stream_matches_generate(engine) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(engine, spin_wait=False)
    params = SamplingParams(max_tokens=12, ignore_eos=True)

    async def collect() -> str:
        return "".join([d async for d in llm.stream_async(PROMPTS[0], params)])

    try:
        assert asyncio.run(collect()) == llm.generate(PROMPTS[0], params)[0].text
    finally:
        llm.close()


def test_chunked_prefill_with_a_small_token_budget(engine) -> None:  # type: ignore[no-untyped-def]
    params = greedy_params(len(MANY_PROMPTS))
    expected = alone(LLM(engine), MANY_PROMPTS, params)
    small = LLM(engine, max_num_tokens=5)  # prompts are cut into chunks of <= 5 tokens
    assert [o.token_ids for o in small.generate(MANY_PROMPTS, params)] == expected


def test_kv_exhaustion_preempts_without_losing_requests(engine) -> None:  # type: ignore[no-untyped-def]
    prompts = [PROMPTS[1] * 2] * 6  # ~40-token prompts, 40 new tokens each
    params = [SamplingParams(max_tokens=40, ignore_eos=True)] * 6
    expected = alone(LLM(engine), prompts, params)
    tight = LLM(engine, kv_budget_tokens=160)  # 4 slots x 128 physically, only 160 tokens allowed
    outs = tight.generate(prompts, params)
    assert [o.token_ids for o in outs] == expected
    assert sum(o.stats.num_preemptions for o in outs) > 0  # the budget really was exhausted
    assert tight.core.scheduler.kv.tokens_in_use == 0


def test_kv_budget_must_hold_one_sequence(engine) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError, match="at least one full sequence"):
        LLM(engine, kv_budget_tokens=64)


def test_cancel_frees_the_slot(engine) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(engine, spin_wait=False)

    async def cancel_midway() -> list[str]:
        stream = llm.stream_async(PROMPTS[2], SamplingParams(max_tokens=100, ignore_eos=True))
        deltas = []
        async for delta in stream:
            deltas.append(delta)
            if len(deltas) == 3:
                break
        await stream.aclose()  # abort: the request leaves the engine
        for _ in range(200):
            if not llm.core.has_unfinished:
                break
            await asyncio.sleep(0.01)
        return deltas

    try:
        deltas = asyncio.run(cancel_midway())
        assert len(deltas) == 3
        assert not llm.core.has_unfinished
        assert llm.core.scheduler.kv.free_slots == 4 and llm.core.scheduler.kv.tokens_in_use == 0
        # The engine still serves correctly afterwards.
        p = SamplingParams(max_tokens=5, ignore_eos=True)
        assert (
            llm.generate(PROMPTS[0], p)[0].token_ids
            == LLM(llm.engine_dir).generate(PROMPTS[0], p)[0].token_ids
        )
    finally:
        llm.close()
