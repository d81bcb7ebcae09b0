"""Fuse each layer's rotary embedding into its FlashAttention node (attribute rotary = 1).

Matched form (after fuse-attention + cleanup; the dynamo opset-23 export):

    x_BNSH --RotaryEmbedding(cos, sin)--> [Transpose/Reshape] --> FlashAttention.query (and .key)

where cos / sin are computed from the `position_ids` graph input alone (Cos/Sin of
position * inv_freq, with whatever rope scaling the model applies). The pass evaluates that
subgraph once for positions 0 .. max_positions - 1, stores the result as the plugin's
cos_cache / sin_cache tables, drops the two RotaryEmbedding nodes and sets rotary = 1: the
plugin rotates each row at its cache position, which is the position_ids the runtime feeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from enginesmith.passes.base import EnginePass
from enginesmith.passes.graph_walk import layer_of_plugin, plugin_nodes, walk_layout
from enginesmith.plugins.flash_attention import schema

POSITION_IDS = "position_ids"


class RotaryMatchFailure(Exception):
    """Why a layer's rotary embedding could not be fused (reported per layer)."""


@dataclass(frozen=True)
class _Rotary:
    node: ir.Node
    interleaved: int
    tables: tuple[ir.Value, ir.Value]  # the RotaryEmbedding's cos / sin inputs


class FuseRotaryIntoAttentionPass(EnginePass):
    """Move every layer's Q/K RotaryEmbedding into its FlashAttention node.

    Requires: FlashAttention nodes with separate query/key inputs (run before QKV packing).
    Ensures: fused layers have rotary = 1 and cos/sin cache inputs; no RotaryEmbedding feeds them.
    """

    name = "fuse-rotary"

    def __init__(self, head_dim: int, max_positions: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        tables: dict[tuple[int, int], tuple[ir.Value, ir.Value]] = {}
        fused: list[int] = []
        failures: dict[str, str] = {}
        for node in plugin_nodes(graph):
            layer = layer_of_plugin(node)
            try:
                q_rot, k_rot = self._match(node)
                key = (id(q_rot.tables[0]), id(q_rot.tables[1]))
                if key not in tables:
                    tables[key] = self._tables(graph, *q_rot.tables, len(tables))
            except RotaryMatchFailure as why:
                failures[f"layer {layer}"] = str(why)
                continue
            for rot in (q_rot, k_rot):
                unrotated = rot.node.inputs[0]
                assert unrotated is not None  # checked by _rotary_of
                ir.convenience.replace_all_uses_with(rot.node.outputs[0], unrotated)
                graph.remove(rot.node, safe=True)
            node.attributes["rotary"] = ir.AttrInt64("rotary", 1)
            node.attributes["rotary_interleaved"] = ir.AttrInt64(
                "rotary_interleaved", q_rot.interleaved
            )
            node.resize_inputs(schema.SIN_CACHE + 1)
            node.replace_input_with(schema.COS_CACHE, tables[key][0])
            node.replace_input_with(schema.SIN_CACHE, tables[key][1])
            fused.append(layer)
        self.report = {
            "fused": len(fused),
            "fused_layers": sorted(fused),
            "tables": len(tables),
            "failures": failures,
        }
        return ir.passes.PassResult(model, modified=bool(fused))

    # -- matching ---------------------------------------------------------------------------

    def _match(self, node: ir.Node) -> tuple[_Rotary, _Rotary]:
        attrs = node.attributes
        if attrs.get_int("rotary", 0):
            raise RotaryMatchFailure("already has rotary")
        query, key = node.inputs[0], node.inputs[1]
        if query is None or key is None:
            raise RotaryMatchFailure("packed QKV: fuse rotary before packing")
        q_rot, k_rot = self._rotary_of(query, "query"), self._rotary_of(key, "key")
        if q_rot.tables != k_rot.tables or q_rot.interleaved != k_rot.interleaved:
            raise RotaryMatchFailure("query and key rotaries use different tables or layouts")
        return q_rot, k_rot

    def _rotary_of(self, value: ir.Value, what: str) -> _Rotary:
        source, _ = walk_layout(value)
        rot = source.producer()
        if rot is None or rot.op_type != "RotaryEmbedding" or rot.domain not in ("", "ai.onnx"):
            found = rot.op_type if rot is not None else "a graph input"
            raise RotaryMatchFailure(f"{what}: expected RotaryEmbedding before it, found {found}")
        if len(rot.inputs) > 3 and rot.inputs[3] is not None:
            raise RotaryMatchFailure(f"{what}: RotaryEmbedding with position_ids input")
        if len(source.uses()) != 1:
            raise RotaryMatchFailure(f"{what}: rotated tensor has other consumers")
        x = rot.inputs[0]
        if x is None or x.shape is None or x.shape.rank() != 4 or x.shape[-1] != self.head_dim:
            raise RotaryMatchFailure(f"{what}: RotaryEmbedding input is not [B, N, S, head_dim]")
        rotary_dim = rot.attributes.get_int("rotary_embedding_dim", 0)
        if rotary_dim not in (0, self.head_dim):
            raise RotaryMatchFailure(f"{what}: partial rotary ({rotary_dim} of {self.head_dim})")
        cos, sin = rot.inputs[1], rot.inputs[2]
        assert cos is not None and sin is not None
        return _Rotary(rot, rot.attributes.get_int("interleaved", 0), (cos, sin))

    def _tables(
        self, graph: ir.Graph, cos: ir.Value, sin: ir.Value, index: int
    ) -> tuple[ir.Value, ir.Value]:
        """Evaluate cos/sin for every position: [max_positions, head_dim / 2] initializers."""
        cos_t, sin_t = _evaluate_from_positions(graph, [cos, sin], self.max_positions)
        half = self.head_dim // 2
        for t in (cos_t, sin_t):
            if t.shape != (1, self.max_positions, half):
                raise RotaryMatchFailure(f"cos/sin have shape {t.shape}, expected [B, S, {half}]")
        values = []
        for name, t in (("cos", cos_t), ("sin", sin_t)):
            v = ir.Value(name=f"rotary_{name}_cache_{index}", const_value=ir.tensor(t[0]))
            graph.register_initializer(v)
            values.append(v)
        return values[0], values[1]


def _evaluate_from_positions(
    graph: ir.Graph, outputs: list[ir.Value], max_positions: int
) -> list[np.ndarray]:
    """Run the subgraph that computes OUTPUTS for position_ids = [[0 .. max_positions - 1]].

    Fails if it depends on any graph input other than position_ids (e.g. on the batch shape of
    input_ids), since the tables must be the same for every request."""
    nodes: dict[int, ir.Node] = {}
    initializers: dict[str, ir.Value] = {}
    stack = list(outputs)
    while stack:
        value = stack.pop()
        producer = value.producer()
        if producer is None:
            if value.is_initializer() or value.const_value is not None:
                initializers[str(value.name)] = value
            elif value.name != POSITION_IDS:
                raise RotaryMatchFailure(f"cos/sin depend on graph input {value.name!r}")
            continue
        if id(producer) not in nodes:
            nodes[id(producer)] = producer
            stack.extend(v for v in producer.inputs if v is not None)
    order = [n for n in graph if id(n) in nodes]  # graph order is topological
    position_ids = onnx.helper.make_tensor_value_info(POSITION_IDS, onnx.TensorProto.INT64, None)
    tensors = []
    for name, value in initializers.items():
        tensor = ir.serde.serialize_tensor(value.const_value)  # type: ignore[arg-type]
        tensor.name = name
        tensors.append(tensor)
    outputs_info = [
        onnx.helper.make_tensor_value_info(str(v.name), onnx.TensorProto.FLOAT, None)
        for v in outputs
    ]
    proto = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in order],
        "rotary_tables",
        [position_ids],
        outputs_info,
        tensors,
    )
    opsets = [onnx.helper.make_opsetid("", graph.opset_imports.get("", 23))]
    model = onnx.helper.make_model(proto, opset_imports=opsets, ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {POSITION_IDS: np.arange(max_positions, dtype=np.int64)[None]}
    return [np.asarray(a, np.float32) for a in session.run(None, feed)]
