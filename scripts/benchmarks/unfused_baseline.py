"""The unfused baseline of the fusion benchmark: the model's plain ONNX export (what the
exporter writes before any enginesmith pass: ONNX Attention with a Concat KV cache, separate
Q/K/V and gate/up MatMuls, RotaryEmbedding and RMSNormalization nodes) run by ONNX Runtime with
its own graph optimizations at ORT_ENABLE_ALL, past/present caches fed back each step: what a
user of ONNX Runtime gets from the same export without our compiler."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

MODEL_FILE = "model.onnx"


def ensure_unfused_export(model: str, out_dir: Path, log: Any = print) -> Path:
    """OUT_DIR/model.onnx: MODEL's export (cached; exported on first use, about a minute)."""
    path = out_dir.expanduser() / MODEL_FILE
    if path.is_file():
        return path
    import onnx_ir as ir

    from enginesmith.compiler import export
    from enginesmith.compiler.sources import load_model

    log(f"no unfused export at {path}: exporting {model} (about a minute)")
    loaded = load_model(model)
    result = export.export_model(loaded.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("model.partial.onnx")
    ir.save(result.model, tmp, external_data="model.onnx.data")
    tmp.rename(path)  # external data file name is unchanged: only the graph file moves
    return path


class UnfusedRunner:
    """Greedy prefill/decode at batch 1 on the unfused export, KV cache as Concat inputs."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        shape = self.session.get_inputs()[
            [i.name for i in self.session.get_inputs()].index(self.past_names[0])
        ].shape
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        # Every past input (a key and a value per layer) holds this much per cached token.
        self.kv_bytes_per_cached_token = len(self.past_names) * self.kv_heads * self.head_dim * 4

    def _run(
        self, ids: list[int], start: int, pasts: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        n = len(ids)
        feeds = {
            "input_ids": np.array([ids], np.int64),
            "position_ids": np.arange(start, start + n, dtype=np.int64)[None],
            "logits_indices": np.array([n - 1], np.int64),
            **pasts,
        }
        outputs = self.session.run(self.output_names, feeds)
        presents = {
            name.replace("present_", "past_"): value
            for name, value in zip(self.output_names[1:], outputs[1:], strict=True)
        }
        return outputs[0], presents

    def _empty(self) -> dict[str, np.ndarray]:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        return {name: empty for name in self.past_names}

    def prefill(self, ids: list[int]) -> float:
        """Tokens/s of one forward over IDS (logits of the last position)."""
        start = time.perf_counter()
        self._run(ids, 0, self._empty())
        return len(ids) / (time.perf_counter() - start)

    def decode(self, ids: list[int], tokens: int) -> dict[str, Any]:
        """Greedy TOKENS tokens after IDS; tokens/s from the first to the last token."""
        logits, pasts = self._run(ids, 0, self._empty())
        generated = [int(logits[-1].argmax())]
        first = time.perf_counter()
        for _ in range(tokens - 1):
            logits, pasts = self._run(generated[-1:], len(ids) + len(generated) - 1, pasts)
            generated.append(int(logits[-1].argmax()))
        wall = time.perf_counter() - first
        return {"wall_tokens_per_s": (tokens - 1) / wall, "token_ids": generated}
