"""ONNX Runtime lowering of FlashAttention: com.microsoft::GroupQueryAttention.

GQA with `query_seqlens` (input 16, ORT >= 1.32) has exactly the plugin's contract: per-row
lengths, right-padded chunks, idle rows, in-place caches when past and present are bound to the
same buffer. Measured on CPU it is the only ORT kernel whose cost follows each row's real length
rather than the buffer capacity (docs/kv-cache-layout.md). Packed QKV and rotary map 1:1 onto
GQA's packed query and do_rotary (cos_cache / sin_cache inputs 7, 8): GQA rotates each row at
P + s computed from seqlens_k and query_seqlens, the plugin's rotary position (checked against
the reference in tests/test_flash_attention_plugin.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from enginesmith.passes.base import EnginePass
from enginesmith.plugins.flash_attention import schema

ORT_DOMAIN = "com.microsoft"
_QUERY_SEQLENS_INPUT = 16  # GroupQueryAttention input index of query_seqlens


def gqa_attributes(attrs: schema.FlashAttentionAttrs) -> dict[str, int | float]:
    """GroupQueryAttention's attributes for a FlashAttention node (head_dim is implied by the
    query width)."""
    return {
        "num_heads": attrs.num_heads,
        "kv_num_heads": attrs.kv_num_heads,
        "scale": attrs.scale,
        "local_window_size": attrs.local_window_size,
        "do_rotary": attrs.rotary,
        "rotary_interleaved": attrs.rotary_interleaved,
    }


def attrs_from_gqa(gqa: dict[str, Any], packed_width: int) -> schema.FlashAttentionAttrs:
    """The inverse of gqa_attributes, for a lowered node with a packed QKV query of
    PACKED_WIDTH (what the runtime's decode kernels read back off an engine)."""
    heads, kv_heads = int(gqa["num_heads"]), int(gqa["kv_num_heads"])
    head_dim = packed_width // (heads + 2 * kv_heads)
    return schema.FlashAttentionAttrs.from_node_attributes(
        {
            **gqa,
            "head_dim": head_dim,
            "scale": float(gqa.get("scale") or head_dim**-0.5),  # GQA: 0 = 1/sqrt(head_dim)
            "rotary": gqa.get("do_rotary", 0),
        }
    )


class LowerFlashAttentionToORT(EnginePass):
    """Rewrite every FlashAttention node into a GroupQueryAttention node."""

    name = "lower-flash-attention-ort"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = [n for n in graph if n.domain == schema.DOMAIN and n.op_type == schema.OP_TYPE]
        total_len: ir.Value | None = None
        for node in nodes:
            query, key, value, cache_k, cache_v, seqlens_k, query_seqlens = node.inputs[
                : schema.REQUIRED_INPUTS
            ]
            rotary_inputs = list(node.inputs[schema.COS_CACHE : schema.SIN_CACHE + 1])
            attrs = schema.FlashAttentionAttrs.from_node_attributes(
                {k: a.value for k, a in node.attributes.items()}
            )
            new_nodes: list[ir.Node] = []
            if total_len is None:
                # total_sequence_length is only an upper bound with query_seqlens: the capacity.
                axes = ir.Value(
                    name="fa_scalar_axes", const_value=ir.tensor(np.array([0], np.int64))
                )
                graph.register_initializer(axes)
                shape = ir.node("Shape", [cache_k], {"start": 2, "end": 3}, name="fa_capacity")
                cast = ir.node(
                    "Cast", [shape.outputs[0]], {"to": ir.DataType.INT32}, name="fa_capacity_i32"
                )
                squeeze = ir.node(
                    "Squeeze", [cast.outputs[0], axes], name="fa_total_sequence_length"
                )
                new_nodes += [shape, cast, squeeze]
                total_len = squeeze.outputs[0]
            gqa_inputs: list[ir.Value | None] = [
                query,
                key,
                value,
                cache_k,
                cache_v,
                seqlens_k,
                total_len,
                *(rotary_inputs if attrs.rotary else []),
            ]
            gqa_inputs += [None] * (_QUERY_SEQLENS_INPUT - len(gqa_inputs)) + [query_seqlens]
            gqa = ir.node(
                "GroupQueryAttention",
                gqa_inputs,
                gqa_attributes(attrs),
                domain=ORT_DOMAIN,
                num_outputs=3,
                name=node.name,
            )
            new_nodes.append(gqa)
            graph.insert_before(node, new_nodes)
            for old, new in zip(node.outputs, gqa.outputs, strict=True):
                new.name, new.shape, new.type = old.name, old.shape, old.type
                old.name = None
                ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            graph.remove(node, safe=True)
        if nodes:
            model.opset_imports.setdefault(ORT_DOMAIN, 1)
            if not any(n.domain == schema.DOMAIN for n in graph):
                model.opset_imports.pop(schema.DOMAIN, None)
        self.report = {"lowered": len(nodes)}
        return ir.passes.PassResult(model, modified=bool(nodes))
