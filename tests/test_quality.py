"""Quality measurement used by every lossy pass: perplexity math against torch's cross entropy,
held-out text disjoint from calibration text, and an fp32 engine scoring like its reference."""

from __future__ import annotations

import numpy as np
import torch

from enginesmith.compiler import quality
from enginesmith.runtime.engine_dir import read_manifest
from enginesmith.runtime.ort_cpu_executor import OrtCpuExecutor


def test_perplexity_matches_torch_cross_entropy() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, 97)).astype(np.float32) * 3
    ids = rng.integers(0, 97, 50).tolist()
    expected = torch.exp(
        torch.nn.functional.cross_entropy(torch.tensor(logits[:-1]), torch.tensor(ids[1:]))
    ).item()
    assert abs(quality.perplexity(logits, ids) - expected) < 1e-4 * expected


def test_heldout_and_calibration_texts_are_disjoint() -> None:
    calibration, heldout = quality.calibration_text(), quality.heldout_text()
    assert len(calibration) > 100_000 and len(heldout) > 100_000
    heldout_paragraphs = {p.strip() for p in heldout.split("\n\n") if len(p) > 200}
    calibration_paragraphs = {p.strip() for p in calibration.split("\n\n") if len(p) > 200}
    assert not heldout_paragraphs & calibration_paragraphs


def test_fp32_engine_scores_like_its_reference(tiny_engine, hf_models) -> None:  # type: ignore[no-untyped-def]
    engine = tiny_engine("tiny-qwen2")
    session = OrtCpuExecutor(engine, read_manifest(engine))
    loaded = hf_models("tiny-qwen2")
    # 700 tokens: two chunks, so the chunked cache path is exercised too.
    report = quality.evaluate_engine(session, loaded.model, loaded.tokenizer, num_tokens=700)
    assert report.tokens == 700
    assert abs(report.perplexity_delta) < 1e-3 * report.perplexity_reference
    assert report.top1_agreement > 0.99
