"""TensorRT lowering of FlashAttention: padded KV-cache update + attention, in one of two op sets.

The plugin's contract (schema.py: per-row lengths, right-padded rows, idle rows, in-place BNSH
cache) is expressed with ops TensorRT's ONNX parser imports as built-in layers, no plugin library:

ops="trt" (TensorRT >= 11 / TensorRT-RTX >= 1.7, `trt` domain; IKVCacheUpdateLayer + IAttention):
    present_k = TRT_KVCacheUpdate(cache_k, k_BHkvSD, write_indices)     update_form=padded_bhnd
    out_BHSD  = TRT_Attention(q_BHSD * scale, present_k, present_v, "", "", kv_lengths)
                query_form = kv_form = padded_bhnd, causal_kind = lower_right
ops="onnx" (standard ONNX, opset 24; also runs in ONNX Runtime, CPU and CUDA):
    present_k = TensorScatter(cache_k, k_BHkvSD, write_indices)         axis=-2, mode=linear
    out_BHSD  = Attention(q_BHSD, present_k, present_v, mask_B1SC)       scale=scale

Op contracts (read from the sources; docs/tensorrt.md quotes them):
- TRT_KVCacheUpdate / TRT_Attention: onnx/onnx-tensorrt docs/TRT_custom_ops.md (the revision
  whose TRT_Attention takes 3-6 inputs: Q, K, V, attn_mask, query_lengths, kv_lengths, and
  attributes query_form, kv_form, causal_kind, TRT_decomposable, TRT_normalization_op, nb_rank).
  TRT_Attention applies no scale ("does not use ... scale to reshape or scale Q/K/V"; TensorRT's
  fused-attention guide: "TensorRT requires Q or K to be multiplied with attention scale"), so Q
  is pre-scaled here. KVCacheUpdate writes update[b, :, s] at cache[b, :, write_indices[b] + s]
  in place (TensorRT operator doc KVCacheUpdate: output aliases the cache input).
- TensorScatter-24 and Attention-23/24: the ONNX operator spec. TensorRT's parser rejects
  Attention's past_key/past_value/nonpad_kv_seqlen inputs (onnx-tensorrt docs/operators.md), so
  the cache update stays outside the Attention node.
Packed (ragged, `packed_nhd`) queries are the in-flight-batching form TRT_Attention advertises,
but TensorRT-RTX 1.7.1's builder has no kernel for them (measured: "no fused packed attention
kernel is available ... and no decomposition exists" for SM80/86/89/120), while the padded form
builds: padded rows with per-row lengths are what the plugin schema is anyway.

Padding and idle rows. Both update ops write all S rows of a call, not only the Q[b] valid ones.
Row b's rows land at [P, P + S) with P = T - Q cached tokens; the rows past T are beyond the
slot's valid length, so later calls ignore them (the plugin's rollback rule). An idle row
(Q = 0) must not touch its slot at all: it writes into a scratch tail of the buffer instead,
at [C - S, C), where the cache capacity C = max_seq_len + headroom and headroom >= the largest S
of a call (the build uses max_num_tokens). Valid rows then always fit: P + S <= C.

Causal alignment. Query row s of row b sits at position P + s and may see cache positions
[lo, P + s] (lo from the sliding window). With kv_lengths = P + S and lower-right alignment
(query row s sees positions <= s + kv_length - S), TRT_Attention gives exactly that; the ONNX
form spells the same set as a boolean mask [B, 1, S, C]. TRT_Attention cannot combine a mask
with causal_kind, so a sliding window needs ops="onnx".
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from enginesmith.passes.base import EnginePass
from enginesmith.plugins.flash_attention import schema

TRT_DOMAIN = "trt"  # the domain TensorRT-Edge-LLM registers TRT_Attention in; parsed by op_type
ONNX_OPSET = 24  # TensorScatter is new in opset 24
OPS = ("trt", "onnx")
_PLAIN_INPUTS = 7  # query, key, value, cache_key, cache_value, seqlens_k, query_seqlens


class LowerFlashAttentionToTensorRT(EnginePass):
    """Rewrite every FlashAttention node into a KV-cache update + attention pair (see module doc).

    ops: "trt" (TRT_KVCacheUpdate + TRT_Attention) or "onnx" (TensorScatter + Attention).
    cache_capacity: C, the fixed sequence length of every cache buffer (max_seq_len + headroom);
        set as a static dimension of the cache inputs/outputs, which TensorRT requires for
        in-place updates. None keeps the graph's symbolic dimension (tests).
    """

    name = "lower-flash-attention-trt"

    def __init__(self, ops: str = "trt", cache_capacity: int | None = None) -> None:
        super().__init__()
        if ops not in OPS:
            raise ValueError(f"ops must be one of {OPS} (got {ops!r}) [developer error]")
        self.ops = ops
        self.cache_capacity = cache_capacity

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = [n for n in graph if n.domain == schema.DOMAIN and n.op_type == schema.OP_TYPE]
        for node in nodes:
            _check_plain_form(node)
            attrs = schema.FlashAttentionAttrs.from_node_attributes(
                {k: a.value for k, a in node.attributes.items()}
            )
            if self.ops == "trt" and attrs.local_window_size > 0:
                raise ValueError(
                    f"{node.name}: a sliding window (local_window_size={attrs.local_window_size})"
                    " needs a mask, which TRT_Attention cannot combine with causal masking: "
                    "build with --trt-attention onnx"
                )
        shared: _SharedIndices | None = None
        for node in nodes:
            attrs = schema.FlashAttentionAttrs.from_node_attributes(
                {k: a.value for k, a in node.attributes.items()}
            )
            new_nodes: list[ir.Node] = []
            if shared is None:
                shared = _SharedIndices.build(graph, node, self.ops, new_nodes)
            outputs = self._lower_one(graph, node, attrs, shared, new_nodes)
            graph.insert_before(node, new_nodes)
            for old, new in zip(node.outputs, outputs, strict=True):
                new.name, new.shape, new.type = old.name, old.shape, old.type
                old.name = None
                ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            graph.remove(node, safe=True)
        if nodes:
            model.opset_imports[""] = max(model.opset_imports.get("", ONNX_OPSET), ONNX_OPSET)
            if self.ops == "trt":
                model.opset_imports.setdefault(TRT_DOMAIN, 1)
            if not any(n.domain == schema.DOMAIN for n in graph):
                model.opset_imports.pop(schema.DOMAIN, None)
            self._set_cache_capacity(graph)
        self.report = {
            "lowered": len(nodes),
            "ops": self.ops,
            "cache_capacity": self.cache_capacity,
        }
        return ir.passes.PassResult(model, modified=bool(nodes))

    def ensures(self, model: ir.Model) -> None:
        left = [n.name for n in model.graph if n.domain == schema.DOMAIN]
        if left:
            raise ir.passes.PostconditionError(f"{self.name}: FlashAttention nodes left: {left}")

    # -- one layer ----------------------------------------------------------------------------

    def _lower_one(
        self,
        graph: ir.Graph,
        node: ir.Node,
        attrs: schema.FlashAttentionAttrs,
        shared: _SharedIndices,
        new_nodes: list[ir.Node],
    ) -> list[ir.Value]:
        query, key, value, cache_k, cache_v = node.inputs[:5]
        tag = node.name or f"fa{len(new_nodes)}"
        n, nkv, h = attrs.num_heads, attrs.kv_num_heads, attrs.head_dim

        consts: dict[str, ir.Value] = {}

        def const(name: str, array: np.ndarray) -> ir.Value:
            if name not in consts:
                consts[name] = ir.Value(name=f"{tag}_{name}", const_value=ir.tensor(array))
                graph.register_initializer(consts[name])
            return consts[name]

        def add(op: str, inputs: list[ir.Value | None], attributes=None, domain: str = ""):  # type: ignore[no-untyped-def]
            name = f"{tag}_{op.lower()}_{len(new_nodes)}"
            new = ir.node(op, inputs, attributes or {}, domain=domain, name=name)
            new_nodes.append(new)
            return new.outputs[0]

        def to_bhsd(v: ir.Value, heads: int) -> ir.Value:
            # [B, S, heads * H] -> [B, heads, S, H]
            bshd = add("Reshape", [v, const(f"bshd{heads}", np.array([0, 0, heads, h], np.int64))])
            return add("Transpose", [bshd], {"perm": [0, 2, 1, 3]})

        q_bhsd = to_bhsd(query, n)  # type: ignore[arg-type]
        k_bhkvsd = to_bhsd(key, nkv)  # type: ignore[arg-type]
        v_bhkvsd = to_bhsd(value, nkv)  # type: ignore[arg-type]
        if self.ops == "trt":
            update = {"update_form": "padded_bhnd", "mode": "linear", "axis": -2}
            present_k = add(
                "TRT_KVCacheUpdate", [cache_k, k_bhkvsd, shared.write_indices], update, TRT_DOMAIN
            )
            present_v = add(
                "TRT_KVCacheUpdate", [cache_v, v_bhkvsd, shared.write_indices], update, TRT_DOMAIN
            )
            # Float constants are created in fp32; the dtype pass casts them with the weights.
            scaled_q = add("Mul", [q_bhsd, const("scale", np.array(attrs.scale, np.float32))])
            out_bhsd = add(
                "TRT_Attention",
                [scaled_q, present_k, present_v, None, None, shared.kv_lengths],
                {
                    "query_form": "padded_bhnd",
                    "kv_form": "padded_bhnd",
                    "causal_kind": "lower_right",
                },
                TRT_DOMAIN,
            )
        else:
            present_k = add(
                "TensorScatter", [cache_k, k_bhkvsd, shared.write_indices], {"axis": -2}
            )
            present_v = add(
                "TensorScatter", [cache_v, v_bhkvsd, shared.write_indices], {"axis": -2}
            )
            mask = shared.mask(graph, attrs.local_window_size, new_nodes)
            out_bhsd = add(
                "Attention", [q_bhsd, present_k, present_v, mask], {"scale": float(attrs.scale)}
            )
        out_bshd = add("Transpose", [out_bhsd], {"perm": [0, 2, 1, 3]})
        out_bsd = add("Reshape", [out_bshd, const("bsd", np.array([0, 0, n * h], np.int64))])
        return [out_bsd, present_k, present_v]

    def _set_cache_capacity(self, graph: ir.Graph) -> None:
        if self.cache_capacity is None:
            return
        for value in [*graph.inputs, *graph.outputs]:
            name = value.name or ""
            if name.startswith(("past_key.", "past_value.", "present_key.", "present_value.")):
                dims = list(value.shape) if value.shape is not None else []
                if len(dims) == 4:
                    dims[2] = self.cache_capacity
                    value.shape = ir.Shape(dims)


def _check_plain_form(node: ir.Node) -> None:
    """This lowering handles the 7-input form only (rotary and packed QKV are produced by the
    ONNX Runtime pipeline's passes, which the TensorRT pipeline does not run)."""
    rotary = node.attributes.get_int("rotary", 0)
    inputs = list(node.inputs)
    extra = [v for v in inputs[_PLAIN_INPUTS:] if v is not None]
    if rotary or extra:
        raise ValueError(
            f"{node.name}: FlashAttention with fused rotary (cos/sin inputs) is not supported by "
            "the TensorRT lowering; run it on the plugin op before rotary fusion [developer error]"
        )
    if len(inputs) < _PLAIN_INPUTS or any(v is None for v in inputs[:_PLAIN_INPUTS]):
        raise ValueError(
            f"{node.name}: FlashAttention with packed QKV (empty key/value inputs) is not "
            "supported by the TensorRT lowering; lower it before QKV packing [developer error]"
        )


class _SharedIndices:
    """Per-call index tensors every layer shares (built once, before the first layer):

    write_indices [B]: where row b's S update rows start (P, or the scratch tail for idle rows)
    kv_lengths [B]:    P + S, the cache length each row's last query row is aligned to
    mask(window):      [B, 1, S, C] bool, cache position j visible to query row s (ops="onnx")
    """

    def __init__(
        self,
        write_indices: ir.Value,
        kv_lengths: ir.Value,
        write_i64: ir.Value,
        seq: ir.Value,
        capacity: ir.Value,
    ) -> None:
        self.write_indices, self.kv_lengths = write_indices, kv_lengths
        self._write_i64, self._seq, self._capacity = write_i64, seq, capacity
        self._masks: dict[int, ir.Value] = {}

    @classmethod
    def build(
        cls, graph: ir.Graph, node: ir.Node, ops: str, new_nodes: list[ir.Node]
    ) -> _SharedIndices:
        query, cache_k, seqlens_k, query_seqlens = (
            node.inputs[0],
            node.inputs[3],
            node.inputs[5],
            node.inputs[6],
        )

        def const(name: str, array: np.ndarray) -> ir.Value:
            v = ir.Value(name=f"fa_{name}", const_value=ir.tensor(array))
            graph.register_initializer(v)
            return v

        def add(op: str, inputs: list[ir.Value | None], name: str, attributes=None) -> ir.Value:  # type: ignore[no-untyped-def]
            new = ir.node(op, inputs, attributes or {}, name=f"fa_{name}")
            new_nodes.append(new)
            return new.outputs[0]

        one = const("one_i64", np.array([1], np.int64))
        seq = add("Shape", [query], "seq_len", {"start": 1, "end": 2})  # [1] S
        capacity = add("Shape", [cache_k], "capacity", {"start": 2, "end": 3})  # [1] C
        total = add("Add", [add("Cast", [seqlens_k], "t_i64", {"to": ir.DataType.INT64}), one], "t")
        valid = add("Cast", [query_seqlens], "q_i64", {"to": ir.DataType.INT64})
        past = add("Sub", [total, valid], "past")  # [B] P = T - Q
        idle = add("Equal", [valid, const("zero_i64", np.array([0], np.int64))], "idle")
        scratch = add("Sub", [capacity, seq], "scratch")  # [1] C - S
        write_i64 = add("Where", [idle, scratch, past], "write_i64")  # [B]
        kv_len_i64 = add("Add", [write_i64, seq], "kv_len_i64")  # [B]
        if ops == "trt":  # TRT_KVCacheUpdate / TRT_Attention take INT32 indices and lengths
            write = add("Cast", [write_i64], "write_indices", {"to": ir.DataType.INT32})
            kv_len = add("Cast", [kv_len_i64], "kv_lengths", {"to": ir.DataType.INT32})
        else:
            write, kv_len = write_i64, kv_len_i64
        return cls(write, kv_len, write_i64, seq, capacity)

    def mask(self, graph: ir.Graph, window: int, new_nodes: list[ir.Node]) -> ir.Value:
        """[B, 1, S, C] bool: cache position j is visible to query row s of row b."""
        if window in self._masks:
            return self._masks[window]
        suffix = "full" if window < 0 else f"w{window}"

        def const(name: str, array: np.ndarray) -> ir.Value:
            v = ir.Value(name=f"fa_mask_{suffix}_{name}", const_value=ir.tensor(array))
            graph.register_initializer(v)
            return v

        def add(op: str, inputs: list[ir.Value | None], name: str) -> ir.Value:
            new = ir.node(op, inputs, name=f"fa_mask_{suffix}_{name}")
            new_nodes.append(new)
            return new.outputs[0]

        zero = const("zero", np.array(0, np.int64))
        step = const("step", np.array(1, np.int64))
        axis0 = const("axis0", np.array([0], np.int64))
        seq = add("Squeeze", [self._seq, axis0], "seq_scalar")
        cap = add("Squeeze", [self._capacity, axis0], "cap_scalar")
        rows = add("Range", [zero, seq, step], "rows")  # [S]
        cols = add("Range", [zero, cap, step], "cols")  # [C]
        qpos = add(  # [B, S]: absolute position of query row s
            "Add",
            [
                add(
                    "Unsqueeze", [self._write_i64, const("axis1", np.array([1], np.int64))], "w_b1"
                ),
                add("Unsqueeze", [rows, axis0], "r"),
            ],
            "qpos",
        )
        qpos_bs1 = add("Unsqueeze", [qpos, const("axis2", np.array([2], np.int64))], "qpos3")
        cols_11c = add("Unsqueeze", [cols, const("axes01", np.array([0, 1], np.int64))], "cols3")
        visible = add("LessOrEqual", [cols_11c, qpos_bs1], "causal")  # [B, S, C]
        if window > 0:  # positions (qpos - W, qpos]
            lowest = add("Sub", [qpos_bs1, const("window", np.array(window - 1, np.int64))], "lo")
            in_window = add("GreaterOrEqual", [cols_11c, lowest], "in_window")
            visible = add("And", [visible, in_window], "windowed")
        mask = add("Unsqueeze", [visible, const("axis1b", np.array([1], np.int64))], "b1sc")
        self._masks[window] = mask
        return mask
