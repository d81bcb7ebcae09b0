"""scripts/bench-lossy: its flags are explained, its option table covers the issue's rows and its
--recovery-sweep entries parse (the run itself is a benchmark, not a unit test)."""

from __future__ import annotations

import pytest

from enginesmith.scripts.benchmarks import bench_lossy
from tests.cli_help import assert_help_explains_every_flag


def test_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    flags = ("--only", "--recovery-sweep", "--kv-budget-mib", "--build-only", "--skip-llama-cpp")
    assert_help_explains_every_flag(bench_lossy.main, bench_lossy.build_parser(), flags, capsys)


def test_options_cover_every_lossy_flag() -> None:
    settings = [s for _, _, s in bench_lossy.OPTIONS]
    assert {} in settings
    for wanted in (
        {"quantize": "int8"},
        {"quantize": "int4"},
        {"kv_cache_dtype": "int8"},
        {"kv_cache_dtype": "int4"},
        {"kv_heads": 1},
    ):
        assert wanted in settings


def test_recovery_sweep_entries() -> None:
    assert bench_lossy._budget("1") == (1.0, None)
    assert bench_lossy._budget("0.5@1e-3") == (0.5, 1e-3)
