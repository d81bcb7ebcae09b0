"""Load and soak of `enginesmith serve` (scripts/bench-serve), all traffic on loopback.

Load: NVIDIA's aiperf (a third-party load generator for OpenAI servers, installed by
scripts/bench-serve into its own environment, not a dependency of enginesmith) drives streaming
chat completions at each --concurrency level against one server process: fixed-length synthetic
prompts and outputs (ignore_eos), token counts from the server's usage. Reported per level:
request and output-token throughput, time to first token and inter-token latency percentiles.

Soak: --soak-requests requests from --soak-concurrency clients (httpx), a seeded mix of good
requests (completions and chat, streaming or not), clients that disconnect mid-request and
bad requests (malformed JSON, unknown fields, invalid values, wrong model, over-long prompts).
Checked: every good request completes with all its tokens, every bad one is a 4xx, nothing is
a 5xx, the server's RSS stays flat (sampled through the run) and every KV slot returns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from enginesmith.compiler.presets import cache_dir
from enginesmith.scripts.benchmarks.bench import (
    command_line,
    format_table,
    machine_info,
    save_results,
)

AIPERF_PYTHON = Path(__file__).resolve().parents[2] / ".venv" / "aiperf" / "bin" / "python"
MODEL = "smollm2-135m"
PROMPT_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "compiler"]


def log(msg: str) -> None:
    print(f"[bench-serve] {msg}", file=sys.stderr, flush=True)


# -- the server ---------------------------------------------------------------------------------


def wait_healthy(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll URL/health until it answers 200; RuntimeError if PROC exits first, TimeoutError
    after TIMEOUT_S (the tests' server harness uses it too)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was healthy")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s} s")


class Server:
    """`enginesmith serve ENGINE_DIR` in a subprocess on a free loopback port."""

    def __init__(self, engine_dir: Path, max_queue: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ)
        cmd = [sys.executable, "-m", "enginesmith.runtime.cli", "serve", str(engine_dir)]
        cmd += ["--port", str(port), "--served-model-name", MODEL, "--log-level", "warning"]
        cmd += ["--max-queue", str(max_queue)]
        self.command = " ".join(["enginesmith", *cmd[3:]])
        self.proc = subprocess.Popen(cmd, env=env)
        try:
            wait_healthy(self.url, 300, self.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise SystemExit(str(exc)) from exc

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def gauges(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith("enginesmith:") and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def server_mean_ms(before: dict[str, float], after: dict[str, float], histogram: str) -> float:
    """Mean of HISTOGRAM's observations between two scrapes, in ms."""
    name = f"enginesmith:{histogram}"
    count = gauge(after, f"{name}_count") - gauge(before, f"{name}_count")
    total = gauge(after, f"{name}_sum") - gauge(before, f"{name}_sum")
    return 1000 * total / count if count else float("nan")


def gauge(gauges: dict[str, float], prefix: str, label: str = "") -> float:
    return sum(v for k, v in gauges.items() if k.startswith(prefix) and label in k)


# -- load with aiperf ---------------------------------------------------------------------------


def run_aiperf(
    server: Server, tokenizer: Path, concurrency: int, requests: int, args: argparse.Namespace
) -> dict[str, Any]:
    out_dir = Path(tempfile.mkdtemp(prefix=f"aiperf-c{concurrency}-"))
    cmd = [
        str(AIPERF_PYTHON),
        "-m",
        "aiperf",
        "profile",
        "--model",
        MODEL,
        "--url",
        server.url,
        "--endpoint-type",
        "chat",
        "--streaming",
        "--tokenizer",
        str(tokenizer),
        "--concurrency",
        str(concurrency),
        "--request-count",
        str(requests),
        "--warmup-request-count",
        str(min(concurrency, 4)),
        "--prompt-input-tokens-mean",
        str(args.input_tokens),
        "--prompt-input-tokens-stddev",
        "0",
        "--prompt-output-tokens-mean",
        str(args.output_tokens),
        "--prompt-output-tokens-stddev",
        "0",
        "--extra-inputs",
        "ignore_eos:true",
        "--use-server-token-count",
        "--random-seed",
        "0",
        "--ui-type",
        "none",
        "--no-server-metrics",
        "--no-gpu-telemetry",
        "--output-artifact-dir",
        str(out_dir),
    ]
    log(f"aiperf at concurrency {concurrency}: {requests} requests")
    before, load_before = server.gauges(), os.getloadavg()[0]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.level_timeout)
    after, load_after = server.gauges(), os.getloadavg()[0]
    summary_path = out_dir / "profile_export_aiperf.json"
    if done.returncode != 0 or not summary_path.is_file():
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"aiperf failed at concurrency {concurrency} (exit {done.returncode})")
    summary = json.loads(summary_path.read_text())
    shutil.rmtree(out_dir, ignore_errors=True)

    def stat(name: str, key: str) -> float | None:
        value = summary.get(name, {}).get(key)
        return None if value is None else float(value)

    return {
        "concurrency": concurrency,
        "requests": requests,
        "completed": stat("completed_request_count", "avg") or stat("request_count", "avg"),
        "errors": (summary.get("error_summary") or []),
        "request_per_s": stat("request_throughput", "avg"),
        "output_tokens_per_s": stat("output_token_throughput", "avg"),
        "ttft_ms": {p: stat("time_to_first_token", p) for p in ("p50", "p90", "p99")},
        "itl_ms": {p: stat("inter_token_latency", p) for p in ("p50", "p90", "p99")},
        "latency_ms": {p: stat("request_latency", p) for p in ("p50", "p99")},
        # The server's own view (its histograms' means over this level, warmup included): what
        # the engine did, without the client's and the network's share.
        "server_mean_ttft_ms": server_mean_ms(before, after, "time_to_first_token_seconds"),
        "server_mean_itl_ms": server_mean_ms(before, after, "inter_token_latency_seconds"),
        # 1-minute load average of the machine before and after the level (2 cores here).
        "load_average": [load_before, load_after],
        "aiperf_command": " ".join(cmd[2:]),
    }


# -- soak ---------------------------------------------------------------------------------------

BAD_BODIES: list[tuple[str, Any]] = [
    ("malformed JSON", b'{"model": "smollm2-135m", "prompt": '),
    ("unknown field", {"model": MODEL, "prompt": "hi", "best_of_n": 3}),
    ("negative temperature", {"model": MODEL, "prompt": "hi", "temperature": -1}),
    ("wrong model", {"model": "gpt-9", "prompt": "hi"}),
    ("n = 0", {"model": MODEL, "prompt": "hi", "n": 0}),
    ("prompt over the limit", {"model": MODEL, "prompt": "word " * 4000}),
    ("max_tokens over the limit", {"model": MODEL, "prompt": "hi", "max_tokens": 100000}),
    ("empty messages", {"model": MODEL, "messages": []}),
]


def good_body(rng: random.Random, max_tokens: int) -> tuple[str, dict[str, Any]]:
    words = " ".join(rng.choice(PROMPT_WORDS) for _ in range(rng.randint(4, 40)))
    body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "ignore_eos": True}
    if rng.random() < 0.5:
        body["temperature"], body["seed"] = 0.8, rng.randint(0, 1000)
    else:
        body["temperature"] = 0
    if rng.random() < 0.5:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": words}]}
    return "/v1/completions", {**body, "prompt": words}


async def soak(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    plan = []
    for i in range(args.soak_requests):
        r = rng.random()
        kind = (
            "bad"
            if r < args.bad_share
            else "leave"
            if r < args.bad_share + args.leave_share
            else "good"
        )
        plan.append((i, kind, rng.random() < 0.5, random.Random(rng.random())))
    counts = {"good": 0, "good_ok": 0, "leave": 0, "bad": 0, "bad_4xx": 0, "5xx": 0}
    failures: list[str] = []
    rss: list[tuple[int, float]] = [(0, server.rss_mib())]
    queue: asyncio.Queue[tuple[int, str, bool, random.Random]] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    finished = 0

    async def good(client: httpx.AsyncClient, r: random.Random, stream: bool) -> None:
        max_tokens = r.randint(4, args.soak_max_tokens)
        route, body = good_body(r, max_tokens)
        if stream:
            body["stream"], body["stream_options"] = True, {"include_usage": True}
            async with client.stream("POST", route, json=body) as resp:
                lines = [line async for line in resp.aiter_lines() if line.startswith("data: ")]
            if resp.status_code >= 500:
                counts["5xx"] += 1
            ok = resp.status_code == 200 and lines[-1] == "data: [DONE]"
            usage = json.loads(lines[-2][6:]).get("usage") if ok and len(lines) > 1 else None
            ok = ok and usage is not None and usage["completion_tokens"] == max_tokens
        else:
            resp = await client.post(route, json=body)
            if resp.status_code >= 500:
                counts["5xx"] += 1
            ok = resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == max_tokens
        counts["good_ok"] += ok
        if not ok:
            failures.append(f"good {route} stream={stream}: {resp.status_code}")

    async def leave(client: httpx.AsyncClient, r: random.Random, stream: bool) -> None:
        _, body = good_body(r, args.soak_max_tokens * 4)
        route = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        body["stream"] = stream

        async def call() -> None:
            if stream:
                async with client.stream("POST", route, json=body) as resp:
                    async for _ in resp.aiter_lines():
                        pass
            else:
                await client.post(route, json=body)

        task = asyncio.create_task(call())
        await asyncio.sleep(r.uniform(0.0, args.leave_after_s))
        task.cancel()  # closes the connection: the server must abort and free the slot
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def bad(client: httpx.AsyncClient, r: random.Random) -> None:
        what, body = r.choice(BAD_BODIES)
        route = (
            "/v1/chat/completions"
            if isinstance(body, dict) and "messages" in body
            else "/v1/completions"
        )
        if isinstance(body, bytes):
            resp = await client.post(
                route, content=body, headers={"content-type": "application/json"}
            )
        else:
            resp = await client.post(route, json=body)
        if resp.status_code >= 500:
            counts["5xx"] += 1
        is_4xx = 400 <= resp.status_code < 500 and "error" in resp.json()
        counts["bad_4xx"] += is_4xx
        if not is_4xx:
            failures.append(f"bad ({what}): {resp.status_code}")

    async def worker() -> None:
        nonlocal finished
        async with httpx.AsyncClient(base_url=server.url, timeout=args.request_timeout) as client:
            while not queue.empty():
                i, kind, stream, r = queue.get_nowait()
                counts[kind] += 1
                try:
                    if kind == "good":
                        await good(client, r, stream)
                    elif kind == "leave":
                        await leave(client, r, stream)
                    else:
                        await bad(client, r)
                except httpx.HTTPError as exc:
                    failures.append(f"{kind} #{i}: {type(exc).__name__}: {exc}")
                finished += 1
                if finished % 100 == 0:
                    rss.append((finished, server.rss_mib()))
                    log(f"soak: {finished}/{args.soak_requests} requests, RSS {rss[-1][1]:.0f} MiB")

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.soak_concurrency)))
    elapsed = time.perf_counter() - start
    await asyncio.sleep(1.0)  # the last aborts land before the next step
    gauges = server.gauges()
    rss.append((finished, server.rss_mib()))
    return {
        "requests": args.soak_requests,
        "concurrency": args.soak_concurrency,
        "seconds": elapsed,
        "counts": counts,
        "failures": failures[:20],
        "num_failures": len(failures),
        "rss_mib": rss,
        "after": {
            "kv_slots_used": gauge(gauges, "enginesmith:kv_slots_used"),
            "requests_running": gauge(gauges, "enginesmith:num_requests_running"),
            "requests_waiting": gauge(gauges, "enginesmith:num_requests_waiting"),
            "cancelled": gauge(
                gauges, "enginesmith:request_success_total{", 'finished_reason="cancelled"'
            ),
        },
    }


def warm_rss(server: Server, requests: int) -> None:
    """Serve a few requests of each kind first, so that the RSS baseline includes the
    allocator's steady working set rather than a cold process."""
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for i in range(requests):
            body = {"model": MODEL, "prompt": f"warm up {i}", "max_tokens": 8, "ignore_eos": True}
            client.post("/v1/completions", json={**body, "stream": i % 2 == 0})


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench-serve", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--engine",
        type=Path,
        default=cache_dir() / "engines" / "smollm2-135m",
        help="engine directory (default: the demo engine in the cache; built when missing)",
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], metavar="C")
    p.add_argument(
        "--requests",
        type=int,
        default=None,
        metavar="N",
        help="requests per concurrency level (default: max(16, 2 x C))",
    )
    p.add_argument("--input-tokens", type=int, default=128, help="prompt tokens (default: 128)")
    p.add_argument("--output-tokens", type=int, default=64, help="output tokens (default: 64)")
    p.add_argument("--level-timeout", type=float, default=600, help="seconds per aiperf run")
    p.add_argument("--soak-requests", type=int, default=500, metavar="N")
    p.add_argument("--soak-concurrency", type=int, default=16, metavar="C")
    p.add_argument("--soak-max-tokens", type=int, default=24, help="largest good soak answer")
    p.add_argument("--bad-share", type=float, default=0.2, help="share of bad soak requests")
    p.add_argument("--leave-share", type=float, default=0.2, help="share that disconnect")
    p.add_argument("--leave-after-s", type=float, default=1.5, help="latest disconnect time")
    p.add_argument("--request-timeout", type=float, default=300)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-load", action="store_true", help="run the soak only")
    p.add_argument("--skip-soak", action="store_true", help="run the load levels only")
    p.add_argument("--json", type=Path, default=None, help="write results here")
    return p.parse_args(argv)


def render(result: dict[str, Any]) -> str:
    lines = []
    if result.get("load"):
        rows = []
        for r in result["load"]:

            def f(x: float | None, digits: int = 1) -> str:
                return "-" if x is None else f"{x:.{digits}f}"

            rows.append(
                [
                    str(r["concurrency"]),
                    f"{int(r['completed'] or 0)}/{r['requests']}",
                    f(r["request_per_s"], 2),
                    f(r["output_tokens_per_s"]),
                    f(r["ttft_ms"]["p50"], 0),
                    f(r["ttft_ms"]["p99"], 0),
                    f(r["itl_ms"]["p50"]),
                    f(r["itl_ms"]["p99"]),
                    f(r["latency_ms"]["p50"], 0),
                    f(r["server_mean_itl_ms"]),
                    f(sum(r["load_average"]) / 2),
                ]
            )
        headers = [
            "clients",
            "done",
            "req/s",
            "out tok/s",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "ITL p50 ms",
            "ITL p99 ms",
            "latency p50 ms",
            "server ITL mean ms",
            "load avg",
        ]
        lines += ["load (aiperf, streaming chat)", format_table(headers, rows), ""]
    if result.get("soak"):
        s = result["soak"]
        c = s["counts"]
        rss = [v for _, v in s["rss_mib"]]
        lines += [
            f"soak: {s['requests']} requests from {s['concurrency']} clients in {s['seconds']:.0f} s",
            format_table(
                ["check", "result"],
                [
                    ["good requests complete", f"{c['good_ok']}/{c['good']}"],
                    ["bad requests -> 4xx", f"{c['bad_4xx']}/{c['bad']}"],
                    ["disconnecting clients", str(c["leave"])],
                    ["cancelled by the server", f"{s['after']['cancelled']:.0f}"],
                    ["5xx answers", str(c["5xx"])],
                    ["KV slots in use after", f"{s['after']['kv_slots_used']:.0f}"],
                    [
                        "requests running / waiting after",
                        f"{s['after']['requests_running']:.0f} / {s['after']['requests_waiting']:.0f}",
                    ],
                    [
                        "server RSS MiB (start, max, end)",
                        f"{rss[0]:.0f}, {max(rss):.0f}, {rss[-1]:.0f}",
                    ],
                ],
            ),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engine = args.engine.expanduser()
    if not (engine / "manifest.json").is_file():
        log(f"building the demo engine into {engine}")
        subprocess.run(
            [str(Path(sys.executable).parent / "build-engine"), "smollm2-135m", "-o", str(engine)],
            check=True,
        )
    manifest = json.loads((engine / "manifest.json").read_text())
    tokenizer = engine / manifest["files_by_role"]["tokenizer"]
    server = Server(engine, args.max_queue)
    result: dict[str, Any] = {
        "command": command_line(),
        "server_command": server.command,
        "engine": {"max_batch": manifest["max_batch"], "max_seq_len": manifest["max_seq_len"]},
        "machine": machine_info(),
        "load": [],
    }
    try:
        if not args.skip_load:
            for c in args.concurrency:
                n = args.requests or max(16, 2 * c)
                result["load"].append(run_aiperf(server, tokenizer, c, n, args))
        if not args.skip_soak:
            warm_rss(server, 20)
            result["soak"] = asyncio.run(soak(server, args))
    finally:
        result["server_exit_code"] = server.stop()
    path = save_results(result, args.json, "serve-load")
    print(render(result))
    print(f"\n[bench-serve] results: {path}")
    s = result.get("soak")
    ok = result["server_exit_code"] == 0
    if s:
        c = s["counts"]
        ok = ok and c["good_ok"] == c["good"] and c["bad_4xx"] == c["bad"] and c["5xx"] == 0
        ok = ok and s["after"]["kv_slots_used"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
