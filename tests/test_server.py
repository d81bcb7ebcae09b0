"""`enginesmith serve` answers the official openai client (tiny engine, loopback only): the
text it serves is the text LLM.generate makes, streaming or not, with stops, seeds, n and
logprobs."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from enginesmith import LLM, SamplingParams
from enginesmith.runtime.server import create_app
from tests.server_harness import ThreadedServer

MODEL = "tiny"
PROMPT = "def fibonacci(n):"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def served(tiny_engine) -> Iterator[tuple[ThreadedServer, LLM]]:  # type: ignore[no-untyped-def]
    engine = tiny_engine("tiny-llama", max_batch=2, max_seq_len=1024)
    llm = LLM(engine, spin_wait=False)
    server = ThreadedServer(create_app(llm, model_name=MODEL))
    yield server, llm
    server.stop()
    llm.close()


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=f"{served[0].url}/v1", api_key="unused", max_retries=0)


def reference(llm: LLM, prompt: str, **params: Any) -> str:
    return llm.generate(prompt, SamplingParams(ignore_eos=True, **params))[0].text


def test_completion_matches_generate(served, client) -> None:  # type: ignore[no-untyped-def]
    _, llm = served
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, **GREEDY)
    assert out.object == "text_completion" and out.model == MODEL
    assert out.choices[0].text == reference(llm, PROMPT, max_tokens=12)
    assert out.choices[0].finish_reason == "length"
    prompt_tokens = len(llm.encode(PROMPT))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, 12)
    assert out.usage.total_tokens == prompt_tokens + 12


def test_chat_matches_generate_with_the_chat_template(served, client) -> None:  # type: ignore[no-untyped-def]
    _, llm = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=10, **GREEDY
    )
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    expected = reference(llm, llm.chat_prompt(messages), max_tokens=10)
    assert out.choices[0].message.content == expected
    assert out.usage.completion_tokens == 10


def test_streaming_with_usage_matches_non_streaming(served, client) -> None:  # type: ignore[no-untyped-def]
    _, llm = served
    whole = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=16, **GREEDY
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_streaming_without_usage(served, client) -> None:  # type: ignore[no-untyped-def]
    _, llm = served
    chunks = list(
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=9, stream=True, **GREEDY)
    )
    assert "".join(c.choices[0].text for c in chunks) == reference(llm, PROMPT, max_tokens=9)
    assert all(c.usage is None for c in chunks)


def test_stop_sequence_ends_the_text_before_it(served, client) -> None:  # type: ignore[no-untyped-def]
    _, llm = served
    full = reference(llm, PROMPT, max_tokens=30)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), "the reference text has no usable middle"
    for stream in (False, True):
        kw = {"model": MODEL, "prompt": PROMPT, "max_tokens": 30, "stop": [stop], **GREEDY}
        if stream:
            chunks = list(client.completions.create(stream=True, **kw))
            text = "".join(c.choices[0].text for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            out = client.completions.create(**kw)
            text, finish = out.choices[0].text, out.choices[0].finish_reason
        assert text == full[: full.index(stop)]
        assert finish == "stop"


def test_same_seed_same_text_and_n_choices(client) -> None:  # type: ignore[no-untyped-def]
    kw = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 12,
        "temperature": 1.0,
        "extra_body": {"ignore_eos": True},
    }
    first = client.completions.create(seed=7, **kw).choices[0].text
    assert client.completions.create(seed=7, **kw).choices[0].text == first
    assert client.completions.create(seed=8, **kw).choices[0].text != first
    two = client.completions.create(seed=7, n=2, **kw)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == first  # choice i uses seed + i
    assert two.choices[1].text == client.completions.create(seed=8, **kw).choices[0].text
    assert two.usage.completion_tokens == 24
    assert two.usage.prompt_tokens == client.completions.create(seed=7, **kw).usage.prompt_tokens


def test_n_2_streaming_chat(client) -> None:  # type: ignore[no-untyped-def]
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Count"}],
            max_tokens=8,
            n=2,
            seed=3,
            temperature=1.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}
    assert chunks[-1].usage.completion_tokens == 16


def test_chat_logprobs(served, client) -> None:  # type: ignore[no-untyped-def]
    _, llm = served
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
        **GREEDY,
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert entry.logprob <= 0
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen is the likeliest
        assert entry.logprob == pytest.approx(tops[0])
    assert "".join(e.token for e in content) == out.choices[0].message.content


def test_completion_logprobs_streaming_and_not(client) -> None:  # type: ignore[no-untyped-def]
    kw = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "logprobs": 2, **GREEDY}
    out = client.completions.create(**kw)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(t) == 2 for t in lp.top_logprobs)
    streamed = [
        c.choices[0].logprobs.token_logprobs
        for c in client.completions.create(stream=True, **kw)
        if c.choices[0].logprobs
    ]
    assert [x for xs in streamed for x in xs] == pytest.approx(lp.token_logprobs)


def test_models_tokenize_detokenize(served, client) -> None:  # type: ignore[no-untyped-def]
    server, llm = served
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPT}).json()
    assert tokens["tokens"] == llm.encode(PROMPT) and tokens["count"] == len(tokens["tokens"])
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text["prompt"].strip() == PROMPT
    chat = httpx.post(
        f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "x"}]}
    )
    assert chat.status_code == 200 and chat.json()["count"] > 1


def test_health_metrics_and_request_ids(served, client) -> None:  # type: ignore[no-untyped-def]
    server, _ = served
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, **GREEDY)
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.status_code == 200
    for name in (
        "enginesmith:num_requests_running",
        "enginesmith:num_requests_waiting",
        "enginesmith:kv_slots_used",
        "enginesmith:prompt_tokens_total",
        "enginesmith:generation_tokens_total",
        "enginesmith:time_to_first_token_seconds_bucket",
        "enginesmith:inter_token_latency_seconds_bucket",
        "enginesmith:e2e_request_latency_seconds_bucket",
    ):
        assert name in metrics.text, name
    for response in (health, metrics, httpx.get(f"{server.url}/nowhere")):
        assert len(response.headers["x-request-id"]) >= 16
    echoed = httpx.get(f"{server.url}/health", headers={"x-request-id": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"


def test_serve_help_explains_every_flag(capsys) -> None:  # type: ignore[no-untyped-def]
    from enginesmith.runtime.cli import build_parser, main
    from tests.cli_help import assert_help_explains_every_flag

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    serve_parser = sub.choices["serve"]
    assert_help_explains_every_flag(
        lambda argv: main(["serve", *argv]),
        serve_parser,
        (
            "--host",
            "--port",
            "--api-key",
            "--max-queue",
            "--served-model-name",
            "--shutdown-timeout",
            "--replicas",
        ),
        capsys,
    )


def test_a_speculating_engine_reports_its_acceptance_rate(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(tiny_engine("tiny-llama", max_batch=2, max_seq_len=1024), draft="ngram")
    server = ThreadedServer(create_app(llm, model_name=MODEL))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, **GREEDY)
        assert out.choices[0].text == reference(llm, PROMPT, max_tokens=32)  # lossless
        lines = httpx.get(f"{server.url}/metrics").text.splitlines()
        rate = next(x for x in lines if x.startswith("enginesmith:spec_decode_acceptance_rate{"))
        stats = llm.spec_stats
        assert stats is not None and stats.draft_tokens > 0
        assert float(rate.rsplit(" ", 1)[1]) == pytest.approx(stats.acceptance_rate)
    finally:
        server.stop()
        llm.close()
