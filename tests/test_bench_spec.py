"""scripts/bench-spec's pure parts: which engine serves a source, the v(K) fit, the formula."""

from __future__ import annotations

from pathlib import Path

import pytest

from enginesmith.scripts.benchmarks import bench_spec


def test_each_model_draft_runs_on_the_engine_that_holds_it() -> None:
    engines = {"self:int8": Path("spec"), "self:int4": Path("spec-int4")}
    assert bench_spec.engine_for("self:int4", engines) == Path("spec-int4")
    assert bench_spec.engine_for("ngram+self:int4", engines) == Path("spec-int4")
    assert bench_spec.engine_for("suffix+self:int8", engines) == Path("spec")
    assert bench_spec.engine_for("ngram", engines) == Path("spec")  # model-free: any target


def test_fit_ratio_recovers_the_linear_step_cost_model() -> None:
    r = {1: 0.05, 4: 0.08}
    v = {
        str(b): {str(k): (1 + rb * b * (k + 1)) / (1 + rb * b) for k in range(8)}
        for b, rb in r.items()
    }
    fitted = bench_spec.fit_ratio(v)
    assert fitted["1"] == pytest.approx(0.05, rel=1e-9)
    assert fitted["4"] == pytest.approx(0.08, rel=1e-9)


def test_predicted_speedup_is_the_published_formula() -> None:
    # Leviathan et al.: (1 - a^(K+1)) / ((1 - a)(cK + v)); a = 0.8, K = 4, c = 0, v = 1.2
    assert bench_spec.predicted_speedup(0.8, 4, 0.0, 1.2) == pytest.approx(
        (1 - 0.8**5) / (0.2 * 1.2)
    )
    assert bench_spec.predicted_speedup(0.9, 0, 0.0, 1.0) is None  # nothing drafted
    # a model draft's own steps cost: c = 0.3 lowers the prediction
    assert bench_spec.predicted_speedup(0.8, 4, 0.3, 1.2) < bench_spec.predicted_speedup(
        0.8, 4, 0.0, 1.2
    )


def test_best_source_is_the_highest_mean_greedy_speedup() -> None:
    rows = [
        {"source": "ngram", "temperature": 0.0, "speedup": 1.8},
        {"source": "ngram", "temperature": 0.0, "speedup": 1.0},
        {"source": "self:int4", "temperature": 0.0, "speedup": 1.5},
        {"source": "self:int4", "temperature": 0.0, "speedup": 1.4},
        {"source": "suffix", "temperature": 0.8, "speedup": 9.0},  # sampled rows do not rank
    ]
    assert bench_spec._best_source(rows) == "self:int4"
    rows[2:4] = [{"source": "suffix", "temperature": 0.0, "speedup": 1.5}]
    assert bench_spec._best_source(rows) == "suffix"
    assert bench_spec._best_source(rows, model=True) is None  # no model draft ran
    rows.append({"source": "ngram+self:int4", "temperature": 0.0, "speedup": 1.2})
    assert bench_spec._best_source(rows, model=True) == "ngram+self:int4"
    assert bench_spec._best_source(rows, model=False) == "suffix"


def test_closed_loop_keeps_the_batch_full_until_the_requests_run_out() -> None:
    """B requests at a time; a finished one's place goes to the next before the next step."""

    class Request:
        def __init__(self, prompt: str) -> None:
            self.prompt, self.left = prompt, len(prompt)
            self.finish_reason: str | None = None

        def output(self) -> str:
            return self.prompt

    class Core:
        def __init__(self) -> None:
            self.running: list[Request] = []
            self.widths: list[int] = []

        def add(self, request: Request) -> None:
            self.running.append(request)

        def step(self) -> None:
            self.widths.append(len(self.running))
            for r in self.running:
                r.left -= 1
                if r.left == 0:
                    r.finish_reason = "length"
            self.running = [r for r in self.running if r.finish_reason is None]

    class FakeLLM:
        core = Core()

        def new_request(self, prompt: str, params: object) -> Request:
            return Request(prompt)

    llm = FakeLLM()
    outs, wall = bench_spec.run_closed_loop(llm, ["a", "bbb", "cc"], None, 2, 7)
    assert outs == ["a", "bbb", "cc", "a", "bbb", "cc", "a"] and wall >= 0
    # full (2 rows) until the last request is running, then it drains
    widths = llm.core.widths
    assert max(widths) == 2 and widths[: widths.index(1)] == [2] * widths.index(1)
    assert sum(widths) == sum(len(p) for p in outs)


def test_inflight_prompts_are_all_different() -> None:
    """In flight no prompt repeats: a repeated greedy prompt repeats its output, which a
    source that learns from other requests (suffix) would copy."""
    w = bench_spec.workloads(12, distinct=True)
    contents = [m[0]["content"] for ms in w.values() for m in ms]
    assert len(set(contents)) == len(contents) == 24
    assert bench_spec.workloads(2)["free"] == bench_spec.workloads(2, distinct=True)["free"]
    parser = bench_spec.build_parser()
    bench_spec._check(parser, parser.parse_args([]))  # the defaults fit: 3 x 8 requests
    with pytest.raises(SystemExit):  # 4 x 8 would repeat prompts
        bench_spec._check(parser, parser.parse_args(["--waves", "4"]))
