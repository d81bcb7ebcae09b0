"""Scheduler and KV-cache manager, without a model: admission, token budget, chunked prefill,
preemption with recompute, cancel, bounded queue."""

from __future__ import annotations

import pytest

from enginesmith.runtime.errors import InvalidRequestError
from enginesmith.runtime.scheduler import (
    KVCacheManager,
    QueueFullError,
    RequestStatus,
    SchedRequest,
    Scheduler,
)


def create_requests(n: int, prompt_len: int = 8, max_tokens: int = 4) -> list[SchedRequest]:
    return [SchedRequest(list(range(prompt_len)), max_tokens, request_id=f"r{i}") for i in range(n)]


def make_scheduler(
    slots: int = 4,
    capacity: int = 64,
    budget: int | None = None,
    max_num_tokens: int = 32,
    max_waiting: int | None = None,
) -> Scheduler:
    return Scheduler(KVCacheManager(slots, capacity, budget), max_num_tokens, max_waiting)


def run_step(s: Scheduler, token: int = 7):  # type: ignore[no-untyped-def]
    """schedule + update, sampling TOKEN for every chunk that reaches its last known token."""
    out = s.schedule()
    s.update(out, {c.request.request_id: token for c in out.chunks if c.samples})
    return out


def test_admission_is_limited_by_slots_and_fcfs() -> None:
    s = make_scheduler(slots=2, max_num_tokens=100)
    reqs = create_requests(3)
    for r in reqs:
        s.add_request(r)
    out = run_step(s)
    assert [c.request.request_id for c in out.chunks] == ["r0", "r1"]
    assert [r.slot for r in reqs[:2]] == [0, 1] and reqs[2].status is RequestStatus.WAITING
    s.finish(reqs[0])  # frees slot 0 -> the next waiting request takes it
    out = run_step(s)
    assert reqs[2].slot == 0
    assert {c.request.request_id for c in out.chunks} == {"r1", "r2"}


def test_token_budget_chunks_prefill_and_serves_decodes_first() -> None:
    s = make_scheduler(max_num_tokens=10)
    first, second = (
        SchedRequest(list(range(6)), 4, request_id="a"),
        SchedRequest(list(range(25)), 4, request_id="b"),
    )
    s.add_request(first)
    run_step(s)  # "a" prefilled (6 tokens) and sampled its first token
    s.add_request(second)
    out = run_step(s)
    # decode of "a" first (1 token), then 9 of "b"'s 25 prompt tokens
    assert [(c.request.request_id, c.start, c.num_new_tokens) for c in out.chunks] == [
        ("a", 6, 1),
        ("b", 0, 9),
    ]
    assert out.num_scheduled_tokens == 10
    assert not out.chunks[1].samples  # mid-prompt chunk: nothing sampled
    out = run_step(s)
    assert [(c.request.request_id, c.start, c.num_new_tokens) for c in out.chunks] == [
        ("a", 7, 1),
        ("b", 9, 9),
    ]
    out = run_step(s)
    assert out.chunks[1].num_new_tokens == 7 and out.chunks[1].samples  # prompt done: first token
    assert second.output_token_ids == [7] and second.num_computed_tokens == 25


def test_preemption_recomputes_and_loses_nothing() -> None:
    # Budget for 30 tokens across slots: two requests of 12-token prompts + decodes collide.
    s = make_scheduler(slots=4, capacity=64, budget=30, max_num_tokens=64)
    a, b = (
        SchedRequest(list(range(12)), 10, request_id="a"),
        SchedRequest(list(range(12)), 10, request_id="b"),
    )
    s.add_request(a)
    s.add_request(b)
    preempted = []
    for _ in range(40):
        out = run_step(s)
        preempted += [r.request_id for r in out.preempted]
        for r in (a, b):
            if len(r.output_token_ids) >= r.max_tokens and r.status is RequestStatus.RUNNING:
                s.finish(r)
        if not s.has_unfinished:
            break
    assert preempted and preempted[0] == "b"  # the newest running request gives way
    assert b.num_preemptions >= 1
    # Nothing lost: both finished with all their tokens, the KV budget is fully returned.
    assert len(a.output_token_ids) == 10 and len(b.output_token_ids) == 10
    assert s.kv.tokens_in_use == 0 and s.kv.free_slots == 4


def test_preempted_request_resumes_from_its_known_tokens() -> None:
    s = make_scheduler(slots=2, capacity=64, budget=20, max_num_tokens=64)
    a, b = (
        SchedRequest(list(range(10)), 20, request_id="a"),
        SchedRequest(list(range(8)), 20, request_id="b"),
    )
    s.add_request(a)
    s.add_request(b)
    run_step(s)  # a: 10, b: 8 tokens -> 18 of 20
    run_step(s)  # 20 of 20
    out = run_step(s)  # a needs its 21st token: b is preempted
    assert [r.request_id for r in out.preempted] == ["b"]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and s.waiting[0] is b
    generated = list(b.output_token_ids)
    s.finish(a)
    out = run_step(s)
    # b is recomputed from prompt + generated tokens in one chunk, then samples the next token
    assert [(c.request.request_id, c.start, c.num_new_tokens) for c in out.chunks] == [
        ("b", 0, 8 + len(generated))
    ]
    assert (
        b.output_token_ids[: len(generated)] == generated
        and len(b.output_token_ids) == len(generated) + 1
    )


def test_cancel_frees_slot_and_budget() -> None:
    s = make_scheduler(slots=1)
    a, b = create_requests(2)
    s.add_request(a)
    s.add_request(b)
    run_step(s)
    assert s.kv.free_slots == 0
    s.finish(a)  # cancel a running request
    assert s.kv.free_slots == 1 and s.kv.tokens_in_use == 0 and a.status is RequestStatus.FINISHED
    s.finish(b)  # cancel a waiting one
    assert not s.has_unfinished


def test_bounded_queue_and_oversized_prompt() -> None:
    s = make_scheduler(slots=1, capacity=16, max_waiting=2)
    for r in create_requests(2):
        s.add_request(r)
    with pytest.raises(QueueFullError, match="retry later"):
        s.add_request(create_requests(1)[0])
    with pytest.raises(InvalidRequestError, match="--max-seq-len"):
        make_scheduler(capacity=16).add_request(SchedRequest(list(range(16)), 4))


def test_every_request_finishes_under_random_load() -> None:
    """Many requests, small budgets: computed counts never exceed known ones, slots never clash."""
    import random

    rng = random.Random(0)
    s = make_scheduler(slots=3, capacity=80, budget=120, max_num_tokens=17)
    reqs = [
        SchedRequest(list(range(rng.randint(1, 40))), rng.randint(1, 30), request_id=f"q{i}")
        for i in range(25)
    ]
    for r in reqs:
        s.add_request(r)
    for _ in range(2000):
        out = run_step(s)
        slots = [r.slot for r in s.running]
        assert len(slots) == len(set(slots))
        assert out.num_scheduled_tokens <= 17 and s.kv.tokens_in_use <= 120
        for r in list(s.running):
            assert r.num_computed_tokens <= r.num_tokens
            if len(r.output_token_ids) >= r.max_tokens:
                s.finish(r)
        if not s.has_unfinished:
            break
    assert all(len(r.output_token_ids) == r.max_tokens for r in reqs)


def test_prefill_chunks_group_by_adjacent_slots_and_padding() -> None:
    from enginesmith.runtime.engine_core import group_prefill_chunks
    from enginesmith.runtime.scheduler import ScheduledChunk

    def chunk(slot: int, n: int) -> ScheduledChunk:
        r = SchedRequest(list(range(n)), 4, request_id=f"s{slot}")
        r.slot = slot
        return ScheduledChunk.of(r, n)

    groups = group_prefill_chunks(
        [chunk(2, 30), chunk(0, 32), chunk(1, 28), chunk(3, 5), chunk(5, 30)]
    )
    # slots 0-2 have similar lengths: one call; slot 3 (5 tokens) would pad too much; 5 is not adjacent
    assert [[c.request.slot for c in g] for g in groups] == [[0, 1, 2], [3], [5]]
