"""Bad requests and faults against `enginesmith serve` (tiny engine, loopback only): client
errors are 4xx with OpenAI-style error objects, never 5xx; a client that goes away frees its
KV slot; a full queue is a 429; SIGTERM drains in-flight requests and exits 0."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from enginesmith import LLM
from enginesmith.runtime.server import create_app
from tests.server_harness import ThreadedServer, start_subprocess, wait_healthy

MODEL = "tiny"
PROMPT = "def fibonacci(n):"
KEY = "sk-test-key"
# Enough tokens that a request is still running when the test acts on it (about a second).
LONG = 900


@pytest.fixture(scope="module")
def engine(tiny_engine):  # type: ignore[no-untyped-def]
    return tiny_engine("tiny-llama", max_batch=2, max_seq_len=1024)


@pytest.fixture(scope="module")
def served(engine) -> Iterator[tuple[ThreadedServer, LLM]]:  # type: ignore[no-untyped-def]
    llm = LLM(engine, spin_wait=False, max_waiting=1)
    server = ThreadedServer(create_app(llm, model_name=MODEL, max_body_bytes=4096))
    yield server, llm
    server.stop()
    llm.close()


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **fields}


def long_completion(**fields: Any) -> dict[str, Any]:
    return completion(**{"max_tokens": LONG, "ignore_eos": True, "temperature": 0, **fields})


def slots_used(llm: LLM) -> int:
    kv = llm.core.scheduler.kv
    return kv.num_slots - kv.free_slots


def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def assert_error(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], (word, error["message"])
    assert response.headers["x-request-id"]
    return dict(error)


@pytest.mark.parametrize(
    ("route", "body", "status", "words"),
    [
        ("/v1/completions", b"{not json", 400, ["not a valid JSON"]),
        ("/v1/completions", b"[1, 2]", 400, []),
        ("/v1/completions", completion(model="gpt-4"), 404, ["gpt-4", MODEL]),
        ("/v1/completions", completion(prompt="a " * 1100), 400, ["max sequence length"]),
        ("/v1/completions", completion(max_tokens=5000), 400, ["max_tokens", "1024"]),
        ("/v1/completions", completion(temperature=-1), 400, ["temperature"]),
        ("/v1/completions", completion(top_p=0), 400, ["top_p"]),
        ("/v1/completions", completion(n=0), 400, ["n"]),
        ("/v1/completions", completion(logprobs=99), 400, ["logprobs"]),
        ("/v1/completions", completion(stop=["a", "b", "c", "d", "e"]), 400, ["stop"]),
        ("/v1/completions", completion(best_of=3), 400, ["best_of"]),
        ("/v1/completions", completion(frequency_penalty=0.5), 400, ["frequency_penalty"]),
        ("/v1/completions", completion(tools=[], foo=1), 400, ["unsupported", "tools", "foo"]),
        ("/v1/completions", completion(prompt=""), 400, ["empty"]),
        ("/v1/completions", {"model": MODEL}, 400, ["prompt"]),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"},
            400,
            ["tool_choice"],
        ),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, ["messages"]),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
            400,
            ["role"],
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            400,
            ["logprobs"],
        ),
        ("/v1/completions", b"x" * 5000, 413, ["4096"]),
        ("/detokenize", {"tokens": [10**9]}, 400, ["vocabulary"]),
    ],
)
def test_bad_requests_get_4xx_error_objects(served, route, body, status, words) -> None:  # type: ignore[no-untyped-def]
    server, llm = served
    if isinstance(body, bytes):
        headers = {"content-type": "application/json"}
        response = httpx.post(f"{server.url}{route}", content=body, headers=headers)
    else:
        response = httpx.post(f"{server.url}{route}", json=body)
    assert_error(response, status, *words)
    assert slots_used(llm) == 0


def test_oversized_chunked_body_is_413(served) -> None:  # type: ignore[no-untyped-def]
    server, _ = served

    def chunks() -> Iterator[bytes]:  # no content-length: the limit is checked as bytes arrive
        for _ in range(10):
            yield b" " * 1000

    response = httpx.post(f"{server.url}/v1/completions", content=chunks())
    assert_error(response, 413)


def test_unknown_route_and_method_are_4xx(served) -> None:  # type: ignore[no-untyped-def]
    server, _ = served
    assert_error(httpx.get(f"{server.url}/v1/nothing"), 404)
    assert_error(httpx.get(f"{server.url}/v1/completions"), 405)


def test_api_key_guards_every_route_but_health(engine) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(engine, spin_wait=False)
    server = ThreadedServer(create_app(llm, model_name=MODEL, api_key=KEY))
    try:
        for method, route in [
            ("GET", "/v1/models"),
            ("GET", "/metrics"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"),
            ("POST", "/tokenize"),
            ("POST", "/detokenize"),
        ]:
            for headers in ({}, {"authorization": "Bearer wrong"}):
                response = httpx.request(method, f"{server.url}{route}", headers=headers, json={})
                assert_error(response, 401, "API key")
        assert httpx.get(f"{server.url}/health").status_code == 200
        auth = {"authorization": f"Bearer {KEY}"}
        ok = httpx.post(f"{server.url}/v1/completions", json=completion(), headers=auth)
        assert ok.status_code == 200
    finally:
        server.stop()
        llm.close()


def test_full_queue_is_429_with_retry_after(served) -> None:  # type: ignore[no-untyped-def]
    server, llm = served  # 2 slots, 1 waiting place

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

            async def one() -> httpx.Response:
                return await client.post("/v1/completions", json=long_completion())

            return list(await asyncio.gather(*(one() for _ in range(8))))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429}, statuses
    for r in responses:
        if r.status_code == 429:
            assert_error(r, 429, "waiting")
            assert int(r.headers["retry-after"]) >= 1
    wait_for(lambda: slots_used(llm) == 0, 5, "the slots to return")


def test_disconnect_aborts_a_non_streaming_request(served) -> None:  # type: ignore[no-untyped-def]
    server, llm = served

    async def leave_early() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            task = asyncio.create_task(client.post("/v1/completions", json=long_completion()))
            while slots_used(llm) == 0:
                await asyncio.sleep(0.002)
            task.cancel()  # httpx closes the connection
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(leave_early())
    wait_for(lambda: slots_used(llm) == 0, 1.0, "the disconnected request's slot")
    assert not llm.core.live


def test_disconnect_aborts_a_streaming_request(served) -> None:  # type: ignore[no-untyped-def]
    server, llm = served
    with (
        httpx.Client(base_url=server.url, timeout=60) as client,
        client.stream("POST", "/v1/completions", json=long_completion(stream=True)) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert slots_used(llm) == 1
    # leaving the block closed the connection mid-stream
    wait_for(lambda: slots_used(llm) == 0, 1.0, "the disconnected stream's slot")
    metrics = httpx.get(f"{server.url}/metrics").text
    cancelled = [
        line
        for line in metrics.splitlines()
        if 'finished_reason="cancelled"' in line and "{" in line
    ]
    assert cancelled and float(cancelled[0].split()[-1]) >= 1


def test_health_is_503_when_the_loop_stalls(engine) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(engine, spin_wait=False)
    app = create_app(llm, model_name=MODEL, health_timeout_s=0.3)
    server = ThreadedServer(app)
    release = threading.Event()
    try:
        real_step = llm.core.step

        def hung_step() -> Any:
            release.wait(10)
            return real_step()

        llm.core.step = hung_step  # type: ignore[method-assign]
        thread = threading.Thread(
            target=httpx.post,
            args=(f"{server.url}/v1/completions",),
            kwargs={"json": completion(), "timeout": 30},
        )
        thread.start()
        time.sleep(1.0)
        stalled = httpx.get(f"{server.url}/health")
        assert stalled.status_code == 503 and "not stepped" in stalled.json()["status"]
        release.set()
        thread.join(10)
        wait_for(lambda: httpx.get(f"{server.url}/health").status_code == 200, 5, "health")
    finally:
        release.set()
        server.stop()
        llm.close()


def test_health_is_503_while_loading(engine) -> None:  # type: ignore[no-untyped-def]
    loaded = threading.Event()

    def slow_load() -> LLM:
        loaded.wait(10)
        return LLM(engine, spin_wait=False)

    app = create_app(slow_load, model_name=MODEL)

    class NotReady(Exception):
        pass

    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: _status(f"{url}/health") == 503, 10, "the server to start")
        assert httpx.get(f"{url}/health").json() == {"status": "loading"}
        assert_error(httpx.post(f"{url}/v1/completions", json=completion()), 503, "loading")
        loaded.set()
        wait_healthy(url, 60)
        assert httpx.post(f"{url}/v1/completions", json=completion()).status_code == 200
    finally:
        loaded.set()
        server.should_exit = True
        thread.join(15)
        sock.close()


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def test_sigterm_finishes_in_flight_requests_and_exits_0(engine) -> None:  # type: ignore[no-untyped-def]
    proc, url = start_subprocess(
        engine, "--served-model-name", MODEL, "--shutdown-timeout", "60", "--max-queue", "8"
    )
    try:
        wait_healthy(url, 120, proc)
        started = threading.Event()
        results: dict[int, Any] = {}

        def call(i: int) -> None:
            body = long_completion(stream=i == 0, stream_options={"include_usage": True})
            if i != 0:
                del body["stream_options"]
                results[i] = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
                return
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                started.set()
                results[i] = lines

        # 2 slots: two requests run and four wait when SIGTERM comes; all six must finish.
        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        # Every request must have reached the engine before SIGTERM: one still connecting
        # then is refused (503 while draining), which is not what this test is about.
        wait_for(
            lambda: _used_slots(url) == 2 and _gauge(url, "num_requests_waiting") == 4,
            30,
            "both slots in use and four requests waiting",
        )
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        for i in range(1, 6):
            assert results[i]["usage"]["completion_tokens"] == LONG, results[i]
        stream = results[0]
        assert stream[-1] == "data: [DONE]"
        assert f'"completion_tokens": {LONG}' in stream[-2]
        assert proc.wait(30) == 0
        assert _status(f"{url}/health") == 0  # no longer listening
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _gauge(url: str, name: str) -> int:
    try:
        text = httpx.get(f"{url}/metrics", timeout=2).text
    except httpx.HTTPError:
        return 0
    for line in text.splitlines():
        if line.startswith(f"enginesmith:{name}{{"):
            return int(float(line.split()[-1]))
    return 0


def _used_slots(url: str) -> int:
    return _gauge(url, "kv_slots_used")


def test_draining_answers_503(served) -> None:  # type: ignore[no-untyped-def]
    server, _ = served
    state = server.server.config.app.state.server
    state.draining = True
    try:
        assert httpx.get(f"{server.url}/health").json() == {"status": "draining"}
        assert_error(httpx.post(f"{server.url}/v1/completions", json=completion()), 503)
    finally:
        state.draining = False
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_mini_soak_loses_nothing(engine) -> None:  # type: ignore[no-untyped-def]
    """60 requests from 8 clients: good ones (streaming or not), ones that disconnect and bad
    ones; every good one completes, every bad one is a 4xx, and all slots return."""
    llm = LLM(engine, spin_wait=False)
    server = ThreadedServer(create_app(llm, model_name=MODEL))
    rng = random.Random(0)
    plan = [(rng.choice(["good", "good", "leave", "bad"]), rng.random() < 0.5) for _ in range(60)]
    statuses: dict[str, list[int]] = {"good": [], "bad": []}

    async def one(client: httpx.AsyncClient, kind: str, stream: bool) -> None:
        if kind == "bad":
            body = rng.choice([completion(temperature=-1), completion(foo=1), {"model": MODEL}])
            statuses["bad"].append((await client.post("/v1/completions", json=body)).status_code)
            return
        tokens = 200 if kind == "leave" else 16
        body = long_completion(max_tokens=tokens, stream=stream)
        if kind == "leave":
            task = asyncio.create_task(client.post("/v1/completions", json=body))
            await asyncio.sleep(rng.uniform(0, 0.05))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return
        response = await client.post("/v1/completions", json=body)
        ok = response.status_code == 200 and (
            stream or response.json()["usage"]["completion_tokens"] == tokens
        )
        statuses["good"].append(200 if ok else response.status_code)

    async def run() -> None:
        queue = list(plan)
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

            async def worker() -> None:
                while queue:
                    await one(client, *queue.pop())

            await asyncio.gather(*(worker() for _ in range(8)))

    try:
        asyncio.run(run())
        assert statuses["good"] and set(statuses["good"]) == {200}
        assert statuses["bad"] and all(400 <= s < 500 for s in statuses["bad"])
        wait_for(lambda: slots_used(llm) == 0 and not llm.core.live, 2.0, "every slot back")
    finally:
        server.stop()
        llm.close()
