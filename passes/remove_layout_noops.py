"""Remove layout ops that leave a tensor as it was: what the exporter and the fusions leave
behind around attention (Reshape [B,S,N*H] -> [B,S,N,H] -> [B,S,N*H], Identity, Cast to the
same type). Each costs a kernel launch and often a copy per layer per step.

A chain of Reshapes preserves row-major element order, so when its input and output have the
same shape it is the identity. Shapes are the exporter's annotations (symbolic dims with the same
name are equal at run time), extended here through Reshapes with constant targets and through
FlashAttention's output, whose shape is its query's (or [B, S, num_heads * head_dim] if packed).
"""

from __future__ import annotations

import onnx_ir as ir

from enginesmith.passes.base import EnginePass
from enginesmith.passes.graph_walk import plugin_nodes

Dims = list[int | str | None]


def _dims(value: ir.Value | None) -> Dims | None:
    if value is None or value.shape is None:
        return None
    out: Dims = []
    for d in value.shape:
        out.append(d if isinstance(d, int) else d.value)
    return out


def _known(dims: Dims | None) -> bool:
    return dims is not None and all(d is not None for d in dims)


def _reshape_target(node: ir.Node) -> list[int] | None:
    shape = node.inputs[1] if len(node.inputs) > 1 else None
    const = shape.const_value if shape is not None else None
    return [int(x) for x in const.numpy().reshape(-1)] if const is not None else None


def _infer_reshape(input_dims: Dims, target: list[int]) -> Dims | None:
    """Output dims of Reshape(x, target) (allowzero = 0) from symbolic input dims, when the
    -1 can be resolved with integer dims only."""
    out: Dims = []
    for i, t in enumerate(target):
        if t == 0:
            if i >= len(input_dims):
                return None
            out.append(input_dims[i])
        else:
            out.append(t)
    if -1 in out:
        copied = {i for i, t in enumerate(target) if t == 0}
        rest = [d for i, d in enumerate(input_dims) if i not in copied]
        known = [d for i, d in enumerate(out) if d != -1 and i not in copied]
        if not all(isinstance(d, int) for d in rest + known):
            return None
        total = 1
        for d in rest:
            total *= int(d)  # type: ignore[arg-type]
        for d in known:
            total //= int(d)  # type: ignore[arg-type]
        out[out.index(-1)] = total
    return out


def _annotate(graph: ir.Graph) -> None:
    """Fill in missing shapes the rules below need (graph order is topological)."""
    plugins = {id(n) for n in plugin_nodes(graph)}
    for node in graph:
        if id(node) in plugins:
            out, q = node.outputs[0], _dims(node.inputs[0])
            if out.shape is None and q is not None and len(q) == 3:
                heads = node.attributes.get_int("num_heads", 0)
                out.shape = ir.Shape([q[0], q[1], heads * node.attributes.get_int("head_dim", 0)])
        elif node.op_type == "Reshape" and node.domain == "" and node.outputs[0].shape is None:
            target, data = _reshape_target(node), _dims(node.inputs[0])
            allowzero = node.attributes.get_int("allowzero", 0)
            if target is not None and _known(data) and not allowzero:
                inferred = _infer_reshape(data, target)  # type: ignore[arg-type]
                if inferred is not None:
                    node.outputs[0].shape = ir.Shape(inferred)


class RemoveLayoutNoOpsPass(EnginePass):
    """Bypass Identity, same-type Cast and Reshape chains whose output shape equals their input
    shape; cleanup then drops the dead nodes."""

    name = "remove-layout-noops"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        _annotate(graph)
        counts = {"identity": 0, "cast": 0, "reshape_chain": 0}
        for node in list(graph):
            if node.domain != "" or not node.inputs or node.inputs[0] is None:
                continue
            out = node.outputs[0]
            source: ir.Value | None
            if out.is_graph_output():
                continue
            if node.op_type == "Identity":
                kind, source = "identity", node.inputs[0]
            elif (
                node.op_type == "Cast"
                and out.dtype is not None
                and out.dtype == node.inputs[0].dtype
            ):
                kind, source = "cast", node.inputs[0]
            elif node.op_type == "Reshape":
                kind, source = "reshape_chain", _reshape_chain_source(node)
            else:
                continue
            if source is None:
                continue
            ir.convenience.replace_all_uses_with(out, source)
            counts[kind] += 1
        self.report = counts
        return ir.passes.PassResult(model, modified=any(counts.values()))


def _reshape_chain_source(last: ir.Node) -> ir.Value | None:
    """The input of the longest Reshape chain ending at LAST whose input shape equals LAST's
    output shape, or None."""
    target = _dims(last.outputs[0])
    if not _known(target):
        return None
    node: ir.Node | None = last
    while node is not None and node.op_type == "Reshape" and node.domain == "":
        data = node.inputs[0]
        if data is None:
            return None
        if _dims(data) == target:
            return data
        node = data.producer()
    return None
