"""Run an unfused export (Concat KV cache, ONNX Runtime) and a fused, lowered graph (in-place
KV cache) on the same prefill + decode steps, and compare their logits: the reference for every
fusion's numerical-equivalence test."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from enginesmith.compiler.export import ModelDims
from enginesmith.plugins.flash_attention import schema


def session(model: ir.Model) -> ort.InferenceSession:
    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _steps(ids: np.ndarray, prefill: int) -> list[tuple[int, dict[str, np.ndarray]]]:
    """(tokens cached before, feeds) for a prefill of PREFILL tokens then 1-token decodes."""
    steps = [
        (
            0,
            {
                "input_ids": ids[:, :prefill],
                "position_ids": np.arange(prefill)[None],
                "logits_indices": np.arange(prefill),
            },
        )
    ]
    for pos in range(prefill, ids.shape[1]):
        feeds = {
            "input_ids": ids[:, pos : pos + 1],
            "position_ids": np.array([[pos]]),
            "logits_indices": np.array([0]),
        }
        steps.append((pos, feeds))
    return steps


def _next_pasts(sess: ort.InferenceSession, outputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return {n.replace("present", "past"): v for n, v in zip(names[1:], outputs[1:], strict=True)}


def compare_logits(
    unfused: ir.Model,
    fused: ir.Model,
    dims: ModelDims,
    atol: float,
    prefill: int = 7,
    decode: int = 3,
    seed: int = 0,
) -> float:
    """Assert fused logits == unfused logits within ATOL on every step; return the max diff."""
    ids = np.random.default_rng(seed).integers(3, dims.vocab_size, (1, prefill + decode))
    ref_sess, fused_sess = session(unfused), session(fused)
    empty = np.zeros((1, dims.num_kv_heads, 0, dims.head_dim), np.float32)
    ref_pasts = {f"past_{k}.{i}": empty for i in range(dims.num_layers) for k in ("key", "value")}
    capacity = np.zeros((1, dims.num_kv_heads, prefill + decode, dims.head_dim), np.float32)
    fused_pasts = {name: capacity.copy() for name in ref_pasts}
    worst = 0.0
    for cached, feeds in _steps(ids, prefill):
        new = feeds["input_ids"].shape[1]
        ref = ref_sess.run(None, feeds | ref_pasts)
        lengths = {
            schema.SEQLENS_K: np.array([cached + new - 1], np.int32),
            schema.QUERY_SEQLENS: np.array([new], np.int32),
        }
        out = fused_sess.run(None, feeds | lengths | fused_pasts)
        diff = float(np.abs(out[0] - ref[0]).max())
        assert diff <= atol, f"step after {cached} cached tokens: max |fused - unfused| {diff}"
        worst = max(worst, diff)
        ref_pasts, fused_pasts = _next_pasts(ref_sess, ref), _next_pasts(fused_sess, out)
    return worst
