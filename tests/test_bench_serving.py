"""Pure helpers of the serving benchmark (no engine, no timing thresholds)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from enginesmith.compiler.presets import train_tokenizer
from enginesmith.scripts.benchmarks.bench_serving import make_workload, policy_metrics


def test_workload_is_real_text_deterministic_and_bounded() -> None:
    tok = train_tokenizer(1024)
    a = make_workload(tok, 20, rate=4.0, seed=3, max_prompt=64, min_out=16, max_out=128)
    b = make_workload(tok, 20, rate=4.0, seed=3, max_prompt=64, min_out=16, max_out=128)
    assert a == b
    assert len(set(a.prompts)) == 20 and all(len(tok(p).input_ids) <= 64 + 1 for p in a.prompts)
    assert all(16 <= n <= 128 for n in a.output_tokens) and len(set(a.output_tokens)) > 1
    assert a.arrivals[0] == 0.0 and all(
        x < y for x, y in zip(a.arrivals, a.arrivals[1:], strict=False)
    )
    # mean inter-arrival near 1/rate (Poisson)
    assert 0.1 < a.arrivals[-1] / 19 < 0.5


def test_policy_metrics() -> None:
    def out(times: list[float]) -> SimpleNamespace:
        return SimpleNamespace(token_ids=[0] * len(times), stats=SimpleNamespace(token_times=times))

    m = policy_metrics([out([1.0, 1.1, 1.2]), out([2.0, 2.5])], arrivals_abs=[0.5, 1.0], start=0.0)
    assert m["generated_tokens"] == 5
    assert m["makespan_s"] == pytest.approx(2.5)
    assert m["throughput_tokens_per_s"] == pytest.approx(2.0)
    assert m["ttft_p50_s"] == pytest.approx(0.75)  # (0.5 + 1.0) / 2
    assert m["itl_p50_s"] == pytest.approx(0.1)
