"""Tests for enginesmith.scripts.benchmarks.bench_quant's helpers (no timing, no llama.cpp needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from enginesmith.runtime.engine_dir import read_manifest
from enginesmith.scripts.benchmarks import bench_quant
from tests.cli_help import assert_help_explains_every_flag


def test_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    flags = (
        "--runs",
        "--prompt-tokens",
        "--decode-tokens",
        "--ppl-tokens",
        "--block-size",
        "--threads",
        "--engines-dir",
        "--rebuild",
        "--skip",
        "--json",
    )
    assert_help_explains_every_flag(bench_quant.main, bench_quant.build_parser(), flags, capsys)


def test_defaults_are_the_issue_settings() -> None:
    args = bench_quant.build_parser().parse_args([])
    assert (args.runs, args.prompt_tokens, args.decode_tokens) == (3, 128, 256)
    assert (args.ppl_tokens, args.block_size, args.skip) == (1024, 32, [])


@pytest.mark.parametrize(
    "argv",
    [["--runs", "0"], ["--decode-tokens", "1"], ["--block-size", "24"], ["--skip", "vllm"]],
)
def test_bad_flags_are_refused_before_any_work(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_quant.main(argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_engine_dirs_are_in_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ENGINESMITH_CACHE", str(tmp_path))
    root = tmp_path / "engines"
    assert bench_quant.engine_dir(root, "int4", 32) == root / "smollm2-135m-int4-b32"
    assert bench_quant.engine_dir(root, "fp32", 32) == root / "smollm2-135m-bench"


def test_graph_weights_count_a_lookup_only_tensor_as_one_row(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    fp32, int4 = tiny_engine("tiny-qwen2"), tiny_engine("tiny-qwen2", quantize="int4")
    w32 = bench_quant.graph_weights(fp32, read_manifest(fp32))
    w4 = bench_quant.graph_weights(int4, read_manifest(int4))
    vocab, hidden = 1024, 64  # untied: the embedding table is read one row per token
    assert w32.total_bytes - w32.per_token_bytes == (vocab - 1) * hidden * 4
    assert w4.per_token_bytes < w4.total_bytes < w32.total_bytes / 3
    assert {"uint8", "float32"} <= set(w4.by_dtype)


def _result() -> dict[str, Any]:
    def s(x: float) -> dict[str, Any]:
        return {"median": x, "min": x - 1, "max": x + 1, "n": 3, "samples": [x - 1, x, x + 1]}

    names = bench_quant.IMPLEMENTATIONS
    speeds = dict(zip(names, (70.0, 150.0, 180.0, 160.0, 25.0), strict=True))
    return {
        "model": "smollm2-135m",
        "settings": {
            "runs": 3,
            "threads": 2,
            "decode_tokens": 4,
            "prompt_tokens": 128,
            "ppl_tokens": 1024,
        },
        "machine": {"cpu_model": "cpu", "cpu_count": 2, "load_average_1m_end": 1.0},
        "decode_tokens_per_s": {k: s(v) for k, v in speeds.items()},
        "perplexity": {k: 15.5 for k in names},
        "weights": {k: {"bytes_per_token": 100e6} for k in names},
        "greedy_tokens": {k: [1, 2, 3, 4] for k in names},
        "checks": {"llama_cpp_prompt_ids_match": True},
    }


def test_render_compares_int4_with_llama_cpp() -> None:
    text = bench_quant.render(_result())
    assert "int4 engine vs llama.cpp Q4_1: 1.12x (median decode)" in text
    assert "at least as fast in 3 of 3 repetitions" in text
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    assert "7.20x" in lines["enginesmith int4"]  # vs transformers
    assert "1.00x" in lines["llama.cpp Q4_1 GGUF"] and "4/4" in lines["llama.cpp Q4_1 GGUF"]


def test_render_without_llama_cpp() -> None:
    result = _result()
    for table in ("decode_tokens_per_s", "perplexity", "weights", "greedy_tokens"):
        del result[table]["llama.cpp"]
    text = bench_quant.render(result)
    assert "llama.cpp Q4_1" not in text and "int4 engine vs" not in text
