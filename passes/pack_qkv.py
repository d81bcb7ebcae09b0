"""Pack each layer's Q, K and V projections into one MatMul feeding FlashAttention's packed
query input: one weight read per layer instead of three kernel launches, and no Split.

Matched form: FlashAttention(query=P_q, key=P_k, value=P_v, ...) where every P_x is
MatMul(X, W_x) or Add(MatMul(X, W_x), b_x) with the same X and constant W_x, b_x (Qwen2's q/k/v
biases). Rewritten: FlashAttention(query=[Add](MatMul(X, [W_q|W_k|W_v]), [b_q|b_k|b_v]), -, -).
Run after remove-layout-noops: the exporter's Reshape chains between the projections and the
plugin must be gone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from enginesmith.passes.base import EnginePass
from enginesmith.passes.graph_walk import layer_of_plugin, plugin_nodes


class PackMatchFailure(Exception):
    """Why a layer's projections could not be packed."""


@dataclass(frozen=True)
class Projection:
    """output = input @ weight (+ bias)."""

    input: ir.Value
    weight: np.ndarray  # [K, N]
    bias: np.ndarray | None  # [N]
    nodes: tuple[ir.Node, ...]


def match_projection(value: ir.Value | None, what: str) -> Projection:
    """VALUE as MatMul(X, W) or Add(MatMul(X, W), b) / Add(b, MatMul(X, W)), W and b constant."""
    node = value.producer() if value is not None else None
    bias = None
    nodes: list[ir.Node] = []
    if node is not None and node.op_type == "Add" and node.domain == "":
        consts = [v for v in node.inputs if v is not None and v.const_value is not None]
        others = [v for v in node.inputs if v is not None and v.const_value is None]
        if len(consts) != 1 or len(others) != 1 or len(consts[0].shape or ()) != 1:
            raise PackMatchFailure(f"{what}: Add is not a bias add")
        bias = consts[0].const_value.numpy()  # type: ignore[union-attr]
        nodes.append(node)
        node = others[0].producer()
    if node is None or node.op_type != "MatMul" or node.domain != "":
        found = node.op_type if node is not None else "a graph input"
        raise PackMatchFailure(f"{what}: expected MatMul (+ bias Add), found {found}")
    x, w = node.inputs[0], node.inputs[1]
    if x is None or w is None or w.const_value is None or len(w.shape or ()) != 2:
        raise PackMatchFailure(f"{what}: MatMul weight is not a constant matrix")
    if nodes and len(node.outputs[0].uses()) != 1:
        raise PackMatchFailure(f"{what}: projection output has other consumers")
    nodes.append(node)
    return Projection(x, w.const_value.numpy(), bias, tuple(nodes))


def packed_projection(
    graph: ir.Graph, projections: list[Projection], prefix: str, before: ir.Node
) -> ir.Value:
    """Insert MatMul(X, concat(W)) [+ Add(concat(b))] before BEFORE; return its output."""
    weight = ir.Value(
        name=f"{prefix}.weight",
        const_value=ir.tensor(np.concatenate([p.weight for p in projections], axis=1)),
    )
    graph.register_initializer(weight)
    matmul = ir.node("MatMul", [projections[0].input, weight], name=f"{prefix}.matmul")
    new_nodes = [matmul]
    out = matmul.outputs[0]
    if any(p.bias is not None for p in projections):
        biases = [
            p.bias if p.bias is not None else np.zeros(p.weight.shape[1], p.weight.dtype)
            for p in projections
        ]
        bias = ir.Value(name=f"{prefix}.bias", const_value=ir.tensor(np.concatenate(biases)))
        graph.register_initializer(bias)
        add = ir.node("Add", [out, bias], name=f"{prefix}.bias_add")
        new_nodes.append(add)
        out = add.outputs[0]
    graph.insert_before(before, new_nodes)
    x_shape = projections[0].input.shape
    width = sum(p.weight.shape[1] for p in projections)
    if x_shape is not None:
        out.shape = ir.Shape([*list(x_shape)[:-1], width])
    out.type = projections[0].input.type
    return out


class PackQKVPass(EnginePass):
    """Give every FlashAttention node one packed QKV projection.

    Requires: separate query/key/value inputs produced by projections of one tensor.
    Ensures: packed layers have key and value inputs empty and a [B, S, (N + 2 Nkv) H] query.
    """

    name = "pack-qkv"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        packed: list[int] = []
        failures: dict[str, str] = {}
        for node in plugin_nodes(graph):
            layer = layer_of_plugin(node)
            try:
                projections = [
                    match_projection(node.inputs[i], what) for i, what in enumerate("qkv")
                ]
                if len({id(p.input) for p in projections}) != 1:
                    raise PackMatchFailure("q, k and v project different tensors")
            except PackMatchFailure as why:
                failures[f"layer {layer}"] = str(why)
                continue
            query = packed_projection(graph, projections, f"layer{layer}.qkv_proj", node)
            node.replace_input_with(0, query)
            node.replace_input_with(1, None)
            node.replace_input_with(2, None)
            packed.append(layer)
        self.report = {"packed": len(packed), "packed_layers": sorted(packed), "failures": failures}
        return ir.passes.PassResult(model, modified=bool(packed))
