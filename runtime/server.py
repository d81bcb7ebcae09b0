"""`enginesmith serve`: an OpenAI-compatible HTTP server over one LLM (FastAPI + uvicorn).

Routes are thin: they validate a request (runtime/protocol.py), turn it into SamplingParams
and await the LLM's async API; the LLM's engine loop thread stays the only driver of the
engine, so every request shares its in-flight batches. A client that goes away aborts its
requests (their KV slots are freed before the next step): streaming responses are cancelled
by Starlette when the client disconnects, non-streaming ones poll for the disconnect while
they wait. Client errors are 4xx with OpenAI-style error objects; a 5xx means a server bug.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from enginesmith.runtime.engine_core import LiveRequest, RequestOutput, StepEvent
from enginesmith.runtime.errors import InvalidRequestError
from enginesmith.runtime.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    _SamplingFields,
    error_body,
    model_card,
    new_id,
    now,
    usage,
)
from enginesmith.runtime.sampling import SamplingParams, TokenLogprob
from enginesmith.runtime.scheduler import QueueFullError
from enginesmith.runtime.server_metrics import ServerMetrics

# Largest request body accepted (413 above): far more than any prompt the engines hold.
DEFAULT_MAX_BODY_BYTES = 1 << 20
# /health answers 503 when the engine loop has neither finished a step nor woken idle for this
# long: a hung step (a prefill chunk takes well under a second on the demo engine).
DEFAULT_HEALTH_TIMEOUT_S = 30.0
# How often a waiting non-streaming request checks whether its client went away.
DISCONNECT_POLL_S = 0.05
# Retry-After (seconds) sent with a 429 when the waiting queue is full.
RETRY_AFTER_S = 1
# Status logged for requests whose client went away (nginx's "client closed request").
CLIENT_CLOSED = 499

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The HTTP client went away while its request was generating."""


class APIError(Exception):
    """A client error, answered as an OpenAI error object with STATUS."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type_,
            code,
            param,
        )
        self.headers = headers or {}


@dataclass
class ServerState:
    """What the routes share: the LLM (None while it loads), its metrics and the drain flag."""

    model_name: str
    api_key: str | None
    max_body_bytes: int
    health_timeout_s: float
    replica_id: str | None = None
    llm: Any = None
    metrics: ServerMetrics | None = None
    draining: bool = False
    load_error: BaseException | None = None
    created: int = field(default_factory=now)


def create_app(
    llm: Any,
    *,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    health_timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S,
    replica_id: str | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over LLM, an enginesmith LLM or a zero-argument callable that
    loads one (called in a thread at startup; /health answers 503 until it returns).
    REPLICA_ID, when given, is sent as `x-replica-id` on every response (Ray Serve)."""
    state = ServerState(model_name, api_key, max_body_bytes, health_timeout_s, replica_id)

    def install(loaded: Any) -> None:
        loaded.start_loop()
        state.metrics = ServerMetrics(loaded, model_name)
        state.llm = loaded

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader: threading.Thread | None = None
        if callable(llm) and not hasattr(llm, "core"):

            def load() -> None:
                try:
                    install(llm())
                except BaseException as exc:  # reported by /health
                    state.load_error = exc

            loader = threading.Thread(target=load, name="enginesmith-load", daemon=True)
            loader.start()
        else:
            install(llm)
        yield
        state.draining = True
        if loader is not None:
            loader.join()
        if state.llm is not None:
            state.llm.close()

    app = FastAPI(title="enginesmith", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if state.load_error is not None:
            return _status(503, f"the engine failed to load: {state.load_error}")
        if state.llm is None:
            return _status(503, "loading")
        if state.draining:
            return _status(503, "draining")
        age = state.llm.loop_heartbeat_age_s
        if age is None:
            return _status(503, "the engine loop is not running")
        if age > state.health_timeout_s:
            return _status(503, f"the engine loop has not stepped for {age:.1f} s")
        return _status(200, "ok")

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.metrics is None:
            return _status(503, "loading")
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        llm_ = _ready(state)
        return {"object": "list", "data": [model_card(model_name, state.created, llm_.max_seq_len)]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        llm_ = _ready(state)
        _check_model(state, body.model)
        if body.messages is not None:
            text = _chat_prompt(llm_, body.messages)
            ids = llm_.tokenizer(text, add_special_tokens=False).input_ids
        else:
            ids = llm_.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens).input_ids
        return {"tokens": list(ids), "count": len(ids), "max_model_len": llm_.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        llm_ = _ready(state)
        _check_model(state, body.model)
        vocab = len(llm_.tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids {bad[:8]} are outside the vocabulary [0, {vocab})")
        return {"prompt": llm_.tokenizer.decode(body.tokens)}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        llm_ = _ready(state)
        _check_model(state, body.model)
        jobs = _prepare(llm_, body, body.prompts, body.max_tokens, body.logprobs)
        return await _respond(state, request, body, jobs, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        llm_ = _ready(state)
        _check_model(state, body.model)
        prompt = _chat_prompt(llm_, body.messages)
        jobs = _prepare(llm_, body, [prompt], body.token_limit, body.num_logprobs)
        return await _respond(state, request, body, jobs, chat=True)

    return _Guard(app, state)  # type: ignore[return-value]


# -- requests -> engine requests ----------------------------------------------------------------


@dataclass
class _Job:
    """One choice: its engine request and where it goes in the response."""

    index: int  # choice index: prompt_index * n + i
    prompt_index: int
    request: LiveRequest


def _prepare(
    llm: Any,
    body: _SamplingFields,
    prompts: list[str],
    max_tokens: int | None,
    num_logprobs: int | None,
) -> list[_Job]:
    """Tokenize and check every prompt, then make n engine requests per prompt (seeds seed,
    seed + 1, ... when a seed is given, so the n choices differ but repeat run to run)."""
    jobs = []
    for p_index, prompt in enumerate(prompts):
        prompt_ids = llm.encode(prompt)  # raises InvalidRequestError (400) when too long
        prompt_len = len(prompt_ids)
        room = llm.max_seq_len - prompt_len
        if max_tokens is not None and max_tokens > room:
            raise APIError(
                400,
                f"this model's maximum context length is {llm.max_seq_len} tokens; the prompt "
                f"has {prompt_len} and max_tokens asks for {max_tokens} more: ask for at most "
                f"{room}",
                param="max_tokens",
            )
        for i in range(body.n):
            params = SamplingParams(
                max_tokens=max_tokens or room,
                temperature=body.temperature,
                top_k=body.top_k,
                top_p=body.top_p,
                seed=None if body.seed is None else body.seed + i,
                stop=tuple(body.stop_list),
                ignore_eos=body.ignore_eos,
                logprobs=num_logprobs,
            )
            request = llm.new_request(prompt, params, prompt_ids)
            jobs.append(_Job(p_index * body.n + i, p_index, request))
    return jobs


async def _respond(
    state: ServerState, request: Request, body: _SamplingFields, jobs: list[_Job], chat: bool
) -> Response:
    kind = "chat.completion" if chat else "text_completion"
    response_id = new_id("chatcmpl" if chat else "cmpl")
    created = now()
    events = _merge(state, jobs)
    if body.stream:
        # The first event is awaited before the response starts, so that a full queue is
        # still a 429 rather than an error inside a 200 stream.
        try:
            first = await _unless_disconnected(request, anext(events))
        except BaseException:
            await events.aclose()
            raise
        sse = _sse(state, body, jobs, events, first, response_id, created, chat)
        return StreamingResponse(sse, media_type="text/event-stream")
    try:
        outputs = await _unless_disconnected(request, _collect(events, len(jobs)))
    finally:
        await events.aclose()
    choices = []
    for job in jobs:
        out = outputs[job.index]
        choice: dict[str, Any] = {"index": job.index, "finish_reason": out.finish_reason}
        lp = _format_logprobs(state, out.logprobs, chat) if out.logprobs is not None else None
        if chat:
            choice["message"] = {"role": "assistant", "content": out.text}
        else:
            choice["text"] = out.text
        choice["logprobs"] = lp
        choices.append(choice)
    return JSONResponse(
        {
            "id": response_id,
            "object": kind,
            "created": created,
            "model": state.model_name,
            "choices": choices,
            "usage": _usage(jobs, outputs),
        }
    )


async def _merge(
    state: ServerState, jobs: list[_Job]
) -> AsyncGenerator[tuple[_Job, StepEvent], None]:
    """The events of all JOBS as they come; closing it aborts the unfinished requests."""
    llm = state.llm
    inbox: asyncio.Queue[tuple[_Job, StepEvent] | BaseException | None] = asyncio.Queue()

    async def pump(job: _Job) -> None:
        finished = False
        try:
            async for event in llm.events(job.request):
                finished = event.finished
                await inbox.put((job, event))
            await inbox.put(None)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                await inbox.put(exc)
            raise
        finally:
            if state.metrics is not None:
                out = job.request.output()
                if not finished:
                    out.finish_reason = "cancelled"
                state.metrics.observe_request(out)

    tasks = [asyncio.ensure_future(pump(job)) for job in jobs]
    try:
        remaining = len(jobs)
        while remaining:
            item = await inbox.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _collect(
    events: AsyncGenerator[tuple[_Job, StepEvent], None], count: int
) -> dict[int, RequestOutput]:
    outputs: dict[int, RequestOutput] = {}
    async for job, event in events:
        if event.finished:
            outputs[job.index] = event.request.output()
    if len(outputs) != count:
        raise RuntimeError("a request ended without a final event [developer error]")
    return outputs


async def _unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await AWAITABLE, cancelling it (which aborts its engine requests) if the client goes
    away meanwhile."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def _sse(
    state: ServerState,
    body: _SamplingFields,
    jobs: list[_Job],
    events: AsyncGenerator[tuple[_Job, StepEvent], None],
    first: tuple[_Job, StepEvent],
    response_id: str,
    created: int,
    chat: bool,
) -> AsyncIterator[str]:
    """Server-sent events of a streaming response; ends with `data: [DONE]`."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    outputs: dict[int, RequestOutput] = {}

    def chunk(choices: list[dict[str, Any]], usage_: dict[str, int] | None = None) -> str:
        payload = {
            "id": response_id,
            "object": kind,
            "created": created,
            "model": state.model_name,
            "choices": choices,
        }
        if body.include_usage:
            payload["usage"] = usage_
        return f"data: {json.dumps(payload)}\n\n"

    def choice_of(job: _Job, event: StepEvent) -> dict[str, Any]:
        finish = event.request.finish_reason if event.finished else None
        lp = None
        if event.request.params.logprobs is not None:
            lp = _format_logprobs(state, event.logprobs, chat)
        if chat:
            return {
                "index": job.index,
                "delta": {"content": event.delta},
                "logprobs": lp,
                "finish_reason": finish,
            }
        return {"index": job.index, "text": event.delta, "logprobs": lp, "finish_reason": finish}

    try:
        if chat:  # the role comes first, in a chunk of its own (as OpenAI sends it)
            yield chunk(
                [
                    {
                        "index": job.index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for job in jobs
                ]
            )
        pending: AsyncIterator[tuple[_Job, StepEvent]] = _prepend(first, events)
        async for job, event in pending:
            if event.finished:
                outputs[job.index] = event.request.output()
            if event.delta or event.finished or event.logprobs:
                yield chunk([choice_of(job, event)])
        if body.include_usage:
            yield chunk([], _usage(jobs, outputs))
        yield "data: [DONE]\n\n"
    except QueueFullError as exc:  # a later choice of n found the queue full mid-stream
        yield f"data: {json.dumps(error_body(str(exc), 'rate_limit_error', 429))}\n\n"
    except InvalidRequestError as exc:
        yield f"data: {json.dumps(error_body(str(exc), 'invalid_request_error', 400))}\n\n"
    finally:
        await events.aclose()


async def _prepend(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    yield first
    async for item in rest:
        yield item


def _usage(jobs: list[_Job], outputs: dict[int, RequestOutput]) -> dict[str, int]:
    """Prompt tokens once per prompt (the n choices of one prompt share it), completion tokens
    of every choice."""
    prompt_tokens = {
        job.prompt_index: len(outputs[job.index].prompt_token_ids)
        for job in jobs
        if job.index in outputs
    }
    completion = sum(len(outputs[j.index].token_ids) for j in jobs if j.index in outputs)
    return usage(sum(prompt_tokens.values()), completion)


def _format_logprobs(state: ServerState, logprobs: list[TokenLogprob], chat: bool) -> dict:
    text = _token_text(state)
    if chat:
        return {
            "content": [
                {
                    "token": text(lp.token_id),
                    "logprob": lp.logprob,
                    "bytes": list(text(lp.token_id).encode()),
                    "top_logprobs": [
                        {"token": text(t), "logprob": v, "bytes": list(text(t).encode())}
                        for t, v in lp.top
                    ],
                }
                for lp in logprobs
            ]
        }
    return {
        "tokens": [text(lp.token_id) for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{text(t): v for t, v in lp.top} for lp in logprobs],
    }


def _token_text(state: ServerState) -> Callable[[int], str]:
    llm = state.llm
    cached = getattr(llm, "_server_token_text", None)
    if cached is None:
        cached = functools.lru_cache(maxsize=65536)(lambda i: llm.tokenizer.decode([i]))
        llm._server_token_text = cached
    return cached  # type: ignore[no-any-return]


def _chat_prompt(llm: Any, messages: list[Any]) -> str:
    turns = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages
    ]
    return str(llm.chat_prompt(turns))


def _ready(state: ServerState) -> Any:
    if state.llm is None:
        raise APIError(503, "the engine is still loading: retry shortly", "service_unavailable")
    if state.draining:
        raise APIError(503, "the server is shutting down", "service_unavailable")
    return state.llm


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(
            404,
            f"the model `{model}` does not exist: this server serves `{state.model_name}`",
            code="model_not_found",
            param="model",
        )


def _status(code: int, status: str) -> JSONResponse:
    return JSONResponse({"status": status}, status_code=code)


# -- errors ----------------------------------------------------------------------------------


def _error(status: int, message: str, type_: str, code: Any = None, param: Any = None, **kw: Any):
    return JSONResponse(error_body(message, type_, code, param), status_code=status, **kw)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming what is wrong: unsupported fields first, then malformed JSON, then the
    first invalid value."""
    errors = list(exc.errors())
    extra = [
        ".".join(str(p) for p in e["loc"][1:]) for e in errors if e["type"] == "extra_forbidden"
    ]
    if extra:
        return f"unsupported field(s): {', '.join(extra)}: remove them", extra[0]
    for e in errors:
        if e["type"] in ("json_invalid", "model_attributes_type") or e["loc"] == ("body",):
            return f"the body is not a valid JSON object: {e.get('msg', '')}", None
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"][1:]) or None
    msg = str(first["msg"]).removeprefix("Value error, ")
    return (f"{where}: {msg}" if where else msg), where


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error(400, message, "invalid_request_error", param=param)

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.type, exc.code, exc.param, headers=exc.headers)

    @app.exception_handler(QueueFullError)
    async def on_queue_full(_: Request, exc: QueueFullError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        return _error(429, str(exc), "rate_limit_error", 429, headers=headers)

    @app.exception_handler(InvalidRequestError)
    async def on_invalid(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return _error(400, str(exc), "invalid_request_error")

    @app.exception_handler(ClientDisconnected)
    async def on_disconnect(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "invalid_request_error", exc.status_code)

    @app.exception_handler(Exception)
    async def on_bug(_: Request, exc: Exception) -> JSONResponse:
        message = f"internal server error [developer error]: {type(exc).__name__}: {exc}"
        return _error(500, message, "server_error")


class _Guard:
    """Outermost ASGI layer: x-request-id on every response, the API key, the body limit and
    the HTTP metrics, before FastAPI sees the request."""

    def __init__(self, app: FastAPI, state: ServerState) -> None:
        self.app, self.server_state = app, state
        self.router = app.router  # for callers that look for routes (Ray Serve's ingress)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        status_seen = [0]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_seen[0] = message["status"]
                extra = []
                if self.server_state.replica_id is None:
                    extra.append((b"x-request-id", request_id.encode("latin-1")))
                else:  # Ray Serve's proxy sets x-request-id itself
                    extra.append((b"x-replica-id", self.server_state.replica_id.encode("latin-1")))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        path = scope.get("path", "")
        try:
            refusal = self._refuse(path, headers)
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
                return
            body, receive_rest = await self._read_body(receive)
            if body is None:
                limit = self.server_state.max_body_bytes
                too_big = _error(413, f"the body is over {limit} bytes", "invalid_request_error")
                await too_big(scope, receive, send_with_id)
                return
            await self.app(scope, receive_rest, send_with_id)
        finally:
            if self.server_state.metrics is not None:
                self.server_state.metrics.observe_http(_route_label(path), status_seen[0] or 499)

    def _refuse(self, path: str, headers: dict[str, str]) -> ASGIApp | None:
        key = self.server_state.api_key
        authorized = headers.get("authorization", "") == f"Bearer {key}"
        if key is not None and path != "/health" and not authorized:
            return _error(
                401,
                "missing or wrong API key: send it as `Authorization: Bearer <key>`",
                "authentication_error",
                "invalid_api_key",
            )
        declared = headers.get("content-length")
        if (
            declared is not None
            and declared.isdigit()
            and int(declared) > self.server_state.max_body_bytes
        ):
            return _error(
                413,
                f"the body is over {self.server_state.max_body_bytes} bytes",
                "invalid_request_error",
            )
        return None

    async def _read_body(self, receive: Receive) -> tuple[bytes | None, Receive]:
        """Read the whole body (None when over the limit); the returned receive replays it,
        then passes the connection's later messages (the disconnect) through."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                replay = [message]
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.server_state.max_body_bytes:
                return None, receive
            if not message.get("more_body", False):
                replay = []
                break
        first: list[Message] = [{"type": "http.request", "body": b"".join(chunks)}, *replay]

        async def receive_rest() -> Message:
            if first:
                return first.pop(0)
            return await receive()

        return b"", receive_rest


def _route_label(path: str) -> str:
    known = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
    if path in known or path in ("/tokenize", "/detokenize"):
        return path
    return "other"


def serve_forever(
    app: Any, host: str, port: int, shutdown_timeout_s: int, log_level: str = "info"
) -> int:
    """Run APP under uvicorn until SIGINT/SIGTERM; then stop accepting, let in-flight
    requests finish for up to SHUTDOWN_TIMEOUT_S, and return 0."""
    import signal

    import uvicorn

    state: ServerState = app.state.server

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            state.draining = True  # /health and new requests answer 503 from now on
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        timeout_graceful_shutdown=shutdown_timeout_s,
        log_level=log_level,
        access_log=False,
    )
    # uvicorn re-raises the signal it drained on once it is done, under the handler that was
    # there before: a no-op one, so that a graceful drain ends with exit status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    _Server(config).run()
    return 0
