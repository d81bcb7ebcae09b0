"""The Python runtime API: `LLM(engine_dir)` with generate / stream / chat, and the async
serving API (`await llm.submit(...)`, `async for delta in llm.stream_async(...)`) that lets
concurrent callers share in-flight batches."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from enginesmith.runtime.engine_core import (
    EngineCore,
    LiveRequest,
    RequestOutput,
    RequestStats,
    StepEvent,
)
from enginesmith.runtime.engine_dir import read_manifest
from enginesmith.runtime.errors import BackendUnavailableError, InvalidRequestError
from enginesmith.runtime.executor import Executor, SpinMode
from enginesmith.runtime.executors import EXECUTOR_BACKENDS, open_executor
from enginesmith.runtime.sampling import SamplingParams
from enginesmith.runtime.speculation import SpecStats

# Per-step token budget when the manifest does not set one (older engines).
DEFAULT_MAX_NUM_TOKENS = 512
# An idle engine loop wakes this often to record its heartbeat (LLM.loop_heartbeat_age_s).
IDLE_WAKE_S = 0.5

__all__ = ["LLM", "RequestOutput", "RequestStats", "TextStream"]


class TextStream:
    """Iterator of text deltas for one request; `.output` is set when it is exhausted."""

    def __init__(self, llm: LLM, request: LiveRequest) -> None:
        self._llm, self._request = llm, request
        self.output: RequestOutput | None = None

    def __iter__(self) -> Iterator[str]:
        for event in self._llm._drive([self._request]):
            if event.delta:
                yield event.delta
        self.output = self._request.output()


class LLM:
    """Load an engine directory and generate text with it.

    Requests are scheduled every iteration (in-flight batching): decodes of running requests
    and chunked prefills of new ones share each engine step under a token budget
    (`max_num_tokens`), over the engine's KV slots (`max_batch`).
    """

    def __init__(
        self,
        engine_dir: str | Path,
        *,
        verify_files: bool = True,
        threads: int | None = None,
        max_num_tokens: int | None = None,
        kv_budget_tokens: int | None = None,
        max_waiting: int | None = None,
        spin_wait: bool = True,
        speculative: bool = True,
        draft: str | None = None,
        max_draft_len: int | None = None,
    ) -> None:
        """Load ENGINE_DIR (files verified against the manifest's hashes unless told not to).

        max_num_tokens: tokens computed per engine step (default: the engine's build setting).
        kv_budget_tokens: tokens all slots may hold together (default: max_batch x max_seq_len);
            a smaller budget makes the scheduler preempt and recompute instead of failing.
        max_waiting: bound of the waiting queue for submit(); None = unbounded.
        spin_wait: let ONNX Runtime's worker threads spin between kernels. Fastest for one
            synchronous caller (generate/stream); pass False to serve concurrent async callers
            (submit/stream_async) when the machine is busy, since spinning workers starve the
            event-loop thread (docs/benchmarks.md has the measurements).
        speculative: speculate when the engine has a draft (build-engine --draft) or DRAFT is
            given; False never does (docs/speculative.md).
        draft: a draft source without a rebuild: "ngram", "suffix", a hybrid such as
            "suffix+self:int8", or the path of another engine directory sharing the tokenizer.
        max_draft_len: the most draft tokens per request per step (default: the build's).
        """
        self.engine_dir = Path(engine_dir).expanduser()
        self.manifest = read_manifest(self.engine_dir, verify_hashes=verify_files)
        if self.manifest.get("backend") not in EXECUTOR_BACKENDS:
            raise BackendUnavailableError(
                f"{self.engine_dir}: backend {self.manifest.get('backend')!r} is not supported by "
                "this runtime; rebuild with --backend onnxruntime"
            )
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.engine_dir / self.manifest["files_by_role"]["tokenizer"]
        )
        # The detokenizer decodes twice per token: call the Rust tokenizer directly when the
        # wrapper would only convert types and pass it through (no clean-up pass).
        backend = getattr(self.tokenizer, "_tokenizer", None)
        self._backend_decode = (
            getattr(backend, "decode", None)
            if not getattr(self.tokenizer, "clean_up_tokenization_spaces", True)
            else None
        )
        self._token_text: dict[int, str] = {}  # one token's text (at most the vocabulary)
        source = draft or self.manifest.get("speculative", {}).get("draft")
        if not speculative:
            source = None
        spin: SpinMode = "always" if spin_wait else "never"
        if source and spin_wait:
            from enginesmith.runtime.proposers import uses_model_draft

            # Two ONNX Runtime sessions take turns on the same cores: each one's workers stop
            # spinning when its run returns, or they would slow the other's run down.
            if uses_model_draft(source):
                spin = "in_run"
        # ONNX Runtime on CPU or CUDA, or TensorRT: one Executor interface.
        self.executor: Executor = open_executor(
            self.engine_dir, self.manifest, threads=threads, spin=spin
        )
        self.executor.warmup()
        self.max_seq_len: int = self.manifest["max_seq_len"]
        budget = max_num_tokens or self.manifest.get("max_num_tokens", DEFAULT_MAX_NUM_TOKENS)
        if kv_budget_tokens is not None and kv_budget_tokens < self.max_seq_len:
            raise InvalidRequestError(
                f"kv_budget_tokens ({kv_budget_tokens}) must hold at least one full sequence "
                f"({self.max_seq_len} tokens): raise it"
            )
        speculator = None
        if source:
            from enginesmith.runtime.proposers import make_speculator

            speculator = make_speculator(
                source,
                self.engine_dir,
                self.manifest,
                max_draft_len,
                threads,
                verify_files,
                target=self.executor,
                spin=spin,
            )
        self.core = EngineCore(
            self.executor,
            self._decode,
            frozenset(self.manifest.get("eos_token_ids", [])),
            max_num_tokens=budget,
            kv_budget_tokens=kv_budget_tokens,
            max_waiting=max_waiting,
            speculator=speculator,
        )
        self._lock = threading.Lock()  # one driver of the core at a time
        self._loop_thread: _EngineLoop | None = None

    @property
    def spec_stats(self) -> SpecStats | None:
        """Speculation counters summed over every request so far (None: not speculating)."""
        return None if self.core.speculator is None else self.core.speculator.totals

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.core.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: frozenset[int]) -> None:
        self.core.eos_token_ids = frozenset(ids)

    # -- synchronous API --------------------------------------------------------------------

    def generate(
        self,
        prompts: str | Sequence[str],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate a completion for each prompt; all prompts share in-flight batches."""
        requests = self._make_requests(prompts, params)
        for _ in self._drive(requests):
            pass
        return [r.output() for r in requests]

    def stream(self, prompt: str, params: SamplingParams | None = None) -> TextStream:
        """Stream the completion of PROMPT: iterate for text deltas as soon as each is stable;
        `.output` holds the full RequestOutput (text, ids, stats) once iteration ends."""
        (request,) = self._make_requests(prompt, params)
        return TextStream(self, request)

    def chat(
        self, messages: list[dict[str, str]], params: SamplingParams | None = None
    ) -> RequestOutput:
        """Answer a conversation ([{"role": ..., "content": ...}]) using the model's chat template."""
        return self.generate(self.chat_prompt(messages), params)[0]

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                "this model has no chat template: use generate() with a plain prompt"
            )
        return str(
            self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )

    # -- asynchronous API -------------------------------------------------------------------

    async def submit(self, prompt: str, params: SamplingParams | None = None) -> RequestOutput:
        """Run one request alongside every other submitted one; cancel the awaiting task to
        abort it (its KV slot is freed)."""
        request = self._make_requests(prompt, params)[0]
        async for _ in self._events(request):
            pass
        return request.output()

    async def stream_async(
        self, prompt: str, params: SamplingParams | None = None
    ) -> AsyncIterator[str]:
        """Async text deltas of one request; closing or cancelling the iterator aborts it."""
        request = self._make_requests(prompt, params)[0]
        async for event in self._events(request):
            if event.delta:
                yield event.delta

    def new_request(
        self,
        prompt: str,
        params: SamplingParams | None = None,
        prompt_ids: list[int] | None = None,
    ) -> LiveRequest:
        """A request for `events`: the prompt is tokenized (unless PROMPT_IDS, from `encode`,
        are given) and checked here (InvalidRequestError at once); nothing runs until `events`
        iterates."""
        if prompt_ids is None:
            return self._make_requests(prompt, params)[0]
        return self.core.new_request(prompt, list(prompt_ids), params or SamplingParams())

    def events(self, request: LiveRequest) -> AsyncIterator[StepEvent]:
        """Async StepEvents of REQUEST (text delta, token ids, logprobs, finished) from the
        engine loop; after the last one, `request.output()` is the whole RequestOutput. Closing
        or cancelling the iterator aborts the request (its KV slot is freed before the next
        step). A full waiting queue raises QueueFullError from the first `__anext__`."""
        return self._events(request)

    def encode(self, prompt: str) -> list[int]:
        """PROMPT's token ids, checked against the engine's limits (InvalidRequestError)."""
        return self._encode(prompt)

    def start_loop(self) -> None:
        """Start the background engine loop now rather than at the first async request (a
        server does, so that its health check watches the loop from the start)."""
        self._engine_loop()

    @property
    def loop_heartbeat_age_s(self) -> float | None:
        """Seconds since the engine loop last finished a step or woke idle (it wakes every
        IDLE_WAKE_S); None when no loop runs. A large age means a step is hung."""
        loop = self._loop_thread
        if loop is None or not loop.is_alive():
            return None
        return time.monotonic() - loop.heartbeat

    async def _events(self, request: LiveRequest) -> AsyncIterator[StepEvent]:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[StepEvent | BaseException] = asyncio.Queue()

        def deliver(item: StepEvent | BaseException) -> None:
            loop.call_soon_threadsafe(inbox.put_nowait, item)

        engine = self._engine_loop()
        engine.add(request, deliver)
        finished = False
        try:
            while not finished:
                item = await inbox.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                engine.abort(request.request_id)

    def _engine_loop(self) -> _EngineLoop:
        if self._loop_thread is None or not self._loop_thread.is_alive():
            self._loop_thread = _EngineLoop(self)
            self._loop_thread.start()
        return self._loop_thread

    def close(self) -> None:
        """Stop the background engine loop (if the async API started one)."""
        if self._loop_thread is not None:
            self._loop_thread.stop()
            self._loop_thread = None

    # -- internals --------------------------------------------------------------------------

    def _make_requests(
        self, prompts: str | Sequence[str], params: SamplingParams | Sequence[SamplingParams] | None
    ) -> list[LiveRequest]:
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        if params is None or isinstance(params, SamplingParams):
            param_list = [params or SamplingParams()] * len(prompt_list)
        else:
            param_list = list(params)
            if len(param_list) != len(prompt_list):
                raise InvalidRequestError(
                    f"got {len(prompt_list)} prompts but {len(param_list)} SamplingParams: pass one "
                    "SamplingParams, or one per prompt"
                )
        requests = []
        for prompt, p in zip(prompt_list, param_list, strict=True):
            if not isinstance(prompt, str):
                raise InvalidRequestError(f"prompts must be strings (got {type(prompt).__name__})")
            requests.append(self.core.new_request(prompt, self._encode(prompt), p))
        return requests

    def _encode(self, prompt: str) -> list[int]:
        ids: list[int] = self.tokenizer(prompt).input_ids
        if not ids:
            raise InvalidRequestError("the prompt is empty: pass at least one token of text")
        if len(ids) >= self.max_seq_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but this engine's max sequence length is "
                f"{self.max_seq_len}: shorten the prompt or rebuild with a larger --max-seq-len"
            )
        return ids

    def _decode(self, ids: list[int]) -> str:
        if len(ids) == 1:  # the detokenizer's window before the newest token, most steps
            text = self._token_text.get(ids[0])
            if text is None:
                text = self._token_text[ids[0]] = self._decode_ids(ids)
            return text
        return self._decode_ids(ids)

    def _decode_ids(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            return str(self._backend_decode(ids, skip_special_tokens=True))
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _drive(self, requests: list[LiveRequest]) -> Iterator[StepEvent]:
        """Run REQUESTS to completion in the caller's thread, yielding their events."""
        if self._loop_thread is not None and self._loop_thread.is_alive():
            yield from self._drive_through_loop(requests)
            return
        mine = {r.request_id for r in requests}
        with self._lock:
            for r in requests:
                self.core.add(r)
            try:
                while any(r.finish_reason is None for r in requests):
                    for event in self.core.step():
                        if event.request.request_id in mine:
                            yield event
            finally:
                for r in requests:
                    if r.finish_reason is None:
                        self.core.abort(r.request_id)

    def _drive_through_loop(self, requests: list[LiveRequest]) -> Iterator[StepEvent]:
        inbox: queue.Queue[StepEvent | BaseException] = queue.Queue()
        engine = self._engine_loop()
        for r in requests:
            engine.add(r, inbox.put)
        remaining = len(requests)
        while remaining:
            item = inbox.get()
            if isinstance(item, BaseException):
                raise item
            remaining -= item.finished
            yield item


class _EngineLoop(threading.Thread):
    """Background thread that steps the engine while any submitted request is unfinished."""

    def __init__(self, llm: LLM) -> None:
        super().__init__(name="enginesmith-engine-loop", daemon=True)
        self.llm = llm
        self.commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.sinks: dict[str, Any] = {}
        self._stopping = False
        self.heartbeat = time.monotonic()  # last step finished or idle wake (monotonic s)

    def add(self, request: LiveRequest, sink: Any) -> None:
        self.commands.put(("add", (request, sink)))

    def abort(self, request_id: str) -> None:
        self.commands.put(("abort", request_id))

    def stop(self) -> None:
        self._stopping = True
        self.commands.put(("stop", None))
        self.join(timeout=10)

    def run(self) -> None:
        core = self.llm.core
        while not self._stopping:
            self.heartbeat = time.monotonic()
            self._drain(block=not core.has_unfinished)
            if self._stopping or not core.has_unfinished:
                continue
            with self.llm._lock:
                try:
                    events = core.step()
                except Exception as exc:  # fail every waiting caller rather than hang them
                    for sink in self.sinks.values():
                        sink(exc)
                    self.sinks.clear()
                    for rid in list(core.live):
                        core.abort(rid)
                    continue
            for event in events:
                sink = self.sinks.get(event.request.request_id)
                if sink is not None:
                    sink(event)
                    if event.finished:
                        del self.sinks[event.request.request_id]

    def _drain(self, block: bool) -> None:
        while True:
            try:
                kind, arg = self.commands.get(block=block, timeout=IDLE_WAKE_S)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                request, sink = arg
                try:
                    self.llm.core.add(request)
                except Exception as exc:
                    sink(exc)
                    continue
                self.sinks[request.request_id] = sink
            elif kind == "abort":
                self.llm.core.abort(arg)
                self.sinks.pop(arg, None)
            elif kind == "stop":
                return
