"""`enginesmith serve --replicas 2`: two engine replicas behind one OpenAI endpoint on a local
Ray Serve (tiny engine, loopback only)."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.server_harness import start_subprocess, wait_healthy

pytest.importorskip("ray.serve")

MODEL = "tiny"


def test_two_local_replicas_serve_one_endpoint(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    engine = tiny_engine("tiny-llama", max_batch=2, max_seq_len=256)
    proc, url = start_subprocess(engine, "--replicas", "2", "--served-model-name", MODEL)
    try:
        wait_healthy(url, 180, proc)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        out = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert out.usage.completion_tokens == 8
        chunks = list(
            client.completions.create(
                model=MODEL,
                prompt="def f(x):",
                max_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )
        assert chunks[-1].usage.completion_tokens == 6

        def one(i: int) -> str:
            body = {"model": MODEL, "prompt": f"x = {i}", "max_tokens": 200, "ignore_eos": True}
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
            assert response.headers["x-request-id"]
            return response.headers["x-replica-id"]

        # 8 clients against 2 x 4 requests in flight per replica (max_ongoing_requests):
        # Ray's router must use both replicas.
        replicas: set[str] = set()
        with ThreadPoolExecutor(8) as pool:
            for _ in range(5):
                replicas |= set(pool.map(one, range(16)))
                if len(replicas) == 2:
                    break
        assert len(replicas) == 2, replicas
        bad = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "n": 0})
        assert bad.status_code == 400 and "error" in bad.json()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
