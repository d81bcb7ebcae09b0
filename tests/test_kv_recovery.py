"""--kv-heads with a recovery step (compiler/kv_recovery.py): pooling in the transformers model is
the ONNX pass's pooling, recovery is never worse than pooling alone, engines build with it, and
bad budgets give one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from enginesmith.compiler import kv_recovery, quality
from enginesmith.compiler.config import BuildConfig
from enginesmith.runtime.engine_dir import read_manifest
from enginesmith.runtime.errors import BuildError
from enginesmith.runtime.executors import open_executor

TEXT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 3


@pytest.mark.parametrize(
    ("preset", "kv_heads", "grouping"),
    [("tiny-llama", 1, "contiguous"), ("tiny-qwen2", 2, "similarity")],
)
def test_pooling_matches_the_onnx_pass(  # type: ignore[no-untyped-def]
    tiny_engine, hf_models, preset: str, kv_heads: int, grouping: str
) -> None:
    """With no recovery time, the collapsed transformers model computes what the engine built
    by the ONNX collapse pass computes (same groups, same mean pooling, same query order)."""
    loaded = hf_models(preset)
    collapsed, report = kv_recovery.collapse_with_recovery(
        loaded.model, loaded.tokenizer, kv_heads, grouping, minutes=0, log=lambda _m: None
    )
    assert report.error_recovered == report.error_pooled
    assert collapsed.config.num_key_value_heads == kv_heads
    assert loaded.model.config.num_key_value_heads != kv_heads  # the reference is untouched
    engine = tiny_engine(
        preset, kv_heads=kv_heads, kv_grouping=grouping, kv_recovery_minutes=0, max_batch=1
    )
    ids = loaded.tokenizer(TEXT).input_ids[:48]
    ours = quality.engine_logits(open_executor(engine, read_manifest(engine)), ids)
    with torch.no_grad():
        theirs = collapsed(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4 * float(np.abs(theirs).max()))


@pytest.mark.parametrize("bf16", [True, False])
def test_recovery_is_never_worse_than_pooling(hf_models, monkeypatch, bf16: bool) -> None:  # type: ignore[no-untyped-def]
    """Both end-to-end paths: bf16 autocast (where the CPU has it) and fp32."""
    monkeypatch.setattr(kv_recovery, "E2E_BF16", bf16)
    loaded = hf_models("tiny-llama")
    _, report = kv_recovery.collapse_with_recovery(
        loaded.model, loaded.tokenizer, 1, minutes=0.05, log=lambda _m: None
    )
    assert report.steps > 0
    assert all(r <= p for r, p in zip(report.error_recovered, report.error_pooled, strict=True))
    assert min(np.subtract(report.error_recovered, report.error_pooled)) < 0  # it fitted
    # overall, on the original's next-token distribution: the layer fits and the end-to-end
    # distillation each leave the KL lower than pooling alone
    assert report.kl_recovered <= report.kl_layers
    assert report.kl_recovered < report.kl_pooled
    assert report.as_dict()["kl_recovered"] == round(report.kl_recovered, 4)


@pytest.mark.parametrize(("preset", "kv_heads"), [("tiny-llama", 1), ("tiny-qwen2", 2)])
def test_bf16_student_trains_the_fp32_weights(hf_models, preset: str, kv_heads: int) -> None:  # type: ignore[no-untyped-def]
    """The end-to-end stage's bf16 student shares the collapsed model's fp32 attention
    projections (its updates land there) and holds everything else in bf16, once; MHA without
    biases and GQA with q/k/v biases."""
    loaded = hf_models(preset)
    collapsed, _ = kv_recovery.collapse_with_recovery(
        loaded.model, loaded.tokenizer, kv_heads, minutes=0, log=lambda _m: None
    )
    teacher, student = kv_recovery._bf16_twins(loaded.model, collapsed)
    for bf16_attn, fp32_attn in zip(
        kv_recovery.kv_calibration.attention_modules(student),
        kv_recovery.kv_calibration.attention_modules(collapsed),
        strict=True,
    ):
        assert bf16_attn.k_proj is fp32_attn.k_proj and bf16_attn.o_proj is fp32_attn.o_proj
        assert fp32_attn.q_proj.weight.dtype == torch.float32
    assert student.model.embed_tokens.weight.dtype == torch.bfloat16
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert loaded.model.model.embed_tokens.weight.dtype == torch.float32  # originals untouched
    ids = torch.tensor([loaded.tokenizer(TEXT).input_ids[:32]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = student(input_ids=ids).logits.float()
    with torch.no_grad():
        ref = collapsed(input_ids=ids).logits
    # bf16 rounding only: the twin computes the collapsed model
    assert float((ours - ref).abs().max()) < 0.05 * float(ref.abs().max()) + 0.05


def test_no_recovery_time_measures_no_kl(hf_models) -> None:  # type: ignore[no-untyped-def]
    loaded = hf_models("tiny-llama")
    _, report = kv_recovery.collapse_with_recovery(
        loaded.model, loaded.tokenizer, 1, minutes=0, log=lambda _m: None
    )
    assert report.steps == 0
    assert report.as_dict()["kl_pooled"] is None  # JSON-safe (no NaN in build_report.json)


def test_engine_with_recovery_reports_it(tiny_engine) -> None:  # type: ignore[no-untyped-def]
    engine = tiny_engine("tiny-llama", kv_heads=1, kv_recovery_minutes=0.02, max_batch=1)
    manifest = read_manifest(engine)
    assert manifest["model"]["num_kv_heads"] == 1
    report = json.loads((engine / "build_report.json").read_text())
    recovery = report["kv_recovery"]
    assert (recovery["kv_heads_before"], recovery["kv_heads_after"]) == (2, 1)
    assert recovery["mean_error_recovered"] <= recovery["mean_error_pooled"]
    assert recovery["kl_recovered"] <= recovery["kl_pooled"]
    assert "quality" in report


@pytest.mark.parametrize("minutes", [-1.0, float("nan"), 601.0])
def test_bad_recovery_minutes(minutes: float, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="--kv-recovery-minutes must be between 0") as info:
        BuildConfig(model="tiny-llama", output=tmp_path / "e", kv_recovery_minutes=minutes)
    assert "\n" not in str(info.value)
