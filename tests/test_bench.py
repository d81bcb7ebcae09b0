"""Tests for the pure helpers of enginesmith.scripts.benchmarks.bench (no model is loaded, nothing is timed)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from enginesmith.scripts.benchmarks import bench
from tests.cli_help import assert_help_explains_every_flag

# --- statistics and ratios ------------------------------------------------------------------------


def test_summarize_odd_and_even() -> None:
    s = bench.summarize([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert s["samples"] == [3.0, 1.0, 2.0]  # raw order kept for the JSON
    assert bench.summarize([1, 2, 3, 10])["median"] == 2.5


def test_summarize_needs_samples() -> None:
    with pytest.raises(ValueError):
        bench.summarize([])


def test_ratio() -> None:
    assert bench.ratio(68.0, 32.0) == pytest.approx(2.125)
    assert bench.ratio(None, 32.0) is None
    assert bench.ratio(68.0, None) is None
    assert bench.ratio(68.0, 0.0) is None


def test_common_prefix_len() -> None:
    assert bench.common_prefix_len([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert bench.common_prefix_len([1, 2], [1, 2, 3]) == 2
    assert bench.common_prefix_len([], [1]) == 0


# --- bandwidth bound ------------------------------------------------------------------------------


def test_bytes_per_token_tied_counts_the_embedding_once() -> None:
    # The LM head streams the shared matrix: every weight byte is read, once.
    assert bench.weight_bytes_per_token(1000, 300, tied=True, embedding_row_bytes=3) == 1000


def test_bytes_per_token_untied_reads_one_embedding_row() -> None:
    assert bench.weight_bytes_per_token(1000, 300, tied=False, embedding_row_bytes=3) == 703
    assert bench.weight_bytes_per_token(1000, 300, tied=False) == 700


def test_bound_tokens_per_s() -> None:
    assert bench.bound_tokens_per_s(34e9, 538_060_032) == pytest.approx(63.19, abs=0.01)
    with pytest.raises(ValueError):
        bench.bound_tokens_per_s(34e9, 0)


def test_kv_read_bytes_average_the_timed_steps() -> None:
    """The timed steps yield tokens 2..N; the step for token j attends over prompt + j - 1
    cached tokens: the mean over those steps, counted one by one."""
    per_token, prompt, n = 46080, 512, 256
    contexts = [prompt + j - 1 for j in range(2, n + 1)]
    expected = per_token * sum(contexts) / len(contexts)
    assert bench.kv_read_bytes_per_decoded_token(per_token, prompt, n) == round(expected)
    assert bench.kv_read_bytes_per_decoded_token(per_token, prompt, 1) == 0  # nothing timed


def test_torch_kv_bytes_per_cached_token_counts_kv_heads() -> None:
    """SmolLM2-135M: 30 layers, 3 KV heads of 64, fp32: the engine manifest's 46080."""
    import torch

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2))
            self.config = SimpleNamespace(
                num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3
            )

    assert bench.torch_kv_bytes_per_cached_token(Toy()) == 46080
    toy = Toy()
    toy.config.num_key_value_heads = None  # MHA configs may leave it out: every head
    assert bench.torch_kv_bytes_per_cached_token(toy) == 46080 * 3


def test_steady_fractions_keep_runs_whose_bandwidth_held() -> None:
    """A run counts only when the passes around it agree within the tolerance; its bound is
    the faster pass."""
    gb = 1e9
    fractions = bench.steady_fractions(
        [100.0, 100.0, 60.0],
        [(80 * gb, 85 * gb), (55 * gb, 85 * gb), (54 * gb, 50 * gb)],
        bytes_per_token=500_000_000,
    )
    assert fractions == pytest.approx([100 / 170, 60 / 108])
    assert bench.steady_fractions([1.0], [(0.0, 0.0)], 1) == []
    with pytest.raises(ValueError):
        bench.steady_fractions([1.0, 2.0], [(1.0, 1.0)], 1)


def test_best_bandwidth_is_the_fastest_pass_of_any_method() -> None:
    method, bw = bench.best_bandwidth({"numpy": [20e9, 24e9], "torch": [40e9, 77e9], "none": []})
    assert (method, bw) == ("torch", 77e9)
    with pytest.raises(ValueError):
        bench.best_bandwidth({"numpy": []})


def test_weight_bytes_dataclass_per_token() -> None:
    w = bench.WeightBytes(
        "t", total_bytes=1000, embedding_bytes=300, embedding_row_bytes=3, tied=False
    )
    assert w.per_token == 703


def _onnx_lm(tied: bool, path: Path) -> Path:
    """A 2-layer toy LM graph: Gather(embedding) -> MatMul -> LM head (Gemm, transB)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    vocab, hidden = 10, 4
    inits = [
        numpy_helper.from_array(np.zeros((vocab, hidden), np.float32), "embed"),
        numpy_helper.from_array(np.zeros((hidden, hidden), np.float32), "w"),
    ]
    head = "embed"
    if not tied:
        inits.append(numpy_helper.from_array(np.zeros((vocab, hidden), np.float32), "lm_head"))
        head = "lm_head"
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["x"]),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Gemm", ["h", head], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [3, vocab])],
        inits,
    )
    file = path / "model.onnx"
    onnx.save(helper.make_model(graph), str(file))
    return file


@pytest.mark.parametrize("tied", [True, False])
def test_engine_weight_bytes_from_onnx_initializers(tmp_path: Path, tied: bool) -> None:
    _onnx_lm(tied, tmp_path)
    w = bench.engine_weight_bytes(tmp_path, {"files_by_role": {"model": "model.onnx"}})
    emb = 10 * 4 * 4
    assert w.embedding_bytes == emb
    assert w.embedding_row_bytes == 4 * 4
    assert w.tied is tied
    assert w.total_bytes == emb + 4 * 4 * 4 + (0 if tied else emb)
    # Tied: all weights once. Untied: the head is read, the embedding only one row.
    assert w.per_token == (w.total_bytes if tied else w.total_bytes - emb + 16)


@pytest.mark.parametrize("tied", [True, False])
def test_torch_weight_bytes(tied: bool) -> None:
    import torch

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.mid = torch.nn.Linear(4, 4, bias=False)
            self.head = torch.nn.Linear(4, 10, bias=False)
            if tied:
                self.head.weight = self.embed.weight

        def get_input_embeddings(self) -> Any:
            return self.embed

        def get_output_embeddings(self) -> Any:
            return self.head

    w = bench.torch_weight_bytes(Toy())
    assert w.tied is tied
    assert w.embedding_bytes == 160
    assert w.total_bytes == 160 + 64 + (0 if tied else 160)


# --- prompts --------------------------------------------------------------------------------------


def _words() -> tuple[bench.Encode, bench.Decode]:
    """A word-level toy tokenizer whose decode drops '!' (like skipped special tokens)."""

    def encode(s: str) -> list[int]:
        return [hash(w) for w in s.split()]  # ids only need to round-trip via the table

    table: dict[int, str] = {}

    def encode_keep(s: str) -> list[int]:
        ids = encode(s)
        table.update(zip(ids, s.split(), strict=True))
        return ids

    def decode(ids: list[int]) -> str:
        return " ".join(table[i] for i in ids if table[i] != "!")

    return encode_keep, decode


def test_exact_token_prompt_plain_cut() -> None:
    encode, decode = _words()
    prompt, ids = bench.exact_token_prompt(encode, decode, "a b c d e f", 4)
    assert prompt == "a b c d"
    assert len(ids) == 4


def test_exact_token_prompt_searches_past_a_lossy_cut() -> None:
    encode, decode = _words()
    # The first 3 ids decode to "a b" (2 tokens): the search must move the cut to 4 ids.
    prompt, ids = bench.exact_token_prompt(encode, decode, "a b ! c d", 3)
    assert prompt == "a b c"
    assert len(ids) == 3


def test_exact_token_prompt_too_short() -> None:
    encode, decode = _words()
    with pytest.raises(ValueError, match="fewer"):
        bench.exact_token_prompt(encode, decode, "a b", 5)


def test_real_text_prompt_is_pydoc_text_of_exact_length() -> None:
    encode, decode = _words()
    prompt, ids = bench.real_text_prompt(encode, decode, 300)
    assert len(ids) == 300
    assert prompt.split() == bench.pydoc_text().split()[:300]


# --- output ---------------------------------------------------------------------------------------


def test_format_table_aligns_columns() -> None:
    out = bench.format_table(["engine", "tok/s"], [["ours", "68.1"], ["transformers", "9.5"]])
    lines = out.splitlines()
    assert lines[0] == "engine" + " " * 8 + "tok/s"
    assert lines[1] == "-" * 12 + "  " + "-" * 5
    assert lines[2] == "ours" + " " * 11 + "68.1"  # first column left, numbers right-aligned
    assert lines[3] == "transformers" + " " * 4 + "9.5"


def test_format_cells() -> None:
    s = bench.summarize([67.04, 68.26, 66.0])
    assert bench.format_cell(s) == "67.0 [66.0-68.3]"
    assert bench.format_cell(s, 0) == "67 [66-68]"
    assert bench.format_cell(None) == "-"
    assert bench.format_ratio(2.125) == "2.12x"
    assert bench.format_ratio(None) == "-"
    assert bench.format_percent(0.4567) == "45.7%"


def _result(with_peer: bool) -> dict[str, Any]:
    weights = {"bytes_per_token": 538_060_032}
    impl: dict[str, Any] = {
        "ours": {
            "prefill_tokens_per_s": bench.summarize([900.0, 1000.0, 1100.0]),
            "decode_tokens_per_s": bench.summarize([67.0, 68.0, 69.0]),
            "decode_step_only_tokens_per_s": bench.summarize([68.0, 69.0, 70.0]),
            "decode_host_ms_per_token": bench.summarize([0.2, 0.21, 0.25]),
            "decode_median_call": {
                "tokens_per_s": bench.summarize([72.0, 73.0, 74.0]),
                "decode_fraction_of_same_run_bound": bench.summarize([0.8, 0.81, 0.82]),
                "decode_fraction_of_steady_bound": None,
                "slow_call_share": bench.summarize([0.01, 0.03, 0.05]),
            },
            "weights": weights,
            "kv_read_bytes_per_token": 29_491_200,
            "bytes_per_token": 538_060_032 + 29_491_200,
            "bound_tokens_per_s": 143.0,
            "decode_fraction_of_bound": 68.0 / 143.0,
            "decode_fraction_of_same_run_bound": bench.summarize([0.6, 0.7, 0.8]),
            "weights_only": {
                "bound_tokens_per_s": 150.9,
                "decode_fraction_of_same_run_bound": bench.summarize([0.55, 0.65, 0.75]),
            },
        }
    }
    if with_peer:
        impl["unfused"] = {
            "prefill_tokens_per_s": bench.summarize([500.0]),
            "decode_tokens_per_s": bench.summarize([50.0]),
            "weights": weights,
            "bound_tokens_per_s": 143.0,
            "decode_fraction_of_bound": 50.0 / 143.0,
        }
        impl["transformers"] = {
            "prefill_tokens_per_s": bench.summarize([400.0]),
            "decode_tokens_per_s": bench.summarize([32.0]),
            "weights": weights,
            "bound_tokens_per_s": 143.0,
            "decode_fraction_of_bound": 32.0 / 143.0,
        }
    return {
        "model": "smollm2-135m",
        "settings": {
            "runs": 3,
            "prefill_prompt_tokens": 512,
            "decode_prompt_tokens": 512,
            "decode_tokens": 256,
        },
        "bandwidth": {
            "best_bytes_per_s": 77e9,
            "best_method": "torch.sum (2 threads)",
            "best_bytes_per_s_by_phase": {"before": 49e9, "run 1": 77e9},
        },
        "implementations": impl,
        "ratios": {
            "prefill": 2.5 if with_peer else None,
            "decode": 2.125 if with_peer else None,
            "unfused_prefill": 1.25 if with_peer else None,
            "unfused_decode": 50 / 32 if with_peer else None,
            "fused_vs_unfused_prefill": 2.0 if with_peer else None,
            "fused_vs_unfused_decode": 1.36 if with_peer else None,
        },
        "greedy_agreement": {
            "common_prefix": 200 if with_peer else None,
            "unfused_common_prefix": 256 if with_peer else None,
        },
    }


def test_render_with_transformers() -> None:
    out = bench.render(_result(with_peer=True))
    assert "77.0 GB/s" in out
    assert "best per phase 49.0-77.0 GB/s" in out
    assert "bound 143.0 tok/s" in out
    assert "weights 538.1 MB + KV cache 29.5 MB (mean 640 cached tokens) = 567.6 MB" in out
    assert "against the weights alone (538.1 MB, bound 150.9 tok/s): 65.0% of same-run" in out
    ours_row = next(line for line in out.splitlines() if line.startswith("enginesmith"))
    assert "1000 [900-1100]" in ours_row
    assert "68.0 [67.0-69.0]" in ours_row
    assert "2.50x" in ours_row and "2.12x" in ours_row and "47.6%" in ours_row
    assert ours_row.split()[-1] == "70.0%"  # median of the same-run fractions
    assert "decode calls only (stats.engine_decode_tokens_per_s): 69.0 [68.0-70.0]" in out
    assert "host time per token between the calls: 0.21 [0.20-0.25] ms" in out
    assert (
        "median decode call (stats.median_decode_call_tokens_per_s): 73.0 [72.0-74.0]; of the "
        "same-run bound 81.0 [80.0-82.0]%, of the steady bound -; calls over twice the median "
        "lost 3.0 [1.0-5.0]% of the decode calls' time" in out
    )
    unfused_row = next(line for line in out.splitlines() if line.startswith("unfused"))
    assert "1.25x" in unfused_row and "1.56x" in unfused_row and unfused_row.split()[-1] == "-"
    assert "fused vs unfused export: prefill 2.00x, decode 1.36x" in out
    assert any(line.startswith("transformers") for line in out.splitlines())
    assert "first 200 of 256" in out and "unfused export's greedy tokens" in out


def test_render_without_transformers() -> None:
    out = bench.render(_result(with_peer=False))
    assert not any(line.startswith("transformers") for line in out.splitlines())
    ours_row = next(line for line in out.splitlines() if line.startswith("enginesmith"))
    assert ours_row.split()[-4:] == ["-", "-", "47.6%", "70.0%"]
    assert "identical to transformers" not in out


def test_render_reports_the_memory_the_engine_load_added() -> None:
    result = _result(with_peer=False)
    result["memory"] = {
        "rss_added_by_engine_load_bytes": 900 * 2**20,
        "weight_bytes_on_disk": 514 * 2**20,
        "kv_cache_bytes": 360 * 2**20,
    }
    out = bench.render(result)
    assert (
        "memory added by loading the engine (RSS): 900 MiB (weights 514 MiB on disk, KV slots "
        "360 MiB)" in out
    )


def test_rss_bytes_grows_with_a_resident_array() -> None:
    before = bench.rss_bytes()
    block = np.ones(64 << 18, np.float32)  # 64 MiB, every page written
    grown = bench.rss_bytes() - before
    assert 48 << 20 < grown < 96 << 20, grown
    del block


# --- command line ---------------------------------------------------------------------------------


def test_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    flags = (
        "--engine",
        "--runs",
        "--prefill-tokens",
        "--decode-tokens",
        "--json",
        "--skip-transformers",
        "--decode-prompt-tokens",
        "--skip-unfused",
        "--unfused-dir",
    )
    assert_help_explains_every_flag(bench.main, bench.build_parser(), flags, capsys)


def test_defaults() -> None:
    args = bench.build_parser().parse_args([])
    assert (args.runs, args.prefill_tokens, args.decode_tokens) == (3, 512, 256)
    assert args.engine is None and args.json is None and not args.skip_transformers
    assert args.decode_prompt_tokens == 512 and not args.skip_unfused


def test_unfused_baseline_decodes_like_the_engine(tiny_engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The benchmark's unfused baseline (plain export, Concat cache) greedily decodes the same
    tokens as the fused engine: the two rows of the table compute the same thing."""
    from enginesmith.runtime.llm import LLM
    from enginesmith.runtime.sampling import SamplingParams
    from enginesmith.scripts.benchmarks.unfused_baseline import UnfusedRunner, ensure_unfused_export

    path = ensure_unfused_export("tiny-llama", tmp_path / "unfused", log=lambda _m: None)
    assert ensure_unfused_export("tiny-llama", tmp_path / "unfused") == path  # cached
    runner = UnfusedRunner(path)
    llm = LLM(tiny_engine("tiny-llama"))
    ids = llm.tokenizer("def fibonacci(n):").input_ids
    (ours,) = llm.generate("def fibonacci(n):", SamplingParams(max_tokens=12, ignore_eos=True))
    result = runner.decode(ids, 12)
    assert result["token_ids"] == list(ours.token_ids)
    assert result["wall_tokens_per_s"] > 0 and runner.prefill(ids) > 0


@pytest.mark.parametrize(
    "argv", [["--runs", "0"], ["--prefill-tokens", "0"], ["--decode-tokens", "1"]]
)
def test_bad_flags_are_refused_before_any_work(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_default_engine_dir_is_in_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ENGINESMITH_CACHE", str(tmp_path))
    assert bench.default_engine_dir() == tmp_path / "engines" / "smollm2-135m-bench"


def test_token_clock_timestamps_each_put() -> None:
    clock = bench.TokenClock()
    for _ in range(3):
        clock.put(None)
    clock.end()
    assert len(clock.times) == 3
    assert clock.times == sorted(clock.times)


def test_cached_engine_rebuilds_only_stale_engines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached benchmark engine is reused as long as the compiler code and the build settings
    that made it are unchanged; otherwise it is rebuilt, so a benchmark never measures an old
    compiler's engine."""
    from enginesmith.compiler import artifact
    from enginesmith.compiler.config import BuildConfig

    config = BuildConfig(model="tiny-llama", output=tmp_path / "engine", verify=False)
    path = bench.cached_engine(config)
    built = (path / "manifest.json").stat().st_mtime_ns
    assert bench.cached_engine(config) == path
    assert (path / "manifest.json").stat().st_mtime_ns == built  # reused

    bench.cached_engine(dataclasses.replace(config, max_batch=2))  # other settings: rebuilt
    rebuilt = (path / "manifest.json").stat().st_mtime_ns
    assert rebuilt != built

    monkeypatch.setattr(artifact, "compiler_fingerprint", lambda *_: "other-compiler")
    assert bench.cached_engine(dataclasses.replace(config, max_batch=2), check_stale=False) == path
    assert (path / "manifest.json").stat().st_mtime_ns == rebuilt  # not checked: reused
    bench.cached_engine(dataclasses.replace(config, max_batch=2))
    assert (path / "manifest.json").stat().st_mtime_ns != rebuilt


def test_matmul_floor_uses_the_engines_weight_shapes(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    """The floor chains exactly the engine's weight MatMuls: 4 per layer after packing + the
    LM head, with the engine's shapes and bytes."""
    from enginesmith.scripts.benchmarks.matmul_floor import MatMulFloor, weight_matmul_shapes

    engine = tiny_engine("tiny-llama")
    shapes = weight_matmul_shapes(engine / "model.onnx")
    manifest = json.loads((engine / "manifest.json").read_text())
    hidden, vocab = manifest["model"]["hidden_size"], manifest["model"]["vocab_size"]
    assert len(shapes) == 4 * manifest["model"]["num_layers"] + 1
    assert shapes[-1] == (hidden, vocab)  # the tied LM head (Gemm transB) as [K, N]
    floor = MatMulFloor(shapes)
    assert floor.weight_bytes == sum(4 * k * n for k, n in shapes)
    assert floor.tokens_per_s(steps=4) > 0


def test_results_bound_counts_weights_and_kv_and_render_prints_both(tmp_path: Path) -> None:
    """_results divides each decode by the bound of the weights plus the KV cache it reads
    (and keeps the weights-alone figures); render prints both. Toy numbers: 224 weight bytes
    and 8 KV bytes per cached token, a 4-token prompt and 4 decoded tokens (mean context
    4 + 4/2 = 6: 48 KV bytes), a bandwidth of 100 full tokens/s."""
    import argparse

    _onnx_lm(True, tmp_path)
    total = 224 + 48
    bw = {"samples_bytes_per_s": {"toy read": [total * 100.0]}}
    llm = SimpleNamespace(
        manifest={"files_by_role": {"model": "model.onnx"}, "source": {"model": "toy"}}
    )
    samples: dict[str, list[float]] = {
        "ours_prefill": [500.0],
        "ours_decode": [50.0],
        "ours_decode_step_only": [55.0],
        "ours_decode_median_call": [60.0],
        "ours_decode_slow_call_share": [0.04],
    }
    result = bench._results(
        argparse.Namespace(runs=1, decode_tokens=4),
        [],
        tmp_path,
        llm,
        None,
        [1, 2, 3, 4, 5],
        [1, 2, 3, 4],
        samples,
        {"ours": {"token_ids": [1, 2, 3, 4]}},
        {"before": bw, "run 1": bw, "after": bw},
        [(total * 100.0, total * 100.0)],
        {"ours": 8},
    )
    ours = result["implementations"]["ours"]
    assert (ours["kv_read_bytes_per_token"], ours["bytes_per_token"]) == (48, total)
    assert ours["bound_tokens_per_s"] == pytest.approx(100.0)
    assert ours["decode_fraction_of_same_run_bound"]["median"] == pytest.approx(0.5)
    assert ours["decode_fraction_of_steady_bound"]["median"] == pytest.approx(0.5)
    weights_only = ours["weights_only"]
    assert weights_only["bound_tokens_per_s"] == pytest.approx(total * 100.0 / 224)
    assert weights_only["decode_fraction_of_steady_bound"]["median"] == pytest.approx(
        50.0 * 224 / (total * 100.0)
    )
    # 50 tok/s as the caller sees it, 55 over the engine's decode calls: 20 - 18.18 ms.
    assert ours["decode_host_ms_per_token"]["median"] == pytest.approx(1e3 / 50 - 1e3 / 55)
    # 60 tok/s at the median call, against the same 100 tok/s bound.
    median_call = ours["decode_median_call"]
    assert median_call["decode_fraction_of_same_run_bound"]["median"] == pytest.approx(0.6)
    assert median_call["decode_fraction_of_steady_bound"]["median"] == pytest.approx(0.6)
    text = bench.render(result)
    assert "decode calls only (stats.engine_decode_tokens_per_s): 55.0" in text
    assert (
        "median decode call (stats.median_decode_call_tokens_per_s): 60.0 [60.0-60.0]; of the "
        "same-run bound 60.0 [60.0-60.0]%, of the steady bound 60.0 [60.0-60.0]%; calls over "
        "twice the median lost 4.0 [4.0-4.0]% of the decode calls' time" in text
    )
    assert "host time per token between the calls: 1.82 [1.82-1.82] ms" in text
    assert "weights 0.0 MB + KV cache 0.0 MB (mean 6 cached tokens)" in text
    assert "-> bound 100.0 tok/s" in text
    assert "against the weights alone" in text and "41.2% of same-run" in text


def test_bandwidth_passes_read_one_array_kept_for_the_process() -> None:
    """Every bandwidth pass of a size reads the same resident array: none is freed between
    passes (a freed GiB stalled the decode measured next, docs/benchmarks.md)."""
    first = bench.measure_bandwidth(nbytes=1 << 20, reps=2)
    array = bench._bandwidth_array(1 << 20)
    second = bench.measure_bandwidth(nbytes=1 << 20, reps=2)
    assert bench._bandwidth_array(1 << 20) is array and array.nbytes == 1 << 20
    for result in (first, second):
        assert result["array_bytes"] == 1 << 20
        assert all(len(v) == 2 and min(v) > 0 for v in result["samples_bytes_per_s"].values())
