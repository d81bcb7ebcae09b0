"""Calibration statistics for --kv-heads: how alike each layer's K and V heads are.

The fp32 transformers model reads calibration text (default: the calibration half of Python's
own pydoc docs, `quality.calibration_text()`; `--calibration FILE` overrides it). Forward hooks
on every layer's k_proj and v_proj sum, per layer, the Gram matrix of the heads' outputs:
G[a, b] = sum over tokens of <x_a, x_b> (x_h the D-vector of head h). That is all that
passes/collapse_kv_heads.py needs to choose groups and report reconstruction errors.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from enginesmith.compiler import quality
from enginesmith.passes.collapse_kv_heads import HeadStats
from enginesmith.runtime.errors import BuildError

CALIBRATION_TOKENS = 1024  # Gram matrices of D-vectors: a thousand tokens settle them
SEGMENT_TOKENS = 512  # the text is read as independent segments of this many tokens


def calibration_source(path: Path | None) -> tuple[str, str]:
    """(text, description) of the calibration text."""
    if path is None:
        return quality.calibration_text(), "pydoc_data.topics (calibration half)"
    return quality.read_text_file(path.expanduser()), str(path)


def attention_modules(model: Any) -> list[Any]:
    """Each decoder layer's self-attention module (Llama, Mistral, Qwen2 layout)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise BuildError(
            "--kv-heads: the model has no model.layers[i].self_attn to calibrate on; "
            "supported: llama, mistral, qwen2"
        )
    modules = [layer.self_attn for layer in layers]
    if not all(hasattr(m, "k_proj") and hasattr(m, "v_proj") for m in modules):
        raise BuildError("--kv-heads: attention without k_proj/v_proj (fused QKV) is not supported")
    return modules


def collect_head_stats(
    model: Any,
    tokenizer: Any,
    calibration: Path | None = None,
    num_tokens: int = CALIBRATION_TOKENS,
) -> HeadStats:
    """Run the calibration text through MODEL and sum each layer's K/V head Gram matrices."""
    import torch

    start = time.perf_counter()
    text, source = calibration_source(calibration)
    ids = tokenizer(text).input_ids[:num_tokens]
    if len(ids) < 16:
        raise BuildError(
            f"calibration text {source} has only {len(ids)} tokens; pass a longer --calibration"
        )
    config = model.config
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    modules = attention_modules(model)
    key_gram = np.zeros((len(modules), kv_heads, kv_heads))
    value_gram = np.zeros_like(key_gram)

    def hook(gram: np.ndarray, layer: int) -> Any:
        def fn(_module: Any, _inputs: Any, output: Any) -> None:
            x = output.detach().double().reshape(-1, kv_heads, head_dim)  # [tokens, heads, D]
            gram[layer] += torch.einsum("tad,tbd->ab", x, x).numpy()

        return fn

    handles = []
    for i, attn in enumerate(modules):
        handles.append(attn.k_proj.register_forward_hook(hook(key_gram, i)))
        handles.append(attn.v_proj.register_forward_hook(hook(value_gram, i)))
    body = getattr(model, "model", model)  # the decoder without its LM head: not needed here
    try:
        with torch.no_grad():
            for s in range(0, len(ids), SEGMENT_TOKENS):
                body(input_ids=torch.tensor([ids[s : s + SEGMENT_TOKENS]]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return HeadStats(
        key_gram=key_gram,
        value_gram=value_gram,
        tokens=len(ids),
        source=source,
        seconds=time.perf_counter() - start,
    )
