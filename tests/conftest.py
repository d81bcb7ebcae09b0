"""Shared fixtures: engines are built once per test session into a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from enginesmith.compiler.build import build
from enginesmith.compiler.config import BuildConfig

TINY_PRESETS = ("tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen2-gqa")
PROMPTS = (
    "def fibonacci(n):",
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning the Universe was created.",
)


def build_quiet(model: str, output: Path, **kwargs: object) -> Path:
    build(BuildConfig(model=model, output=output, **kwargs), log=lambda _msg: None)  # type: ignore[arg-type]
    return output


def check_biases_are_nonzero(model) -> list[str]:  # type: ignore[no-untyped-def]
    """Assert every Linear bias of MODEL is non-zero in every element; return their names.

    transformers initialises biases to exactly 0.0, and a zero bias checks nothing: dropped,
    misordered or added to one row only, it gives the same logits."""
    import torch

    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            assert bool((module.bias != 0).all()), f"{name}.bias has zeros: the test checks nothing"
            names.append(name)
    return names


@pytest.fixture(scope="session")
def engines_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="session")
def tiny_engine(engines_root: Path):  # type: ignore[no-untyped-def]
    """tiny_engine(preset, **build_kwargs) -> engine dir, built once per (preset, kwargs)."""
    built: dict[tuple, Path] = {}

    def get(preset: str, **kwargs: object) -> Path:
        key = (preset, tuple(sorted(kwargs.items())))
        if key not in built:
            name = f"{preset}-" + "-".join(f"{k}{v}" for k, v in sorted(kwargs.items()))
            built[key] = build_quiet(preset, engines_root / name, **kwargs)
        return built[key]

    return get


@pytest.fixture(scope="session")
def smollm2_engine(engines_root: Path) -> Path:
    """The real SmolLM2-135M engine (about a minute to build)."""
    return build_quiet("smollm2-135m", engines_root / "smollm2", max_batch=4, max_seq_len=512)


@pytest.fixture(scope="session")
def hf_models():  # type: ignore[no-untyped-def]
    """load(name) -> LoadedModel from transformers, cached for the session."""
    from enginesmith.compiler.sources import load_model

    cache: dict[str, object] = {}

    def load(name: str):  # type: ignore[no-untyped-def]
        if name not in cache:
            cache[name] = load_model(name)
            check_biases_are_nonzero(cache[name].model)  # type: ignore[attr-defined]
        return cache[name]

    return load


@pytest.fixture(scope="session")
def fresh_export(hf_models):  # type: ignore[no-untyped-def]
    """fresh_export(preset, opset=23, attn_implementation="sdpa") -> a private copy of the
    preset's ONNX export (exported once per session; passes rewrite their copy in place)."""
    import onnx_ir as ir

    from enginesmith.compiler import export

    cache: dict[tuple[str, int, str], export.ExportResult] = {}

    def get(
        preset: str, opset: int = export.EXPORT_OPSET, attn_implementation: str = "sdpa"
    ) -> export.ExportResult:
        key = (preset, opset, attn_implementation)
        if key not in cache:
            cache[key] = export.export_model(
                hf_models(preset).model, opset=opset, attn_implementation=attn_implementation
            )
        result = cache[key]
        copy = ir.serde.deserialize_model(ir.serde.serialize_model(result.model))
        return export.ExportResult(copy, result.dims, result.seconds, result.weight_bytes)

    return get


@pytest.fixture(autouse=True, scope="session")
def _threads() -> None:
    os.environ.setdefault("ENGINESMITH_THREADS", "2")
