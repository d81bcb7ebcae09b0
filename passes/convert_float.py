"""Convert a float32 graph to float16 or bfloat16 for strongly typed backends (TensorRT 11).

TensorRT 11 networks are strongly typed: every tensor's dtype comes from the graph, and the
builder no longer chooses precisions (BuilderFlag.FP16/BF16 were removed). So the graph itself
must say fp16 or bf16: weights, activations, KV-cache inputs and outputs.

Two things stay float32 on purpose:
- position arithmetic: the exporter computes rotary angles as float(position) * inv_freq before
  Cos/Sin. In fp16 a position above 2048 is not even representable exactly and the angle error
  reaches tenths of a radian, so every node fed (only) by an integer->float Cast stays fp32 up
  to the first node that also reads activations; a Cast to the target dtype is put in between.
- the outputs named in `float32_outputs` (the logits: the sampler works in fp32, and
  top-1/top-p decisions between close logits should not depend on fp16 rounding of the output).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from enginesmith.passes.base import EnginePass

DTYPES = {"float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}
_FLOAT = ir.DataType.FLOAT
_INTEGER = {
    ir.DataType.INT64,
    ir.DataType.INT32,
    ir.DataType.INT16,
    ir.DataType.INT8,
    ir.DataType.UINT8,
    ir.DataType.BOOL,
}
# Ops that may sit in the fp32 position-arithmetic island.
_ISLAND_OPS = {
    "Mul",
    "Div",
    "Add",
    "Sub",
    "Cos",
    "Sin",
    "MatMul",
    "Unsqueeze",
    "Reshape",
    "Transpose",
    "Concat",
    "Expand",
    "Gather",
    "Slice",
    "Squeeze",
    "Identity",
}


class ConvertFloatPass(EnginePass):
    """Rewrite every float32 tensor of the graph to DTYPE (see module doc for the exceptions)."""

    name = "convert-float"

    def __init__(self, dtype: str = "float16", float32_outputs: Iterable[str] = ("logits",)):
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)} (got {dtype!r})")
        self.dtype = dtype
        self.target = DTYPES[dtype]
        self.float32_outputs = frozenset(float32_outputs)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        island = self._position_island(graph)
        counts = {"initializers": 0, "casts_retargeted": 0, "boundary_casts": 0}
        self._convert_initializers(graph, island, counts)
        for value in graph.inputs:
            if value.dtype == _FLOAT:
                value.dtype = self.target
        for node in graph:
            in_island = node in island
            if (
                node.op_type == "Cast"
                and node.attributes.get_int("to", 0) == _FLOAT
                and not in_island
            ):
                node.attributes["to"] = ir.AttrInt64("to", self.target)
                counts["casts_retargeted"] += 1
            if node.op_type == "Constant" and not in_island:
                self._convert_constant_node(node)
            if not in_island:
                for value in node.outputs:
                    if value.dtype == _FLOAT:
                        value.dtype = self.target
        counts["boundary_casts"] = self._cast_island_boundary(graph, island)
        counts["float32_outputs"] = self._restore_float32_outputs(graph)
        counts["fp32_island_nodes"] = len(island)
        self.report = {"dtype": self.dtype, **counts}
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        graph = model.graph
        stray = [
            v.name
            for v in graph.inputs
            if v.dtype == _FLOAT
            # graph outputs kept in fp32 are allowed; inputs never are
        ]
        if stray:
            raise ir.passes.PostconditionError(f"{self.name}: float32 graph inputs left: {stray}")

    # -- the fp32 island -------------------------------------------------------------------

    def _position_island(self, graph: ir.Graph) -> set[ir.Node]:
        """Nodes computing from integers only: integer->float Casts and what they alone feed."""
        island: set[ir.Node] = set()
        for node in graph:  # topological order
            if node.op_type == "Cast" and node.attributes.get_int("to", 0) == _FLOAT:
                source = node.inputs[0]
                if source is not None and source.dtype in _INTEGER:
                    island.add(node)
                continue
            if node.op_type not in _ISLAND_OPS:
                continue
            float_inputs = [v for v in node.inputs if v is not None and v.dtype == _FLOAT]
            from_island = [v.producer() in island for v in float_inputs]
            if any(from_island) and all(
                inside or _is_constant(v)
                for v, inside in zip(float_inputs, from_island, strict=True)
            ):
                island.add(node)
        return island

    def _cast_island_boundary(self, graph: ir.Graph, island: set[ir.Node]) -> int:
        """Insert Cast(fp32 -> target) where an island value feeds a converted node."""
        casts = 0
        for node in list(island):
            for value in node.outputs:
                outside = [(user, i) for user, i in value.uses() if user not in island]
                if not outside and value not in graph.outputs:
                    continue
                if not outside:
                    continue
                cast = ir.node(
                    "Cast", [value], {"to": self.target}, name=f"{value.name}_to_{self.dtype}"
                )
                cast.outputs[0].name = f"{value.name}_{self.dtype}"
                cast.outputs[0].dtype = self.target
                cast.outputs[0].shape = value.shape
                graph.insert_after(node, cast)
                for user, index in outside:
                    user.replace_input_with(index, cast.outputs[0])
                casts += 1
        return casts

    # -- tensors ------------------------------------------------------------------------------

    def _convert_initializers(
        self, graph: ir.Graph, island: set[ir.Node], counts: dict[str, int]
    ) -> None:
        for name, value in list(graph.initializers.items()):
            # A Value made from a tensor does not always carry its type: read the tensor's.
            if value.const_value is None or value.const_value.dtype != _FLOAT:
                continue
            users = [user for user, _ in value.uses()]
            island_users = [u for u in users if u in island]
            if island_users and len(island_users) == len(users):
                continue  # read by position arithmetic only: stays fp32
            converted = ir.Value(
                name=f"{name}_{self.dtype}" if island_users else name,
                const_value=self._convert_tensor(value.const_value, name),
            )
            if island_users:  # read by both sides: a converted copy for the other side
                graph.register_initializer(converted)
                for user, index in list(value.uses()):
                    if user not in island:
                        user.replace_input_with(index, converted)
            else:
                value.const_value = converted.const_value
                value.dtype = self.target
            counts["initializers"] += 1

    def _convert_constant_node(self, node: ir.Node) -> None:
        attr = node.attributes.get("value")
        tensor = attr.value if attr is not None else None
        if isinstance(tensor, ir.TensorProtocol) and tensor.dtype == _FLOAT:
            node.attributes["value"] = ir.AttrTensor(
                "value", self._convert_tensor(tensor, node.name or "constant")
            )

    def _convert_tensor(self, tensor: ir.TensorProtocol, name: str | None) -> ir.TensorProtocol:
        array = tensor.numpy().astype(np.float32)
        if self.target == ir.DataType.FLOAT16:
            return ir.tensor(array.astype(np.float16), name=name)
        import ml_dtypes

        return ir.tensor(array.astype(ml_dtypes.bfloat16), name=name)

    def _restore_float32_outputs(self, graph: ir.Graph) -> int:
        """Graph outputs in float32_outputs get a Cast back to fp32 (and keep their names)."""
        restored = 0
        for index, value in enumerate(list(graph.outputs)):
            if value.name not in self.float32_outputs or value.dtype == _FLOAT:
                continue
            producer = value.producer()
            name = value.name
            value.name = f"{name}_{self.dtype}"
            cast = ir.node("Cast", [value], {"to": _FLOAT}, name=f"{name}_to_float32")
            cast.outputs[0].name = name
            cast.outputs[0].dtype = _FLOAT
            cast.outputs[0].shape = value.shape
            if producer is not None:
                graph.insert_after(producer, cast)
            else:
                graph.append(cast)
            graph.outputs[index] = cast.outputs[0]
            restored += 1
        return restored


def _is_constant(value: ir.Value) -> bool:
    return value.const_value is not None or (
        value.producer() is not None and value.producer().op_type == "Constant"  # type: ignore[union-attr]
    )
