"""Where the slow decode calls of a batch-1 decode lose their time: for every engine decode call,
its wall time and, from Linux's per-thread scheduler statistics, how long each of the process's
threads ran and how long it waited on a run queue during the call, plus the process's page
faults. A call far over the median whose compute threads neither ran nor waited to run for
most of it was stalled from outside the guest's scheduler (the vCPU taken away by the host);
one whose threads waited on a run queue lost its time to another task in the guest; one with
page faults, to memory the kernel had to back.

    .venv/bin/python scripts/decode_call_stalls.py [ENGINE_DIR] [--decodes 4] [--tokens 256]
        [--prompt-tokens 512]

Runs LLM.generate as the bench does (the same real-text prompt, greedy, ignore_eos), but with
one decode step per kernel call (greedy_run=1, as the runtime ran before greedy runs), prints
each decode's median call, its mean, and every call over twice the median with the per-thread
figures, and writes JSON into the cache's bench/ folder. Linux only (/proc/self/task).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from enginesmith.compiler.presets import cache_dir
from enginesmith.runtime.bench import ours_decode, real_text_prompt, run_record, save_results
from enginesmith.runtime.llm import LLM

SLOW = 2.0  # a call over this many times the median is listed


class ThreadClock:
    """Per-thread run time and run-queue wait (ns, /proc/self/task/*/schedstat) and the
    process's minor + major page faults, read without allocating files per call."""

    def __init__(self) -> None:
        tasks = Path("/proc/self/task")
        self.names = {t.name: (t / "comm").read_text().strip() for t in tasks.iterdir()}
        self.fds = {t: os.open(tasks / t / "schedstat", os.O_RDONLY) for t in self.names}
        self.stat = os.open("/proc/self/stat", os.O_RDONLY)

    def read(self) -> tuple[dict[str, tuple[int, int]], int]:
        threads = {}
        for tid, fd in self.fds.items():
            run, wait, _ = os.pread(fd, 128, 0).split()
            threads[tid] = (int(run), int(wait))
        fields = os.pread(self.stat, 1024, 0).decode().rsplit(")", 1)[1].split()
        return threads, int(fields[7]) + int(fields[9])  # minflt + majflt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "engine",
        type=Path,
        nargs="?",
        default=cache_dir() / "engines" / "smollm2-135m-bench",
        help="engine directory (default: the bench's SmolLM2 engine)",
    )
    p.add_argument("--decodes", type=int, default=4, help="decodes measured (after one warm-up)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per decode")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length in tokens")
    p.add_argument(
        "--free-mb",
        type=int,
        default=0,
        help="before each decode, write and free an array of this many MB, as the bench's\n"
        "bandwidth pass (1024 MB) does just before its decodes (default 0: none)",
    )
    args = p.parse_args()
    if args.decodes < 1 or args.tokens < 3 or args.prompt_tokens < 1 or args.free_mb < 0:
        p.error("--decodes must be >= 1, --tokens >= 3, --prompt-tokens >= 1, --free-mb >= 0")
    if not (args.engine / "manifest.json").is_file():
        p.error(f"{args.engine} is not an engine directory: build one, or run scripts/bench once")

    llm = LLM(args.engine, decode_kernels=True, greedy_run=1)  # a call per token, timed
    decoder = llm.session.decoder
    if decoder is None:
        raise SystemExit(f"no decode kernels for this engine: {llm.session.decoder_unavailable}")
    tok = llm.tokenizer
    prompt, _ = real_text_prompt(
        lambda s: tok(s).input_ids, lambda ids: str(tok.decode(ids)), args.prompt_tokens
    )
    ours_decode(llm, prompt, 8)  # warm-up: every thread of the process exists after it
    clock = ThreadClock()
    calls: list[dict[str, Any]] = []
    step = decoder.step

    def timed_step(*a: Any, **k: Any) -> Any:
        threads0, faults0 = clock.read()
        start = time.perf_counter()
        out = step(*a, **k)
        wall = time.perf_counter() - start
        threads1, faults1 = clock.read()
        calls.append(
            {
                "ms": wall * 1e3,
                "page_faults": faults1 - faults0,
                "threads": {
                    t: {
                        "ran_ms": (threads1[t][0] - threads0[t][0]) / 1e6,
                        "waited_ms": (threads1[t][1] - threads0[t][1]) / 1e6,
                    }
                    for t in threads0
                    if threads1[t] != threads0[t]
                },
            }
        )
        return out

    decoder.step = timed_step  # type: ignore[method-assign]
    runs = []
    for n in range(args.decodes):
        if args.free_mb:
            freed = np.full(args.free_mb * 2**20 // 4, 1.0, np.float32)
            freed.sum()
            del freed
        calls.clear()
        ours_decode(llm, prompt, args.tokens)
        ms = np.array([c["ms"] for c in calls])
        median = float(np.median(ms))
        slow = [dict(c, index=i) for i, c in enumerate(calls) if c["ms"] > SLOW * median]
        lost = sum(c["ms"] - median for c in slow)
        print(
            f"decode {n + 1}: {len(ms)} calls, median {median:.2f} ms, mean {ms.mean():.2f} ms; "
            f"{len(slow)} over {SLOW:g}x the median lost {lost:.1f} ms "
            f"({100 * lost / ms.sum():.1f}% of the calls' time)",
            flush=True,
        )
        for c in slow:
            per_thread = ", ".join(
                f"{clock.names[t]}/{t} ran {v['ran_ms']:.1f} waited {v['waited_ms']:.1f}"
                for t, v in c["threads"].items()
            )
            print(
                f"  call {c['index']}: {c['ms']:.1f} ms, {c['page_faults']} page faults; {per_thread}"
            )
        runs.append({"median_ms": median, "mean_ms": float(ms.mean()), "calls": list(calls)})

    record = run_record(args, thread_names=clock.names, decodes=runs)
    out = save_results(record, None, "decode-call-stalls")
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
