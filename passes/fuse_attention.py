"""Fuse each layer's attention (+ its KV-cache Concat and repeat-KV Expand) into one
FlashAttention plugin node over an in-place KV cache.

Matched forms (torch dynamo export; `compiler.export.export_model(opset=, attn_implementation=)`):

    past_key.i --[Slice]--> Concat(axis=-2) <-- key_BHkvSD (rotary applied)
                              |--[Slice]--> present_key.i              (graph output)
                              '--[Unsqueeze -> Expand -> Reshape]--> key_BHSD  (repeat_kv, GQA)

    onnx_attention (opset >= 23, SDPA):
        query_BHSD --> Attention(Q, key_BHSD, value_BHSD, mask) --> out_BHSD

    decomposed (eager attention, or SDPA below opset 23), see attention_patterns.py:
        scores_BHSS = MatMul(query_BHSD [* s_q], K^T [* s_k]) [* s | / d]
        probs_BHSS  = Softmax(Add(scores, mask) | Where(mask, scores, -big), axis=-1)
                      [-> Where(IsNaN(probs), 0, probs)]        (SDPA's all-masked-row guard)
        out_BHSD    = MatMul(probs, value_BHSD)
      with K^T = Transpose(key_BHSD, perm=[0,1,3,2]) or Reshape(Transpose(Reshape(key_BHSD,
      [-1, S, D]), perm=[0,2,1]), [B, H, D, S]), and scale = s_q * s_k * s (or / d).

Rewritten form (both):

    query_BSD = Reshape(Transpose(query_BHSD))  (same for key/value)
    out_BSD, present_key.i, present_value.i = FlashAttention(query_BSD, key_BSD, value_BSD,
                                                  past_key.i, past_value.i, seqlens_k, query_seqlens)
    out_BHSD = Transpose(Reshape(out_BSD))

past_key.i / present_key.i become [batch, kv_heads, max_seq_len, head_dim] buffers the runtime
binds to one preallocated array. What the old chain leaves dead (Softmax, mask subgraph, cache
Concat, repeat-KV Expand) is removed here. The causal / sliding-window semantics come from the
model config (constructor arguments): the exporter's mask subgraph is not re-derived, only
required to exist, so that a non-causal attention is never fused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from enginesmith.passes import attention_patterns
from enginesmith.passes.attention_patterns import MatchFailure
from enginesmith.passes.base import EnginePass
from enginesmith.plugins.flash_attention import schema

__all__ = ["FORMS", "FuseAttentionPass", "MatchFailure"]

_REPEAT_KV_OPS = ("Reshape", "Expand", "Unsqueeze")
FORMS = ("onnx_attention", "decomposed")
# The dynamo exporter records each node's module path; it names the layer of a failed match.
_LAYER_SCOPE = re.compile(r"\blayers\.(\d+)\b")


@dataclass
class _CacheChain:
    past_input: ir.Value  # graph input past_{key,value}.i
    new_states: ir.Value  # [B, Hkv, S, D], rotary applied for keys
    present_output_index: int  # index into graph.outputs


@dataclass
class _AttentionMatch:
    """One layer's attention, whatever its exported form, as the rewrite needs it."""

    query_BHSD: ir.Value
    key: _CacheChain
    value: _CacheChain
    scale: float
    output_BHSD: ir.Value  # the value the fused output replaces
    root: ir.Node  # produces output_BHSD; removed with whatever only it used


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


def _layer_label(node: ir.Node) -> str:
    """'layer 3 (node_Softmax_12)' when the exporter recorded the module path, else the name."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes", "")
    found = _LAYER_SCOPE.search(scopes)
    name = node.name or node.op_type
    return f"layer {found.group(1)} ({name})" if found else name


def _remove_dead(graph: ir.Graph, roots: list[ir.Node]) -> None:
    """Remove ROOTS and, transitively, their producers once nothing uses their outputs."""
    outputs = frozenset(graph.outputs)
    work = list(roots)
    while work:
        node = work.pop()
        if node.graph is not graph or any(o.uses() or o in outputs for o in node.outputs):
            continue
        work += [p for p in (v.producer() for v in node.inputs if v is not None) if p]
        graph.remove(node, safe=True)


def _find_blocks(graph: ir.Graph) -> list[tuple[str, ir.Node]]:
    """(form, anchor node) for every attention block, in graph order."""
    blocks = []
    for node in graph:
        if node.domain != "":
            continue
        if node.op_type == "Attention":
            blocks.append(("onnx_attention", node))
        elif node.op_type == "Softmax" and attention_patterns.feeds_matmul(node):
            blocks.append(("decomposed", node))
    return blocks


class FuseAttentionPass(EnginePass):
    """Replace every exported attention block with one FlashAttention node.

    Requires: a graph exported by `compiler.export` (graph inputs past_key.i / past_value.i).
    Ensures: unless a layer failed to match (see report["failures"]), no ONNX Attention node
    and no Softmax-centred attention chain is left; every layer's cache is an in-place buffer.
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
        blocks = _find_blocks(graph)
        seqlens_k = self._graph_input(graph, schema.SEQLENS_K)
        query_seqlens = self._graph_input(graph, schema.QUERY_SEQLENS)
        fused: list[int] = []
        failures: dict[str, str] = {}
        for form, node in blocks:
            try:
                if form == "onnx_attention":
                    match = self._match_onnx_attention(graph, node)
                else:
                    match = self._match_decomposed(graph, node)
                fused.append(self._rewrite(graph, match, seqlens_k, query_seqlens))
            except MatchFailure as why:
                failures[_layer_label(node)] = f"{form}: {why}"
        if fused:
            model.opset_imports.setdefault(schema.DOMAIN, schema.VERSION)
        self.report = {
            "attention_nodes": len(blocks),
            "forms": {form: sum(f == form for f, _ in blocks) for form in FORMS},
            "fused": len(fused),
            "fused_layers": sorted(fused),
            "failures": failures,
        }
        return ir.passes.PassResult(model, modified=bool(fused))

    def ensures(self, model: ir.Model) -> None:
        left = [node.name for _, node in _find_blocks(model.graph)]
        if left and not self.report.get("failures"):
            raise ir.passes.PostconditionError(
                f"{self.name}: attention left unfused without a reported failure: {left} "
                "[developer error]"
            )

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

    def _match_onnx_attention(self, graph: ir.Graph, attn: ir.Node) -> _AttentionMatch:
        if len(attn.inputs) < 3 or any(v is None for v in attn.inputs[:3]):
            raise MatchFailure("Attention without Q, K and V inputs")
        if any(o.uses() or graph.outputs.count(o) for o in attn.outputs[1:]):
            raise MatchFailure("Attention's present/qk outputs are used (cache inside attention)")
        if attn.attributes.get_float("softcap", 0.0):
            raise MatchFailure("softcap is not supported by FlashAttention v1")
        has_mask = len(attn.inputs) > 3 and attn.inputs[3] is not None
        if not has_mask and not attn.attributes.get_int("is_causal", 0):
            raise MatchFailure("Attention has neither an attn_mask nor is_causal: not causal")
        scale = attn.attributes.get_float("scale", 1.0 / float(np.sqrt(self.head_dim)))
        return _AttentionMatch(
            query_BHSD=attn.inputs[0],  # type: ignore[arg-type]
            key=self._cache_chain(graph, attn.inputs[1], "key"),  # type: ignore[arg-type]
            value=self._cache_chain(graph, attn.inputs[2], "value"),  # type: ignore[arg-type]
            scale=scale,
            output_BHSD=attn.outputs[0],
            root=attn,
        )

    def _match_decomposed(self, graph: ir.Graph, softmax: ir.Node) -> _AttentionMatch:
        chain = attention_patterns.match_decomposed(softmax)
        try:
            key = self._cache_chain(graph, chain.key_BHSD, "key")
            value = self._cache_chain(graph, chain.value_BHSD, "value")
        except MatchFailure as why:
            raise MatchFailure(f"Softmax chain found, but its {why}") from None
        return _AttentionMatch(
            chain.query_BHSD, key, value, chain.scale, chain.output_BHSD, chain.root
        )

    def _check_heads(self, value: ir.Value, num_heads: int, what: str) -> None:
        """A [B, H, S, D] input with a known shape must have the heads the pass was built for."""
        shape = value.shape
        if shape is None:
            return
        if len(shape) != 4:
            raise MatchFailure(f"{what} has rank {len(shape)}, expected [B, H, S, D]")
        for axis, want, dim_name in ((1, num_heads, "heads"), (3, self.head_dim, "head_dim")):
            if isinstance(shape[axis], int) and shape[axis] != want:
                raise MatchFailure(f"{what} has {shape[axis]} {dim_name}, the pass expects {want}")

    # -- rewriting --------------------------------------------------------------------------

    def _rewrite(
        self, graph: ir.Graph, match: _AttentionMatch, seqlens_k: ir.Value, query_seqlens: ir.Value
    ) -> int:
        key, value = match.key, match.value
        self._check_heads(match.query_BHSD, self.num_heads, "query")
        self._check_heads(key.new_states, self.num_kv_heads, "new keys")
        self._check_heads(value.new_states, self.num_kv_heads, "new values")
        if not (np.isfinite(match.scale) and match.scale > 0):
            raise MatchFailure(f"softmax scale {match.scale} is not a positive finite number")
        layer = int(key.past_input.name.rsplit(".", 1)[1])  # type: ignore[union-attr]
        attrs = schema.FlashAttentionAttrs(
            num_heads=self.num_heads,
            kv_num_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            scale=match.scale,
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

        q_bsd = bhsd_to_bsd(match.query_BHSD, "q")
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
        graph.insert_before(match.root, new_nodes)
        ir.convenience.replace_all_uses_with(match.output_BHSD, out_bhsd.outputs[0])

        # The caches become fixed-capacity buffers aliased by the runtime (past == present).
        dead = [match.root]
        for chain, fa_out in ((key, fa.outputs[1]), (value, fa.outputs[2])):
            old = graph.outputs[chain.present_output_index]
            fa_out.name, old.name = old.name, f"{old.name}_unfused"
            graph.outputs[chain.present_output_index] = fa_out
            dead.append(old.producer())  # type: ignore[arg-type]
            batch_dim = chain.past_input.shape[0] if chain.past_input.shape else "batch"
            chain.past_input.shape = ir.Shape(
                [batch_dim, self.num_kv_heads, self.max_seq_len_dim, self.head_dim]
            )
            fa_out.shape = chain.past_input.shape
            fa_out.type = chain.past_input.type
        fa.outputs[0].type = match.query_BHSD.type
        # Softmax, the mask subgraph (once its last layer is fused), the Concat and repeat-KV.
        _remove_dead(graph, dead)
        return layer
