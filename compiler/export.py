"""torch -> ONNX export with an explicit KV cache, loaded as an `onnx_ir.Model`.

The exported graph is the *unfused* reference form:

    inputs : input_ids [batch, seq] int64, position_ids [batch, seq] int64,
             logits_indices [num_logits] int64 (flat positions b * seq + s that need logits),
             past_key.{i} / past_value.{i} [batch, kv_heads, past, head_dim] float32
    outputs: logits [num_logits, vocab] float32 (the LM head runs only where logits are needed:
             the last prompt token in prefill, every draft token in verification),
             present_key.{i} / present_value.{i} [batch, kv_heads, past + seq, head_dim]

With opset 23 and SDPA attention (the defaults) the dynamo exporter writes native
RMSNormalization, RotaryEmbedding and Attention nodes; with eager attention or an older opset,
attention is decomposed (MatMul -> scale -> mask -> Softmax -> MatMul). The cache grows by Concat
either way. Passes rewrite this into the engine's in-place form.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir

from enginesmith.runtime.errors import BuildError

EXPORT_OPSET = 23
MIN_EXPORT_OPSET = 18  # the dynamo exporter's floor: below it, it silently writes opset 18
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")  # HF attention implementations that export


@dataclass(frozen=True)
class ModelDims:
    """Shapes the passes, backends and runtime need, read from the HF config."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    sliding_window: int | None
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config: Any) -> ModelDims:
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        window = getattr(config, "sliding_window", None)
        if getattr(config, "use_sliding_window", True) is False:
            window = None
        return cls(
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
            head_dim=head_dim,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            sliding_window=window,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass
class ExportResult:
    model: ir.Model
    dims: ModelDims
    seconds: float
    weight_bytes: int


def _kv_wrapper(hf_model: Any, num_layers: int) -> Any:
    import torch
    from transformers.cache_utils import DynamicCache

    class KVCacheWrapper(torch.nn.Module):
        """Flattens HF's Cache object into explicit past/present tensors for export."""

        def __init__(self) -> None:
            super().__init__()
            self.model = hf_model

        def forward(self, input_ids, position_ids, logits_indices, past):  # type: ignore[no-untyped-def]
            cache = DynamicCache(config=self.model.config)
            for layer in range(num_layers):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            out = self.model.model(
                input_ids=input_ids,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            hidden = out.last_hidden_state  # [B, S, hidden]
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, logits_indices)
            logits = self.model.lm_head(hidden)  # [num_logits, vocab]
            presents = []
            for layer in out.past_key_values.layers:
                presents += [layer.keys, layer.values]
            return (logits, *presents)

    return KVCacheWrapper().eval()


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names of the exported model, in order."""
    past = [f"past_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "position_ids", "logits_indices", *past], ["logits", *present]


def export_model(
    hf_model: Any, *, opset: int = EXPORT_OPSET, attn_implementation: str = "sdpa"
) -> ExportResult:
    """Export HF_MODEL (a transformers causal LM in fp32) to an onnx_ir model.

    OPSET and ATTN_IMPLEMENTATION choose the attention form: SDPA at opset >= 23 exports as
    ONNX Attention nodes; eager attention, or SDPA below opset 23, as the decomposed chain
    (passes/attention_patterns.py). Below opset 23 RMSNorm and rotary are decomposed too.
    """
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise BuildError(
            f"attn_implementation {attn_implementation!r} does not export; "
            f"use one of {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if opset < MIN_EXPORT_OPSET:
        raise BuildError(f"opset {opset} does not export; use opset {MIN_EXPORT_OPSET} or newer")
    dims = ModelDims.from_config(hf_model.config)
    previous = hf_model.config._attn_implementation
    hf_model.set_attn_implementation(attn_implementation)
    try:
        return _export(hf_model, dims, opset)
    finally:
        # The caller's model keeps running as before (tests share one loaded model).
        if previous and previous != attn_implementation:
            hf_model.set_attn_implementation(previous)


def _export(hf_model: Any, dims: ModelDims, opset: int) -> ExportResult:
    import torch

    wrapper = _kv_wrapper(hf_model, dims.num_layers)

    batch, seq, past = 2, 3, 5
    input_ids = torch.zeros((batch, seq), dtype=torch.int64)
    position_ids = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    logits_indices = torch.tensor([seq - 1, 2 * seq - 1], dtype=torch.int64)
    past_kv = tuple(
        torch.zeros((batch, dims.num_kv_heads, past, dims.head_dim))
        for _ in range(2 * dims.num_layers)
    )
    b, s, p = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    n = torch.export.Dim("num_logits")
    dynamic_shapes = {
        "input_ids": {0: b, 1: s},
        "position_ids": {0: b, 1: s},
        "logits_indices": {0: n},
        "past": tuple({0: b, 2: p} for _ in past_kv),  # mirrors the nesting of the inputs
    }
    start = time.perf_counter()
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                wrapper,
                (input_ids, position_ids, logits_indices, past_kv),
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                optimize=True,
                verbose=False,
            )
        except Exception as exc:
            raise BuildError(
                f"torch.onnx export failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                "report it with the model's config.json"
            ) from exc
    if program is None:  # only when exporting to a file path, which we never do
        raise BuildError("torch.onnx.export returned no program [developer error]")
    model: ir.Model = program.model
    in_names, out_names = io_names(dims.num_layers)
    for value, name in zip(model.graph.inputs, in_names, strict=True):
        value.name = name
    for value, name in zip(model.graph.outputs, out_names, strict=True):
        value.name = name
    weight_bytes = sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value
    )
    return ExportResult(model, dims, time.perf_counter() - start, weight_bytes)


class _quiet_exporter:
    """Silence the exporter's progress prints and warnings (we print our own stage lines)."""

    def __enter__(self) -> None:
        import contextlib
        import io

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        self._level = logging.root.manager.disable
        logging.disable(logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        logging.disable(self._level)
        self._stack.close()
