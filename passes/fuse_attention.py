"""Fuse each layer's attention (+ its KV-cache Concat and repeat-KV Expand) into one
FlashAttention plugin node over an in-place KV cache.

Matched form (torch dynamo export, opset 23, SDPA attention):

    past_key.i --[Slice]--> Concat(axis=-2) <-- key_BHkvSD (rotary applied)
                              |--[Slice]--> present_key.i              (graph output)
                              '--[Unsqueeze -> Expand -> Reshape]--> Attention.K  (repeat_kv, GQA)
    query_BHSD --> Attention(Q, K, V, causal mask) --> out_BHSD

Rewritten form:

    query_BSD = Reshape(Transpose(query_BHSD))  (same for key/value)
    out_BSD, present_key.i, present_value.i = FlashAttention(query_BSD, key_BSD, value_BSD,
                                                  past_key.i, past_value.i, seqlens_k, query_seqlens)
    out_BHSD = Transpose(Reshape(out_BSD))

past_key.i / present_key.i become [batch, kv_heads, max_seq_len, head_dim] buffers the runtime
binds to one preallocated array. The causal mask chain becomes dead and is removed by cleanup.
The causal / sliding-window semantics come from the model config (constructor arguments): the
exporter's mask subgraph is not re-derived.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from enginesmith.passes.base import EnginePass
from enginesmith.plugins.flash_attention import schema

_REPEAT_KV_OPS = ("Reshape", "Expand", "Unsqueeze")


class MatchFailure(Exception):
    """Why an Attention node could not be fused (reported per layer)."""


@dataclass
class _CacheChain:
    past_input: ir.Value  # graph input past_{key,value}.i
    new_states: ir.Value  # [B, Hkv, S, D], rotary applied for keys
    present_output_index: int  # index into graph.outputs


def _producer_op(value: ir.Value | None) -> str | None:
    node = value.producer() if value is not None else None
    return node.op_type if node is not None else None


def _strip(value: ir.Value, ops: tuple[str, ...]) -> ir.Value:
    """Walk up through single-input-data ops (data is input 0) in OPS."""
    node = value.producer()
    while node is not None and node.op_type in ops and node.inputs[0] is not None:
        value = node.inputs[0]
        node = value.producer()
    return value


class FuseAttentionPass(EnginePass):
    """Replace every exported attention block with one FlashAttention node.

    Requires: a graph exported by `compiler.export` (graph inputs past_key.i / past_value.i).
    Ensures: no ONNX Attention node is left; every layer's cache is an in-place buffer.
    """

    name = "fuse-attention"

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        sliding_window: int | None = None,
        max_seq_len_dim: str | int = "max_seq_len",
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.local_window_size = schema.window_from_hf(sliding_window)
        self.max_seq_len_dim = max_seq_len_dim

    def requires(self, model: ir.Model) -> None:
        names = {v.name for v in model.graph.inputs}
        if "past_key.0" not in names:
            raise ir.passes.PreconditionError(
                f"{self.name}: graph has no past_key.0 input; run it on compiler.export output"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        seqlens_k = self._graph_input(graph, schema.SEQLENS_K)
        query_seqlens = self._graph_input(graph, schema.QUERY_SEQLENS)
        attention_nodes = [n for n in graph if n.op_type == "Attention" and n.domain == ""]
        fused: list[int] = []
        failures: dict[str, str] = {}
        for node in attention_nodes:
            try:
                layer = self._fuse_one(graph, node, seqlens_k, query_seqlens)
                fused.append(layer)
            except MatchFailure as why:
                failures[node.name or "?"] = str(why)
        if fused:
            model.opset_imports.setdefault(schema.DOMAIN, schema.VERSION)
        self.report = {
            "attention_nodes": len(attention_nodes),
            "fused": len(fused),
            "fused_layers": sorted(fused),
            "failures": failures,
        }
        return ir.passes.PassResult(model, modified=bool(fused))

    def ensures(self, model: ir.Model) -> None:
        left = [n.name for n in model.graph if n.op_type == "Attention" and n.domain == ""]
        if left and not self.report.get("failures"):
            raise ir.passes.PostconditionError(f"{self.name}: Attention nodes left: {left}")

    # -- matching ---------------------------------------------------------------------------

    def _graph_input(self, graph: ir.Graph, name: str) -> ir.Value:
        for value in graph.inputs:
            if value.name == name:
                return value
        batch = graph.inputs[0].shape[0] if graph.inputs[0].shape else "batch"
        value = ir.Value(name=name, shape=ir.Shape([batch]), type=ir.TensorType(ir.DataType.INT32))
        graph.inputs.append(value)
        return value

    def _cache_chain(self, graph: ir.Graph, attn_input: ir.Value, kind: str) -> _CacheChain:
        concat_out = _strip(attn_input, _REPEAT_KV_OPS)
        concat = concat_out.producer()
        if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2:
            raise MatchFailure(
                f"{kind}: expected Concat(past, new) feeding attention, found {_producer_op(concat_out)}"
            )
        axis = concat.attributes.get_int("axis", 0)
        if axis not in (2, -2):
            raise MatchFailure(
                f"{kind}: cache Concat on axis {axis}, expected the sequence axis (2)"
            )
        past = _strip(concat.inputs[0], ("Slice",))  # type: ignore[arg-type]
        if past.producer() is not None or not (past.name or "").startswith(f"past_{kind}."):
            raise MatchFailure(
                f"{kind}: cache Concat does not start from a past_{kind}.i graph input"
            )
        layer = past.name.rsplit(".", 1)[1]  # type: ignore[union-attr]
        present_name = f"present_{kind}.{layer}"
        index = next((i for i, v in enumerate(graph.outputs) if v.name == present_name), None)
        if index is None:
            raise MatchFailure(f"{kind}: graph output {present_name} not found")
        if _strip(graph.outputs[index], ("Slice",)) is not concat_out:
            raise MatchFailure(f"{kind}: {present_name} is not the cache Concat's output")
        return _CacheChain(past, concat.inputs[1], index)  # type: ignore[arg-type]

    def _fuse_one(
        self, graph: ir.Graph, attn: ir.Node, seqlens_k: ir.Value, query_seqlens: ir.Value
    ) -> int:
        if len(attn.inputs) < 3 or any(v is None for v in attn.inputs[:3]):
            raise MatchFailure("Attention without Q, K and V inputs")
        if any(o.uses() or graph.outputs.count(o) for o in attn.outputs[1:]):
            raise MatchFailure("Attention's present/qk outputs are used (cache inside attention)")
        if attn.attributes.get_float("softcap", 0.0):
            raise MatchFailure("softcap is not supported by FlashAttention v1")
        query_bhsd = attn.inputs[0]
        key = self._cache_chain(graph, attn.inputs[1], "key")  # type: ignore[arg-type]
        value = self._cache_chain(graph, attn.inputs[2], "value")  # type: ignore[arg-type]
        layer = int(key.past_input.name.rsplit(".", 1)[1])  # type: ignore[union-attr]
        scale = attn.attributes.get_float("scale", 1.0 / float(np.sqrt(self.head_dim)))
        attrs = schema.FlashAttentionAttrs(
            num_heads=self.num_heads,
            kv_num_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            scale=scale,
            local_window_size=self.local_window_size,
        )

        def const(name: str, data: list[int]) -> ir.Value:
            v = ir.Value(name=f"{name}_{layer}", const_value=ir.tensor(np.array(data, np.int64)))
            graph.register_initializer(v)
            return v

        to_bsd = const("fa_to_bsd_shape", [0, 0, -1])
        to_bshd = const("fa_to_bshd_shape", [0, 0, self.num_heads, self.head_dim])
        new_nodes: list[ir.Node] = []

        def bhsd_to_bsd(v: ir.Value, tag: str) -> ir.Value:
            t = ir.node("Transpose", [v], {"perm": [0, 2, 1, 3]}, name=f"fa{layer}_{tag}_bshd")
            r = ir.node("Reshape", [t.outputs[0], to_bsd], name=f"fa{layer}_{tag}_bsd")
            new_nodes.extend([t, r])
            return r.outputs[0]

        q_bsd = bhsd_to_bsd(query_bhsd, "q")  # type: ignore[arg-type]
        k_bsd = bhsd_to_bsd(key.new_states, "k")
        v_bsd = bhsd_to_bsd(value.new_states, "v")
        fa = ir.node(
            schema.OP_TYPE,
            [q_bsd, k_bsd, v_bsd, key.past_input, value.past_input, seqlens_k, query_seqlens],
            attrs.as_node_attributes(),
            domain=schema.DOMAIN,
            num_outputs=len(schema.OUTPUTS),
            name=f"flash_attention_{layer}",
        )
        out_bshd = ir.node("Reshape", [fa.outputs[0], to_bshd], name=f"fa{layer}_out_bshd")
        out_bhsd = ir.node(
            "Transpose", [out_bshd.outputs[0]], {"perm": [0, 2, 1, 3]}, name=f"fa{layer}_out_bhsd"
        )
        new_nodes += [fa, out_bshd, out_bhsd]
        graph.insert_before(attn, new_nodes)
        ir.convenience.replace_all_uses_with(attn.outputs[0], out_bhsd.outputs[0])

        # The caches become fixed-capacity buffers aliased by the runtime (past == present).
        for chain, fa_out in ((key, fa.outputs[1]), (value, fa.outputs[2])):
            old = graph.outputs[chain.present_output_index]
            fa_out.name, old.name = old.name, f"{old.name}_unfused"
            graph.outputs[chain.present_output_index] = fa_out
            batch_dim = chain.past_input.shape[0] if chain.past_input.shape else "batch"
            chain.past_input.shape = ir.Shape(
                [batch_dim, self.num_kv_heads, self.max_seq_len_dim, self.head_dim]
            )
            fa_out.shape = chain.past_input.shape
            fa_out.type = chain.past_input.type
        fa.outputs[0].type = query_bhsd.type  # type: ignore[union-attr]
        graph.remove(attn, safe=True)
        return layer
