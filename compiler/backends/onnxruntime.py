"""ONNX Runtime backend: write the engine files (model.onnx + external data, tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx_ir as ir

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"
TOKENIZER_DIR = "tokenizer"


def write_engine_files(model: ir.Model, tokenizer: Any, out_dir: Path) -> dict[str, str]:
    """Save the lowered graph and tokenizer into OUT_DIR; return file roles -> relative paths."""
    model.producer_name = "enginesmith"
    ir.save(model, out_dir / MODEL_FILE, external_data=WEIGHTS_FILE)
    tokenizer.save_pretrained(out_dir / TOKENIZER_DIR)
    return {"model": MODEL_FILE, "weights": WEIGHTS_FILE, "tokenizer": TOKENIZER_DIR}


def runtime_versions() -> dict[str, str]:
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__}
