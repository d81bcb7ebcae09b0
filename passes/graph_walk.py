"""Small graph queries shared by the fusion passes: the plugin nodes, which layer a node
belongs to, and walking through pure layout ops (Reshape / Transpose / Identity)."""

from __future__ import annotations

import onnx_ir as ir

from enginesmith.plugins.flash_attention import schema

LAYOUT_OPS = ("Reshape", "Transpose", "Identity")
_ATTENTION_OPS = {(schema.DOMAIN, schema.OP_TYPE), ("com.microsoft", "GroupQueryAttention")}


def plugin_nodes(graph: ir.Graph) -> list[ir.Node]:
    """The FlashAttention plugin nodes, in graph order."""
    return [n for n in graph if n.domain == schema.DOMAIN and n.op_type == schema.OP_TYPE]


def layer_of_plugin(node: ir.Node) -> int:
    """A FlashAttention / lowered attention node's layer: the index of its past_key.i input."""
    cache = node.inputs[3]
    name = cache.name if cache is not None else None
    if not name or not name.startswith("past_key."):
        raise ValueError(f"{node.name}: input 3 is not a past_key.i graph input [developer error]")
    return int(name.rsplit(".", 1)[1])


def layer_index(graph: ir.Graph) -> dict[int, int]:
    """id(node) -> decoder layer for every node: the layer of the last attention node at or
    before it in graph order (nodes before the first attention belong to layer 0). Decoder
    stacks are exported layer by layer, so this is the layer whose MLP / norms a node is in."""
    layers: dict[int, int] = {}
    current = 0
    for node in graph:
        if (node.domain, node.op_type) in _ATTENTION_OPS:
            current = layer_of_plugin(node)
        layers[id(node)] = current
    return layers


def walk_layout(value: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
    """Walk up from VALUE through layout ops (data input 0); return the first value not
    produced by one and the layout nodes passed, nearest first."""
    passed: list[ir.Node] = []
    node = value.producer()
    while node is not None and node.op_type in LAYOUT_OPS and node.domain == "":
        data = node.inputs[0]
        if data is None:
            break
        passed.append(node)
        value = data
        node = value.producer()
    return value, passed
