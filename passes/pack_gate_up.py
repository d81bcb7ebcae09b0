"""Pack each SwiGLU MLP's gate and up projections into one MatMul.

Matched form: Mul(SiLU(MatMul(X, W_gate)), MatMul(X, W_up)), SiLU written as
Mul(g, Sigmoid(g)) (either operand order) or Swish. Rewritten:
Split(MatMul(X, [W_gate|W_up])) -> SiLU(gate) * up: one weight stream instead of two kernels.
ONNX Runtime fuses the remaining Sigmoid + Mul into QuickGelu. (com.microsoft SwiGLU, which
would take the packed halves directly, has no CPU kernel in onnxruntime 1.32.)
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from enginesmith.passes.base import EnginePass
from enginesmith.passes.graph_walk import layer_index
from enginesmith.passes.pack_qkv import PackMatchFailure, match_projection, packed_projection


def _silu_input(value: ir.Value | None) -> ir.Value | None:
    """x if VALUE = x * Sigmoid(x) (or Swish(x) with alpha 1), else None."""
    node = value.producer() if value is not None else None
    if node is None or node.domain != "":
        return None
    if node.op_type == "Swish" and node.attributes.get_float("alpha", 1.0) == 1.0:
        return node.inputs[0]
    if node.op_type != "Mul":
        return None
    for x, s in (node.inputs, node.inputs[::-1]):
        sig = s.producer() if s is not None else None
        if sig is not None and sig.op_type == "Sigmoid" and sig.inputs[0] is x:
            return x
    return None


class PackGateUpPass(EnginePass):
    """One gate+up MatMul per SwiGLU MLP."""

    name = "pack-gate-up"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        layers = layer_index(graph)
        packed: list[int] = []
        failures: dict[str, str] = {}
        for node in list(graph):
            if node.op_type != "Mul" or node.domain != "" or len(node.inputs) != 2:
                continue
            a, b = node.inputs
            if a is None or b is None:
                continue
            gate_out, up_out = _silu_input(a), b
            if gate_out is None:
                gate_out, up_out = _silu_input(b), a
            if gate_out is None:
                continue  # not a SwiGLU product
            layer = layers.get(id(node), -1)
            try:
                gate = match_projection(gate_out, "gate")
                up = match_projection(up_out, "up")
                if gate.input is not up.input:
                    raise PackMatchFailure("gate and up project different tensors")
                if (
                    gate.weight.shape != up.weight.shape
                    or gate.bias is not None
                    or up.bias is not None
                ):
                    raise PackMatchFailure("gate and up differ in shape or have biases")
            except PackMatchFailure as why:
                failures[f"layer {layer}"] = str(why)
                continue
            # After both projections, before anything reads them.
            order = {id(n): i for i, n in enumerate(graph)}
            width = gate.weight.shape[1]
            first_use = min(
                (u.node for v in (gate_out, up_out) for u in v.uses()), key=lambda n: order[id(n)]
            )
            gate_up = packed_projection(graph, [gate, up], f"layer{layer}.gate_up_proj", first_use)
            sizes = ir.Value(
                name=f"layer{layer}.gate_up_split",
                const_value=ir.tensor(np.array([width, width], np.int64)),
            )
            graph.register_initializer(sizes)
            split = ir.node(
                "Split",
                [gate_up, sizes],
                {"axis": -1},
                num_outputs=2,
                name=f"layer{layer}.gate_up.split",
            )
            graph.insert_before(first_use, [split])
            for old, new in ((gate_out, split.outputs[0]), (up_out, split.outputs[1])):
                new.shape, new.type = old.shape, old.type
                ir.convenience.replace_all_uses_with(old, new)
            packed.append(layer)
        self.report = {"packed": len(packed), "packed_layers": sorted(packed), "failures": failures}
        return ir.passes.PassResult(model, modified=bool(packed))
