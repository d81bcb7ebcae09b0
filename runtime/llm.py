"""The Python runtime API: `LLM(engine_dir).generate / stream / chat`."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from enginesmith.compiler.artifact import read_manifest
from enginesmith.compiler.errors import BackendUnavailableError, InvalidRequestError
from enginesmith.runtime.sampling import (
    IncrementalDetokenizer,
    Sampler,
    SamplingParams,
    StopChecker,
)
from enginesmith.runtime.session import EngineSession

# Prompt tokens per prefill call: bounds the attention scratch memory of one step.
PREFILL_CHUNK = 512


@dataclass
class RequestStats:
    """Timing of one request (seconds); decode rates exclude the first token."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.generated_tokens - 1
        return steps / self.decode_s if self.decode_s and steps > 0 else 0.0


@dataclass
class RequestOutput:
    """The result of one request."""

    prompt: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop string or stop token) | "length"
    stats: RequestStats


@dataclass
class _Request:
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    detokenizer: IncrementalDetokenizer
    stopper: StopChecker
    slot: int = -1
    num_cached: int = 0  # tokens of prompt_ids + output_ids already in the slot's KV cache
    output_ids: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    stats: RequestStats = field(default_factory=RequestStats)
    started: float = 0.0

    @property
    def in_prefill(self) -> bool:
        return self.num_cached < len(self.prompt_ids)


class TextStream:
    """Iterator of text deltas for one request; `.output` is set when it is exhausted."""

    def __init__(self, llm: LLM, request: _Request) -> None:
        self._llm, self._request = llm, request
        self.output: RequestOutput | None = None

    def __iter__(self) -> Iterator[str]:
        for _, delta in self._llm._run([self._request]):
            if delta:
                yield delta
        self.output = self._llm._output(self._request)


class LLM:
    """Load an engine directory and generate text with it.

    >>> llm = LLM("engines/smollm2")                         # doctest: +SKIP
    >>> llm.generate("The capital of France is", SamplingParams(max_tokens=8))[0].text
    """

    def __init__(
        self, engine_dir: str | Path, *, verify_files: bool = True, threads: int | None = None
    ) -> None:
        self.engine_dir = Path(engine_dir).expanduser()
        self.manifest = read_manifest(self.engine_dir, verify_hashes=verify_files)
        if self.manifest.get("backend") != "onnxruntime":
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
        self.session = EngineSession(self.engine_dir, self.manifest, threads=threads)
        self.session.warmup()
        self.max_seq_len: int = self.manifest["max_seq_len"]
        self.eos_token_ids = frozenset(self.manifest.get("eos_token_ids", []))

    # -- public API -------------------------------------------------------------------------

    def generate(
        self,
        prompts: str | Sequence[str],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate a completion for each prompt (batched over the engine's slots)."""
        requests = self._make_requests(prompts, params)
        for _ in self._run(requests):
            pass
        return [self._output(r) for r in requests]

    def stream(self, prompt: str, params: SamplingParams | None = None) -> TextStream:
        """Stream the completion of PROMPT: iterate for text deltas as soon as each is stable;
        `.output` holds the full RequestOutput (text, ids, stats) once iteration ends."""
        (request,) = self._make_requests(prompt, params)
        return TextStream(self, request)

    def chat(
        self, messages: list[dict[str, str]], params: SamplingParams | None = None
    ) -> RequestOutput:
        """Answer a conversation ([{"role": ..., "content": ...}]) using the model's chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                "this model has no chat template: use generate() with a plain prompt"
            )
        prompt = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return self.generate(str(prompt), params)[0]

    # -- requests ---------------------------------------------------------------------------

    def _make_requests(
        self, prompts: str | Sequence[str], params: SamplingParams | Sequence[SamplingParams] | None
    ) -> list[_Request]:
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
            ids = self._encode(prompt)
            decode = self._decode
            requests.append(
                _Request(
                    prompt,
                    ids,
                    p,
                    Sampler(p),
                    IncrementalDetokenizer(decode, ids),
                    StopChecker(p.stop),
                )
            )
        return requests

    def _encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt).input_ids
        if not ids:
            raise InvalidRequestError("the prompt is empty: pass at least one token of text")
        if len(ids) >= self.max_seq_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but this engine's max sequence length is "
                f"{self.max_seq_len}: shorten the prompt or rebuild with a larger --max-seq-len"
            )
        return ids

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _output(self, r: _Request) -> RequestOutput:
        return RequestOutput(
            r.prompt,
            r.prompt_ids,
            "".join(r.text_parts),
            r.output_ids,
            r.finish_reason or "length",
            r.stats,
        )

    # -- the step loop ------------------------------------------------------------------------

    def _run(self, requests: list[_Request]) -> Iterator[tuple[_Request, str]]:
        """Admit requests into free slots, then alternate prefill and batched decode steps.

        Yields (request, text delta) for every sampled token. A slot is freed as soon as its
        request finishes and the next waiting request takes it.
        """
        waiting = deque(requests)
        free_slots = list(range(self.session.max_batch))
        running: dict[int, _Request] = {}
        while waiting or running:
            while waiting and free_slots:
                r = waiting.popleft()
                r.slot = free_slots.pop(0)
                r.started = time.perf_counter()
                running[r.slot] = r
            prefilling = [r for r in running.values() if r.in_prefill]
            batch = [prefilling[0]] if prefilling else list(running.values())
            logits = self._prefill(batch[0]) if prefilling else self._decode_step(batch)
            for r, row in zip(batch, logits, strict=True):
                if row is None:
                    continue  # prefill chunk that does not end the prompt
                delta = self._accept_token(r, row)
                yield r, delta
                if r.finish_reason:
                    del running[r.slot]
                    free_slots.append(r.slot)
                    free_slots.sort()

    def _prefill(self, r: _Request) -> list[np.ndarray | None]:
        start = time.perf_counter()
        chunk = r.prompt_ids[r.num_cached : r.num_cached + PREFILL_CHUNK]
        n = len(chunk)
        logits = self.session.step(
            r.slot,
            np.array([chunk], np.int64),
            np.arange(r.num_cached, r.num_cached + n, dtype=np.int64)[None],
            np.array([r.num_cached + n - 1], np.int32),
            np.array([n], np.int32),
            np.array([n - 1], np.int64),
        )
        r.num_cached += n
        r.stats.prefill_s += time.perf_counter() - start
        return [logits[0] if not r.in_prefill else None]

    def _decode_step(self, batch: list[_Request]) -> list[np.ndarray | None]:
        """One token for every running request, over the contiguous slot range they span."""
        start = time.perf_counter()
        lo = min(r.slot for r in batch)
        hi = max(r.slot for r in batch) + 1
        rows = hi - lo
        input_ids = np.zeros((rows, 1), np.int64)
        position_ids = np.zeros((rows, 1), np.int64)
        seqlens_k = np.zeros(rows, np.int32)  # idle rows: T = 1, Q = 0 (cache untouched)
        query_seqlens = np.zeros(rows, np.int32)
        for r in batch:
            i = r.slot - lo
            input_ids[i, 0] = r.output_ids[-1]
            position_ids[i, 0] = r.num_cached
            seqlens_k[i] = r.num_cached
            query_seqlens[i] = 1
        logits = self.session.step(
            lo,
            input_ids,
            position_ids,
            seqlens_k,
            query_seqlens,
            np.array([r.slot - lo for r in batch]),
        )
        elapsed = time.perf_counter() - start
        for r in batch:
            r.num_cached += 1
            r.stats.decode_s += elapsed
        return list(logits)

    def _accept_token(self, r: _Request, logits: np.ndarray) -> str:
        """Sample the next token of R, update its text and decide whether it is finished."""
        token = r.sampler.sample(logits)
        r.output_ids.append(token)
        now = time.perf_counter()
        if len(r.output_ids) == 1:
            r.stats.time_to_first_token_s = now - r.started
        r.stats.prompt_tokens = len(r.prompt_ids)
        r.stats.generated_tokens = len(r.output_ids)
        r.stats.total_s = now - r.started
        p = r.params
        is_eos = token in self.eos_token_ids and not p.ignore_eos
        if is_eos or token in p.stop_token_ids:
            r.finish_reason = "stop"
            delta = r.stopper.flush()
        else:
            delta, stopped = r.stopper.feed(r.detokenizer.add(token))
            if stopped:
                r.finish_reason = "stop"
            elif len(r.output_ids) >= p.max_tokens or r.num_cached + 1 >= self.max_seq_len:
                r.finish_reason = "length"
                delta += r.stopper.feed(r.detokenizer.flush())[0] + r.stopper.flush()
        r.text_parts.append(delta)
        return delta
