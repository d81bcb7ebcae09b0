"""Graph cleanup from the field's libraries: onnxscript's optimizer (constant folding and its
default rewrite rules, e.g. Transpose/Reshape collapsing) and onnx_ir's dead-code and common
subexpression elimination. Nothing here is hand-written matching."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer

from enginesmith.passes.base import EnginePass


class CleanupPass(EnginePass):
    """Fold constants, apply onnxscript's default rewrites, drop dead nodes, merge duplicates."""

    name = "cleanup"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = model.graph.num_nodes()
        # The custom plugin op has no shape inference: skip ONNX's, it would only warn.
        onnxscript.optimizer.optimize_ir(model, onnx_shape_inference=False)
        common.CommonSubexpressionEliminationPass()(model)
        common.RemoveUnusedNodesPass()(model)
        common.RemoveUnusedOpsetsPass()(model)
        after = model.graph.num_nodes()
        self.report = {"nodes_before": before, "nodes_after": after}
        return ir.passes.PassResult(model, modified=after != before)
