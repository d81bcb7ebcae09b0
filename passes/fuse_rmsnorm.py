"""RMSNorm and residual-add + RMSNorm for ONNX Runtime, with onnxscript's rewrite rules.

1. decomposed RMSNorm (Pow -> ReduceMean -> Add eps -> Sqrt -> Reciprocal -> Mul -> Mul scale,
   eager / older-opset exports) -> SimplifiedLayerNormalization (onnxscript's ort_fusions rule);
2. ONNX RMSNormalization-23 (what the opset-23 exporter writes) -> SimplifiedLayerNormalization
   (the same math; the form ORT's skip fusion and onnxscript's skip rule know);
3. Add(x, skip) feeding SimplifiedLayerNormalization -> com.microsoft
   SkipSimplifiedLayerNormalization, whose 4th output is the sum for the next residual
   (onnxscript's skip rule): one kernel per norm instead of two.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.rms_normalization import rms_normalization_ruleset
from onnxscript.rewriter.ort_fusions.skip_normalization import skip_rms_normalization_ruleset

from enginesmith.passes.base import EnginePass
from enginesmith.passes.graph_walk import layer_index

_NORM_OPS = {
    ("", "SimplifiedLayerNormalization"),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"),
}


class _OnnxRmsToSimplified(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, scale):  # type: ignore[no-untyped-def]
        return op.RMSNormalization(x, scale, _allow_other_attributes=True, _outputs=["norm"])

    def check(self, context, x, scale, norm, **_):  # type: ignore[no-untyped-def, override]
        result = pattern.MatchResult()
        node = norm.producer()
        if node.attributes.get_int("axis", -1) not in (-1, (x.shape.rank() - 1) if x.shape else -1):
            return result.fail("RMSNormalization over more than the last axis")
        if node.attributes.get_int("stash_type", 1) != 1:
            return result.fail("stash_type other than float")
        if scale.shape is None or scale.shape.rank() != 1:
            return result.fail("scale is not a vector")
        return result

    def rewrite(self, op, x, scale, norm, **_):  # type: ignore[no-untyped-def]
        epsilon = norm.producer().attributes.get_float("epsilon", 1e-5)
        return op.SimplifiedLayerNormalization(x, scale, axis=-1, epsilon=epsilon, stash_type=1)


_onnx_rms_ruleset = pattern.RewriteRuleSet([_OnnxRmsToSimplified.rule("OnnxRmsToSimplified")])


class FuseRMSNormPass(EnginePass):
    """RMSNorms as ORT SimplifiedLayerNormalization, fused with their residual Add."""

    name = "fuse-rmsnorm"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        decomposed = rms_normalization_ruleset.apply_to_model(model)
        onnx_rms = _onnx_rms_ruleset.apply_to_model(model)
        skip = skip_rms_normalization_ruleset.apply_to_model(model)
        layers = layer_index(model.graph)
        norms: dict[str, list[int]] = {
            "SimplifiedLayerNormalization": [],
            "SkipSimplifiedLayerNormalization": [],
        }
        for node in model.graph:
            if (node.domain, node.op_type) in _NORM_OPS:
                norms[node.op_type].append(layers[id(node)])
        left = [n.name for n in model.graph if n.op_type == "RMSNormalization"]
        self.report = {
            "rmsnorm_from_decomposed": decomposed,
            "rmsnorm_from_onnx": onnx_rms,
            "skip_rmsnorm": skip,
            "norm_layers": norms,
            "unfused_rmsnorm": left,
        }
        return ir.passes.PassResult(model, modified=bool(decomposed or onnx_rms or skip))
