"""Our engines against Hugging Face transformers on the same weights (the reference).

Greedy tokens must be identical to `model.generate(do_sample=False)`; last-position logits must
agree within LOGITS_RTOL relative to the largest |logit| (fp32)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from enginesmith import LLM, SamplingParams
from tests.conftest import PROMPTS, TINY_PRESETS, check_biases_are_nonzero

LOGITS_RTOL = 1e-5  # measured <= 9.4e-7 on the tiny presets, 1.0e-6 to 2.5e-6 on SmolLM2
NEW_TOKENS = 32


def hf_greedy(loaded, prompt: str, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = loaded.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
        )
    return out[0, ids.shape[1] :].tolist()


def last_logits_relative_diff(llm: LLM, loaded, prompt: str) -> float:  # type: ignore[no-untyped-def]
    ids = llm.tokenizer(prompt).input_ids
    n = len(ids)
    ours = llm.executor.step(
        0,
        np.array([ids]),
        np.arange(n)[None],
        np.array([n - 1], np.int32),
        np.array([n], np.int32),
        np.array([n - 1]),
    )[0]
    with torch.no_grad():
        ref = loaded.model(torch.tensor([ids])).logits[0, -1].numpy()
    diff = float(np.abs(ours - ref).max() / np.abs(ref).max())
    print(f"{prompt[:20]!r}: max relative logit diff {diff:.2e} (limit {LOGITS_RTOL})")
    return diff


def check_model(llm: LLM, loaded) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    batched = llm.generate(list(PROMPTS), params)  # all prompts share the batch
    for prompt, out in zip(PROMPTS, batched, strict=True):
        reference = hf_greedy(loaded, prompt, NEW_TOKENS)
        assert out.token_ids == reference, (
            f"{prompt!r}: ours {out.token_ids} != transformers {reference}"
        )
        assert len(out.token_ids) == NEW_TOKENS and out.finish_reason == "length"
        assert last_logits_relative_diff(llm, loaded, prompt) < LOGITS_RTOL


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_models_match_transformers(preset: str, tiny_engine, hf_models) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(tiny_engine(preset))
    check_model(llm, hf_models(preset))


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-qwen2-gqa"])
def test_presets_with_biases_have_random_nonzero_biases(preset: str, hf_models) -> None:  # type: ignore[no-untyped-def]
    """q/k/v biases in every layer, none of them 0.0 (transformers' initialisation would leave
    every one at exactly 0.0, and a zero bias checks nothing)."""
    model = hf_models(preset).model
    names = check_biases_are_nonzero(model)
    layers = model.config.num_hidden_layers
    assert sorted(names) == sorted(
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(layers) for p in "qkv"
    )
    spread = min(float(m.bias.std()) for n, m in model.named_modules() if n in names)
    assert spread > 0.2, f"biases too small to matter (std {spread:.3f})"


def test_sliding_window_is_exercised(tiny_engine, hf_models) -> None:  # type: ignore[no-untyped-def]
    """tiny-mistral's window (16) is shorter than prompt + 32 tokens, so the window matters:
    transformers' greedy tokens with the window differ from its tokens with full attention (for
    every prompt, measured), and the engine gives the windowed ones."""
    loaded = hf_models("tiny-mistral")
    assert loaded.config.sliding_window == 16
    full_attention = copy.deepcopy(loaded)  # the same weights, the window switched off
    full_attention.model.config.sliding_window = None
    llm = LLM(tiny_engine("tiny-mistral"))
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    changed = []
    for prompt in PROMPTS:
        windowed = hf_greedy(loaded, prompt, NEW_TOKENS)
        assert llm.generate(prompt, params)[0].token_ids == windowed, prompt
        changed.append(hf_greedy(full_attention, prompt, NEW_TOKENS) != windowed)
    print(f"the window changes transformers' greedy tokens for {sum(changed)} of {len(PROMPTS)}")
    assert all(changed)


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_engine, hf_models) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(smollm2_engine)
    check_model(llm, hf_models("smollm2-135m"))
