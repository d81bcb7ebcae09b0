"""EngineCore: one `step()` = schedule -> execute -> sample -> update.

Shared by the synchronous `LLM.generate` loop and the asynchronous serving loop. Each step
turns the scheduler's chunks into as few engine calls as padding allows: every single-token
chunk (decode) goes into ONE call over the contiguous slot range they span (rows of other
slots in that range are idle, query_seqlens = 0). Multi-token chunks (prefill or recompute)
are grouped by adjacent slots into calls whose right padding stays under MAX_PADDING of the
real tokens (one weight read for several prompts); a decode row is never padded to a
chunk's length, which would multiply the work of the whole call.


This is the only step loop: prefill, chunked prefill, decode and verification are the same
step with different token counts, all planned by the scheduler. With a Speculator, draft tokens
are proposed before scheduling and ride in the decode call as extra tokens of their row
(runtime/speculation.py); rows of different widths share that call, right-padded.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from enginesmith.runtime.executor import Executor
from enginesmith.runtime.sampling import (
    IncrementalDetokenizer,
    Sampler,
    SamplingParams,
    StopChecker,
    TokenLogprob,
)
from enginesmith.runtime.scheduler import (
    KVCacheManager,
    RequestStatus,
    SchedRequest,
    ScheduledChunk,
    Scheduler,
)
from enginesmith.runtime.speculation import SpecStats, Speculator

# A prefill call may compute at most this fraction of padding on top of its real tokens.
MAX_PADDING = 0.25


@dataclass
class RequestStats:
    """Timing of one request (seconds, on the caller's clock)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token_s: float = 0.0
    prefill_s: float = 0.0  # engine time of the calls that computed this request's prompt
    decode_s: float = 0.0  # from the first to the last generated token
    # Engine time of each decode call that computed one of tokens 2..n, in order (a call that
    # steps several requests counts in full for each).
    decode_call_s: list[float] = field(default_factory=list)
    total_s: float = 0.0
    num_preemptions: int = 0
    # time.perf_counter() of the request's arrival and of each generated token (for TTFT/ITL).
    arrival_time: float = 0.0
    token_times: list[float] = field(default_factory=list)
    # Speculative decoding: drafts proposed / accepted, tokens per target call, draft time.
    spec: SpecStats = field(default_factory=SpecStats)

    @property
    def decode_engine_s(self) -> float:
        """Engine time of the decode calls: decode_s less what the host does between them."""
        return sum(self.decode_call_s)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per second from the first to the last (the caller's rate)."""
        steps = self.generated_tokens - 1
        return steps / self.decode_s if self.decode_s and steps > 0 else 0.0

    @property
    def engine_decode_tokens_per_s(self) -> float:
        """The same tokens per second of the engine's decode calls alone (no sampling,
        detokenizing, scheduling or other host work between them)."""
        steps = self.generated_tokens - 1
        return steps / self.decode_engine_s if self.decode_engine_s and steps > 0 else 0.0

    @property
    def median_decode_call_tokens_per_s(self) -> float:
        """One token per decode call at the median call's time: the engine's rate without the
        calls something outside the process stalled (on a shared host a vCPU can be taken
        away for tens of milliseconds mid-call), nor the host work between calls."""
        return 1.0 / statistics.median(self.decode_call_s) if self.decode_call_s else 0.0

    @property
    def slow_decode_call_share(self) -> float:
        """The time that decode calls over twice the median call took beyond the median, as
        a share of all decode calls' time: what the stalled calls cost."""
        if not self.decode_call_s:
            return 0.0
        median = statistics.median(self.decode_call_s)
        lost = sum(c - median for c in self.decode_call_s if c > 2 * median)
        return lost / sum(self.decode_call_s)


@dataclass
class RequestOutput:
    """The result of one request."""

    prompt: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop string or stop token) | "length" | "cancelled"
    stats: RequestStats
    # Per generated token when SamplingParams.logprobs is set (Sampler.logprobs), else None.
    logprobs: list[TokenLogprob] | None = None


@dataclass(eq=False)
class LiveRequest:
    """A request with its sampling state; `sched` is what the scheduler sees."""

    prompt: str
    sched: SchedRequest
    params: SamplingParams
    sampler: Sampler
    detokenizer: IncrementalDetokenizer
    stopper: StopChecker
    text_parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stats: RequestStats = field(default_factory=RequestStats)
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float = 0.0

    @property
    def request_id(self) -> str:
        return self.sched.request_id

    def output(self) -> RequestOutput:
        return RequestOutput(
            self.prompt,
            self.sched.prompt_token_ids,
            "".join(self.text_parts),
            list(self.sched.output_token_ids),
            self.finish_reason or "length",
            self.stats,
            list(self.logprobs) if self.params.logprobs is not None else None,
        )


@dataclass
class StepEvent:
    """What one step did for one request: new text (held back while it may be the start of a
    stop string), the tokens generated (with their logprobs when asked for), finished or not."""

    request: LiveRequest
    delta: str
    finished: bool
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


class EngineCore:
    """Owns the scheduler and drives the executor one iteration at a time."""

    def __init__(
        self,
        executor: Executor,
        decode: Callable[[list[int]], str],
        eos_token_ids: frozenset[int],
        max_num_tokens: int,
        kv_budget_tokens: int | None = None,
        max_waiting: int | None = None,
        speculator: Speculator | None = None,
    ) -> None:
        self.executor = executor
        self.speculator = speculator
        self.decode = decode
        self.eos_token_ids = eos_token_ids
        kv = KVCacheManager(executor.max_batch, executor.max_seq_len, kv_budget_tokens)
        self.scheduler = Scheduler(kv, max_num_tokens, max_waiting)
        self.live: dict[str, LiveRequest] = {}

    def new_request(
        self, prompt: str, prompt_ids: list[int], params: SamplingParams
    ) -> LiveRequest:
        sched = SchedRequest(prompt_ids, params.max_tokens)
        detok = IncrementalDetokenizer(self.decode, prompt_ids)
        return LiveRequest(prompt, sched, params, Sampler(params), detok, StopChecker(params.stop))

    def add(self, request: LiveRequest) -> None:
        self.scheduler.add_request(request.sched)
        self.live[request.request_id] = request
        if self.speculator is not None:
            self.speculator.track(request.request_id, request.stats.spec)

    def abort(self, request_id: str) -> LiveRequest | None:
        """Cancel a request: its slot and KV are freed at once."""
        request = self.live.pop(request_id, None)
        if request is not None and request.finish_reason is None:
            self._finish(request)
            request.finish_reason = "cancelled"
        return request

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # -- one iteration ------------------------------------------------------------------

    def step(self) -> list[StepEvent]:
        if self.speculator is not None:
            running = [(r, self.live[r.request_id].sampler) for r in self.scheduler.running]
            self.speculator.draft(running)
        output = self.scheduler.schedule()
        if not output.chunks:
            if self.scheduler.has_unfinished:
                raise RuntimeError("scheduler made no progress [developer error]")
            return []
        logits = self._execute(output.chunks)
        sampled: dict[str, int | list[int]] = {}
        rows_by_request: dict[str, np.ndarray] = {}
        for chunk in output.chunks:
            if chunk.samples:
                request = self.live[chunk.request.request_id]
                rows = logits[request.request_id]  # [num_spec + 1, vocab]
                rows_by_request[request.request_id] = rows
                if self.speculator is not None:
                    sampled[request.request_id] = self.speculator.emit(chunk, request.sampler, rows)
                else:
                    sampled[request.request_id] = [request.sampler.sample(rows[-1])]
        self.scheduler.update(output, sampled)
        now = time.perf_counter()
        events = []
        for request_id, tokens in sampled.items():
            request = self.live[request_id]
            assert isinstance(tokens, list)
            first = len(request.sched.output_token_ids) - len(tokens)
            if len(tokens) == 1 and request.params.logprobs is None:
                # One token without logprobs (every plain decode): no per-token bookkeeping.
                delta = self._accept(request, tokens[0], now, first + 1)
                self._done(request)
                finished = request.finish_reason is not None
                events.append(StepEvent(request, delta, finished, tokens))
                continue
            rows = rows_by_request[request_id]
            delta = ""
            emitted: list[int] = []
            token_logprobs: list[TokenLogprob] = []
            for i, token in enumerate(tokens):
                emitted.append(token)
                if request.params.logprobs is not None:
                    # Token i was decided at row i (rows: the last known position, then each
                    # draft position): the target's distribution there, also for a token
                    # that rejection sampling drew again.
                    row = rows[i]
                    token_logprobs.append(
                        request.sampler.logprobs(row, token, request.params.logprobs)
                    )
                delta += self._accept(request, token, now, first + i + 1)
                if request.finish_reason is not None:
                    del request.sched.output_token_ids[first + i + 1 :]  # tokens past a stop
                    break
            request.logprobs.extend(token_logprobs)
            self._done(request)
            finished = request.finish_reason is not None
            events.append(StepEvent(request, delta, finished, emitted, token_logprobs))
        return events

    def _done(self, request: LiveRequest) -> None:
        """Free REQUEST if this step finished it."""
        if request.finish_reason is not None:
            self._finish(request)
            del self.live[request.request_id]

    def _finish(self, request: LiveRequest) -> None:
        if self.speculator is not None:
            self.speculator.finish(request.sched)
        self.scheduler.finish(request.sched)

    def _execute(self, chunks: list[ScheduledChunk]) -> dict[str, np.ndarray]:
        """Run CHUNKS on the executor; return logits [num_spec + 1, vocab] per sampling
        request (its last known position and each draft position)."""
        logits: dict[str, np.ndarray] = {}
        decodes = [c for c in chunks if c.num_new_tokens == 1 or c.num_spec]
        if decodes:
            start = time.perf_counter()
            logits.update(self._run_decodes(decodes))
            elapsed = time.perf_counter() - start
            for chunk in decodes:
                if chunk.start >= len(chunk.request.prompt_token_ids):  # not a 1-token prompt
                    self.live[chunk.request.request_id].stats.decode_call_s.append(elapsed)
        prefills = [c for c in chunks if c.num_new_tokens > 1 and not c.num_spec]
        for group in group_prefill_chunks(prefills):
            start = time.perf_counter()
            logits.update(self._run_prefill_group(group))
            elapsed = time.perf_counter() - start
            for chunk in group:
                if chunk.start < len(chunk.request.prompt_token_ids):
                    self.live[chunk.request.request_id].stats.prefill_s += elapsed
        return logits

    def _run_prefill_group(self, group: list[ScheduledChunk]) -> dict[str, np.ndarray]:
        """One call over the adjacent slots of GROUP, each row right-padded to the longest."""
        lo = _slot(group[0])
        width = max(c.num_new_tokens for c in group)
        input_ids = np.zeros((len(group), width), np.int64)
        position_ids = np.zeros((len(group), width), np.int64)
        seqlens_k = np.zeros(len(group), np.int32)
        query_seqlens = np.zeros(len(group), np.int32)
        for row, c in enumerate(group):
            n = c.num_new_tokens
            input_ids[row, :n] = c.request.all_token_ids[c.start : c.start + n]
            position_ids[row] = np.arange(c.start, c.start + width)  # padding: any position works
            seqlens_k[row] = c.start + n - 1
            query_seqlens[row] = n
        wanted = np.array([row * width + c.num_new_tokens - 1 for row, c in enumerate(group)])
        out = self.executor.step(lo, input_ids, position_ids, seqlens_k, query_seqlens, wanted)
        return {
            c.request.request_id: out[row : row + 1] for row, c in enumerate(group) if c.samples
        }

    def _run_decodes(self, chunks: list[ScheduledChunk]) -> dict[str, np.ndarray]:
        """One call over the slot range of CHUNKS: decodes (1 token) and verification rows (the
        last known token + drafts), right-padded to the widest; logits at every position of a
        row from its last known token on."""
        slots = [_slot(c) for c in chunks]
        lo, hi = min(slots), max(slots) + 1
        rows = hi - lo
        width = max(c.num_new_tokens for c in chunks)
        if width == 1:
            return self._run_plain_decodes(chunks, slots, lo, rows)
        input_ids = np.zeros((rows, width), np.int64)
        position_ids = np.zeros((rows, width), np.int64)
        seqlens_k = np.zeros(rows, np.int32)  # idle rows: T = 1, Q = 0 -> cache untouched
        query_seqlens = np.zeros(rows, np.int32)
        last_position = self.executor.max_seq_len - 1  # padding positions stay in the table
        wanted: list[int] = []
        picks: list[tuple[str, int, int]] = []  # request id, first and end index into wanted
        for c, slot in zip(chunks, slots, strict=True):
            row, n = slot - lo, c.num_new_tokens
            if n == 1 and not c.num_spec:
                input_ids[row, 0] = c.request.token_at(c.start)
            else:
                input_ids[row, :n] = c.token_ids()
            position_ids[row] = np.minimum(np.arange(c.start, c.start + width), last_position)
            seqlens_k[row] = c.start + n - 1
            query_seqlens[row] = n
            first = len(wanted)
            wanted.extend(row * width + s for s in range(n - 1 - c.num_spec, n))
            picks.append((c.request.request_id, first, len(wanted)))
        indices = np.array(wanted, np.int64)
        out = self.executor.step(lo, input_ids, position_ids, seqlens_k, query_seqlens, indices)
        return {rid: out[a:b] for (rid, a, b), c in zip(picks, chunks, strict=True) if c.samples}

    def _run_plain_decodes(
        self, chunks: list[ScheduledChunk], slots: list[int], lo: int, rows: int
    ) -> dict[str, np.ndarray]:
        """_run_decodes when every row is one token (no drafts): the arrays built from Python
        lists in one call each (host time between decode calls is on the critical path)."""
        tokens, positions, queries = [0] * rows, [0] * rows, [0] * rows
        for c, slot in zip(chunks, slots, strict=True):
            row = slot - lo
            tokens[row] = c.request.token_at(c.start)
            positions[row] = c.start
            queries[row] = 1  # idle rows: T = 1, Q = 0 -> cache untouched
        out = self.executor.step(
            lo,
            np.array([tokens], np.int64).reshape(rows, 1),
            np.array([positions], np.int64).reshape(rows, 1),
            np.array(positions, np.int32),
            np.array(queries, np.int32),
            np.array(slots, np.int64) - lo,
        )
        return {c.request.request_id: out[i : i + 1] for i, c in enumerate(chunks) if c.samples}

    def _accept(self, r: LiveRequest, token: int, now: float, n: int) -> str:
        """Record R's N-th generated TOKEN (already appended by the scheduler); decide if R is
        finished."""
        sched, p = r.sched, r.params
        r.stats.arrival_time = r.arrival
        r.stats.token_times.append(now)
        if n == 1:
            r.first_token_at = now
            r.stats.time_to_first_token_s = now - r.arrival
        r.stats.prompt_tokens = len(sched.prompt_token_ids)
        r.stats.generated_tokens = n
        r.stats.decode_s = now - r.first_token_at
        r.stats.total_s = now - r.arrival
        r.stats.num_preemptions = sched.num_preemptions
        # A stop token: one of the request's, or EOS unless ignore_eos.
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            r.finish_reason = "stop"
            delta = r.stopper.flush()
        else:
            delta, stopped = r.stopper.feed(r.detokenizer.add(token))
            if stopped:
                r.finish_reason = "stop"
            elif n >= p.max_tokens or len(sched.prompt_token_ids) + n >= self.executor.max_seq_len:
                r.finish_reason = "length"
                delta += r.stopper.feed(r.detokenizer.flush())[0] + r.stopper.flush()
        r.text_parts.append(delta)
        return delta


def group_prefill_chunks(chunks: list[ScheduledChunk]) -> list[list[ScheduledChunk]]:
    """Split multi-token chunks into calls: rows on adjacent slots, padding <= MAX_PADDING."""
    groups: list[list[ScheduledChunk]] = []
    for chunk in sorted(chunks, key=_slot):
        if groups:
            candidate = [*groups[-1], chunk]
            real = sum(c.num_new_tokens for c in candidate)
            padded = len(candidate) * max(c.num_new_tokens for c in candidate)
            adjacent = _slot(chunk) == _slot(groups[-1][-1]) + 1
            if adjacent and padded <= (1 + MAX_PADDING) * real:
                groups[-1].append(chunk)
                continue
        groups.append([chunk])
    return groups


def _slot(chunk: ScheduledChunk) -> int:
    if chunk.request.slot is None:
        raise RuntimeError(f"{chunk.request.request_id} scheduled without a slot [developer error]")
    return chunk.request.slot


__all__ = [
    "EngineCore",
    "LiveRequest",
    "RequestOutput",
    "RequestStats",
    "RequestStatus",
    "StepEvent",
]
