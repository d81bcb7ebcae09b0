"""Bring every export to the one form the fusion passes match, with the field's libraries:
onnxscript's version converter lifts older opsets to 23, then onnxscript's ONNX fusions turn
decomposed RMSNorm (Pow/ReduceMean/Sqrt/...) and rotary (Mul/Slice/Neg/Concat/Add) chains into
the opset-23 RMSNormalization and RotaryEmbedding ops. The dynamo opset-23 export already has
those ops: then this pass changes nothing."""

from __future__ import annotations

import onnx_ir as ir
import onnxscript.optimizer
import onnxscript.version_converter
from onnxscript.rewriter import onnx_fusions

from enginesmith.passes.base import EnginePass

TARGET_OPSET = 23


class CanonicalizePass(EnginePass):
    """Opset 23 with native RMSNormalization / RotaryEmbedding ops."""

    name = "canonicalize"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = model.opset_imports.get("", TARGET_OPSET)
        if before < TARGET_OPSET:
            onnxscript.version_converter.convert_version(model, TARGET_OPSET, fallback=False)
            # Fold the constants the decomposed chains are built from, so the fusions see them.
            onnxscript.optimizer.optimize_ir(model, onnx_shape_inference=False)
        counts = onnx_fusions.fuse(model)
        self.report = {
            "opset_before": before,
            "opset_after": model.opset_imports.get("", before),
            "fused": {k: v for k, v in counts.items() if k != "GQA"},
        }
        modified = before != self.report["opset_after"] or any(counts.values())
        return ir.passes.PassResult(model, modified=modified)
