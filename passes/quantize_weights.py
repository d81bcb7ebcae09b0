"""Weight-only quantization to ONNX Runtime's block-quantized ops.

Every 2-D float32 weight that a MatMul, a Gemm or a Gather reads is quantized block-wise along
its input dimension K (blocks of `block_size` values, one scale per block, and with
`symmetric=False` one zero point too), to `bits` = 4 or 8:

    MatMul(A, W[K, N])            -> com.microsoft::MatMulNBits(A, B, scales[, zero_points])
    Gemm(A, W[N, K], C, transB=1) -> MatMulNBits(A, B, scales, zero_points?, -, bias=C)
    Gather(T[V, H], ids)          -> GatherBlockQuantized(B, ids, scales[V, H/block, 1])
                                     -> Reshape [..., H]

MatMulNBits stores B as [N, K/block, block*bits/8]: each output row n quantized along K. For an
LM head `Gemm(h, T, transB=1)` (N = vocab, K = hidden) that is exactly the embedding table's own
row layout, and GatherBlockQuantized reads the same uint8 tensor [V, H/block, block*bits/8]
(gathered on axis 0, one block along its last axis). So when the embeddings are tied, the LM
head and the embedding lookup share ONE packed tensor: no fp32 copy of the table is left and it
is stored once. The two ops need different scale shapes ([N, kb] vs [N, kb, 1]), so only the
scales (1/8 of the packed bytes at 4 bits) are stored twice.

Packing is not this pass's job: pack-qkv and pack-gate-up (run before it) have already merged
q/k/v and gate/up into one MatMul each. Quantization is per output column, so quantizing the
packed weight is quantizing each part, and one larger MatMulNBits decodes faster than several.

The embedding table and the LM head (the weights read by a Gather, or whose reader's output is
a graph output) can take their own `embedding_bits` / `embedding_block_size`: they are the most
sensitive weights and the LM head is the largest MatMul of a decode step.

Packing uses ONNX Runtime's own block quantizer (`quantize_matmul_{4,8}bits`, the one behind
`onnxruntime.quantization.matmul_nbits_quantizer`), so the bytes are exactly what MatMulNBits
expects. Its schemes, with w' = (q - zp) * scale the dequantized weight:

* symmetric: scale = e / -2^(bits-1), e the block's value of largest magnitude (so e maps to
  the lowest code exactly; the scale is negative when e > 0), q = clamp(round(w / scale),
  -2^(bits-1), 2^(bits-1) - 1) + 2^(bits-1), the default zero point (no zero-point tensor).
  |w - w'| <= |scale| / 2, except a value opposite e clipped to the top code: <= |scale|;
* asymmetric: the block's range widened to include 0, scale = range / (2^bits - 1), an integer
  zero point in [0, 2^bits - 1] (uint8, packed like B): |w - w'| <= scale / 2.

`accuracy_level=4` lets MatMulNBits quantize its activation input to int8 per block and run
integer dot products (the fast CPU kernels); 0 keeps fp32 activations (exact up to float
rounding: the result of the dequantized weights, but ~10x slower at 8 bits).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from enginesmith.passes.base import EnginePass
from enginesmith.passes.weight_grid import GridFit, fit_grid

ORT_DOMAIN = "com.microsoft"
SUPPORTED_BITS = (4, 8)


# --- packing (numpy) ------------------------------------------------------------------------------


@dataclass
class BlockQuantized:
    """A weight [N, K] quantized along K, in MatMulNBits' layout."""

    packed: np.ndarray  # uint8 [N, k_blocks, block_size * bits / 8]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks * bits / 8)], None = symmetric
    bits: int
    block_size: int
    k: int  # logical K (the packed tensor is padded to a multiple of block_size)
    # float32 [N, k_blocks] added to every weight of a block (a kept Q4_1 grid's offset m); the
    # MatMulNBits gets a second product, block sums of its input times these (weight_grid.py).
    offsets: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.packed.shape[0])

    @property
    def k_blocks(self) -> int:
        return int(self.packed.shape[1])

    @property
    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        offsets = 0 if self.offsets is None else self.offsets.nbytes
        return int(self.packed.nbytes + self.scales.nbytes + zp + offsets)


def _check_bits_block(bits: int, block_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS} (got {bits})")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (got {block_size})")


def quantize_rows(w: np.ndarray, bits: int, block_size: int, symmetric: bool) -> BlockQuantized:
    """Quantize W [N, K] (float32) along K, block-wise, with ONNX Runtime's quantizer."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    _check_bits_block(bits, block_size)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight (got shape {w.shape})")
    n, k = (int(d) for d in w.shape)
    k_blocks = -(-k // block_size)
    # ORT's quantizer reads a row-major [K, N] matrix (MatMul's B) padded to whole blocks.
    w_kn = np.zeros((k_blocks * block_size, n), np.float32)
    w_kn[:k] = np.asarray(w, np.float32).T
    packed = np.zeros((n, k_blocks, block_size * bits // 8), np.uint8)
    scales = np.zeros((n, k_blocks), np.float32)
    zero_points = np.zeros((n, -(-k_blocks * bits // 8)), np.uint8)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, w_kn, scales, zero_points, block_size, n, k_blocks * block_size, symmetric)
    return BlockQuantized(packed, scales, None if symmetric else zero_points, bits, block_size, k)


def from_grid(fit: GridFit, k: int) -> BlockQuantized:
    """A recovered grid (weight_grid.py) in MatMulNBits' layout: codes packed as they are, the
    default zero point, the offsets (if any) for the extra block-sum product."""
    codes = fit.codes
    packed = codes if fit.bits == 8 else (codes[..., 0::2] | (codes[..., 1::2] << 4))
    return BlockQuantized(
        np.ascontiguousarray(packed, np.uint8),
        fit.scales,
        None,
        fit.bits,
        codes.shape[-1],
        k,
        fit.offsets,
    )


def _unpack(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """uint8 [..., m] holding 8/bits values per byte (low bits first) -> [..., count] ints."""
    if bits == 8:
        values = data.astype(np.int32)
    else:
        values = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(*data.shape[:-1], -1)
    return values[..., :count].astype(np.int32)


def codes(q: BlockQuantized) -> np.ndarray:
    """Integer codes [N, k_blocks, block_size] in [0, 2^bits)."""
    return _unpack(q.packed, q.bits, q.block_size)


def zero_point_values(q: BlockQuantized) -> np.ndarray:
    """Zero points [N, k_blocks] (the default 2^(bits-1) when symmetric)."""
    if q.zero_points is None:
        return np.full((q.n, q.k_blocks), 1 << (q.bits - 1), np.int32)
    return _unpack(q.zero_points, q.bits, q.k_blocks)


def dequantize_rows(q: BlockQuantized) -> np.ndarray:
    """(q - zero_point) * scale as float32 [N, K]: what MatMulNBits and GatherBlockQuantized
    compute from the packed weight."""
    w = (codes(q) - zero_point_values(q)[..., None]).astype(np.float32) * q.scales[..., None]
    if q.offsets is not None:
        w += q.offsets[..., None]
    return w.reshape(q.n, -1)[:, : q.k]


# --- the pass -------------------------------------------------------------------------------------


@dataclass
class _Use:
    node: ir.Node
    kind: str  # "matmul" (W is [K, N]), "gemm_t" (W is [N, K]), "gather" (W is [V, H])


@dataclass
class _Packing:
    """One quantized orientation of a weight and the initializers made from it (lazily)."""

    q: BlockQuantized
    prefix: str
    values: dict[str, ir.Value]
    readers: set[str]  # use kinds that read the packed tensor


class QuantizeWeightsPass(EnginePass):
    """Replace float32 MatMul / Gemm / Gather weights by block-quantized MatMulNBits and
    GatherBlockQuantized (ONNX Runtime contrib ops).

    Requires: an ONNX Runtime-lowered graph (runs after every backend-neutral pass).
    Ensures: no float weight that one of these nodes reads is left in fp32, unless the report
    says why (e.g. a weight that another kind of node also reads).
    """

    name = "quantize-weights"

    def __init__(
        self,
        bits: int,
        block_size: int = 32,
        symmetric: bool = True,
        accuracy_level: int = 4,
        embedding_bits: int | None = None,
        embedding_block_size: int | None = None,
        keep_grid: bool = False,
    ) -> None:
        """embedding_bits / embedding_block_size: for the token-embedding table and the LM head
        (tied or not), the most sensitive weights and the largest single MatMul of a decode
        step; None = BITS / BLOCK_SIZE. keep_grid: a weight that already sits on a grid of
        its bits (a GGUF source's Q4_1 / Q8_0, weight_grid.py) keeps it exactly, in blocks of
        32, instead of being re-rounded."""
        super().__init__()
        _check_bits_block(bits, block_size)
        self.embedding_bits = bits if embedding_bits is None else embedding_bits
        self.embedding_block_size = embedding_block_size or block_size
        _check_bits_block(self.embedding_bits, self.embedding_block_size)
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0-4 (got {accuracy_level})")
        self.bits = bits
        self.block_size = block_size
        self.symmetric = symmetric
        self.accuracy_level = accuracy_level
        self.keep_grid = keep_grid

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        skipped: dict[str, str] = {}
        counts = {"matmul": 0, "gemm_t": 0, "gather": 0}
        lm_head: list[str] = []
        embedding: list[str] = []
        shared: list[str] = []
        head_blocks: set[int] = set()  # block sizes used for the embedding table / LM head
        quantized_before = quantized_after = 0
        grids: dict[str, int] = {}  # weights whose source grid was kept, by grid
        total_before = _initializer_bytes(graph.initializers.values())

        for weight in list(graph.initializers.values()):
            uses, reason = _classify(weight)
            if reason is not None:
                for node, _ in weight.uses():
                    skipped[node.name or node.op_type] = reason
            if not uses:
                continue
            w = weight.const_value.numpy()  # type: ignore[union-attr]
            # The embedding table and the LM head (whose output is the logits): embedding_bits.
            head = any(
                u.kind == "gather" or any(out.is_graph_output() for out in u.node.outputs)
                for u in uses
            )
            bits = self.embedding_bits if head else self.bits
            block_size = self.embedding_block_size if head else self.block_size
            packings: dict[bool, _Packing] = {}  # by orientation: rows of W^T (True) or of W
            for use in uses:
                transposed = use.kind == "matmul"
                if transposed not in packings:
                    rows = w.T if transposed else w
                    # Never more than one block per row of K (a smaller K than the block size
                    # would only be padded).
                    block = min(block_size, max(16, 1 << (int(rows.shape[1]) - 1).bit_length()))
                    q = self._grid(rows, bits, uses, grids)
                    if q is None:
                        q = quantize_rows(rows, bits, block, self.symmetric)
                    if head:
                        head_blocks.add(q.block_size)
                    prefix = f"{weight.name}{'.T' if transposed else ''}.q{bits}"
                    packed = _add_initializer(graph, prefix, q.packed)
                    packings[transposed] = _Packing(q, prefix, {"packed": packed}, set())
                packing = packings[transposed]
                packing.readers.add(use.kind)
                label = use.node.name or use.node.op_type
                if use.kind == "gather":
                    self._replace_gather(graph, use.node, packing)
                    embedding.append(label)
                else:
                    if any(out.is_graph_output() for out in use.node.outputs):
                        lm_head.append(label)  # its output is the logits
                    self._replace_matmul(graph, use.node, packing)
                counts[use.kind] += 1
            for packing in packings.values():
                if {"gather", "gemm_t"} <= packing.readers:
                    shared.append(str(weight.name))
            quantized_before += int(w.nbytes)
            quantized_after += _initializer_bytes(
                v for p in packings.values() for v in p.values.values()
            )
            if not weight.uses():  # no fp32 copy of the weight is left
                graph.initializers.pop(str(weight.name))

        if quantized_before:
            model.opset_imports.setdefault(ORT_DOMAIN, 1)
        self.report = {
            "bits": self.bits,
            "embedding_bits": self.embedding_bits,
            "block_size": self.block_size,
            "embedding_block_size": max(head_blocks, default=self.embedding_block_size),
            "scheme": "symmetric" if self.symmetric else "asymmetric",
            "accuracy_level": self.accuracy_level,
            "matmuls_quantized": counts["matmul"] + counts["gemm_t"],
            "matmulnbits_nodes": sum(1 for n in graph if n.op_type == "MatMulNBits"),
            "gathers_quantized": counts["gather"],
            "kept_grid": grids,
            "skipped": skipped,
            "lm_head": lm_head,
            "embedding": embedding,
            "tied_tables_shared": shared,
            "quantized_weight_bytes_before": quantized_before,
            "quantized_weight_bytes_after": quantized_after,
            "weight_bytes_before": total_before,
            "weight_bytes_after": _initializer_bytes(graph.initializers.values()),
        }
        return ir.passes.PassResult(model, modified=bool(quantized_before))

    def _grid(
        self, rows: np.ndarray, bits: int, uses: list[_Use], grids: dict[str, int]
    ) -> BlockQuantized | None:
        """ROWS' own grid of BITS when keep_grid is on and they sit on one; offsets only where
        every reader is a MatMul (GatherBlockQuantized has no offset)."""
        if not self.keep_grid:
            return None
        fit = fit_grid(rows, bits)
        if fit is None or (fit.offsets is not None and any(u.kind == "gather" for u in uses)):
            return None
        name = "q4_1" if fit.offsets is not None else "q8_0"
        grids[name] = grids.get(name, 0) + 1
        return from_grid(fit, int(rows.shape[1]))

    def _replace_matmul(self, graph: ir.Graph, node: ir.Node, packing: _Packing) -> None:
        q, values = packing.q, packing.values
        if "scales" not in values:
            values["scales"] = _add_initializer(graph, f"{packing.prefix}.scales", q.scales)
            if q.zero_points is not None:
                values["zero_points"] = _add_initializer(
                    graph, f"{packing.prefix}.zero_points", q.zero_points
                )
        inputs: list[ir.Value | None] = [
            node.inputs[0],
            values["packed"],
            values["scales"],
            values.get("zero_points"),
        ]
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            inputs += [None, node.inputs[2]]  # g_idx (deprecated, absent), bias = Gemm's C
        attrs: dict[str, Any] = {"K": q.k, "N": q.n, "bits": q.bits, "block_size": q.block_size}
        if self.accuracy_level:
            attrs["accuracy_level"] = self.accuracy_level
        new = ir.node("MatMulNBits", inputs, attrs, domain=ORT_DOMAIN, name=node.name)
        _swap(graph, node, [new, *self._offset_nodes(graph, node, new, packing)])

    def _offset_nodes(
        self, graph: ir.Graph, node: ir.Node, matmul: ir.Node, packing: _Packing
    ) -> list[ir.Node]:
        """Y + (block sums of X) @ offsets^T for a kept Q4_1 grid (none without offsets)."""
        q, values = packing.q, packing.values
        if q.offsets is None:
            return []
        x = node.inputs[0]
        if "offsets" not in values:  # [k_blocks, N]: MatMul's B layout
            values["offsets"] = _add_initializer(
                graph, f"{packing.prefix}.offsets", np.ascontiguousarray(q.offsets.T)
            )
        sums_name = f"grid_block_sums.{q.k}x{q.k_blocks}"
        if sums_name not in graph.initializers:  # [K, k_blocks] 0/1: column b sums block b
            ones = np.zeros((q.k, q.k_blocks), np.float32)
            for b in range(q.k_blocks):
                ones[b * q.block_size : (b + 1) * q.block_size, b] = 1.0
            _add_initializer(graph, sums_name, ones)
        prefix = node.name or packing.prefix
        block_sums = ir.node(
            "MatMul", [x, graph.initializers[sums_name]], name=f"{prefix}.block_sums"
        )
        offset = ir.node(
            "MatMul", [block_sums.outputs[0], values["offsets"]], name=f"{prefix}.offsets"
        )
        add = ir.node("Add", [matmul.outputs[0], offset.outputs[0]], name=f"{prefix}.add_offsets")
        return [block_sums, offset, add]

    def _replace_gather(self, graph: ir.Graph, node: ir.Node, packing: _Packing) -> None:
        q, values = packing.q, packing.values
        indices = node.inputs[1]
        assert indices is not None and indices.shape is not None  # checked by _classify
        if "gather_scales" not in values:
            # Same scales as MatMulNBits', one rank more: [V, k_blocks, 1].
            values["gather_scales"] = _add_initializer(
                graph, f"{packing.prefix}.gather_scales", q.scales[..., None]
            )
            if q.zero_points is not None:
                # One zero point per [v, block, :] slice, so one per byte: [V, k_blocks, 1].
                zp = zero_point_values(q).astype(np.uint8)[..., None]
                values["gather_zero_points"] = _add_initializer(
                    graph, f"{packing.prefix}.gather_zero_points", zp
                )
        prefix = node.name or f"{packing.prefix}.gather"
        # The packed [V, k_blocks, block*bits/8] tensor, gathered on axis 0 and dequantized
        # along its last axis (one block per slice): output [..., k_blocks, block].
        gbq = ir.node(
            "GatherBlockQuantized",
            [
                values["packed"],
                indices,
                values["gather_scales"],
                values.get("gather_zero_points"),
            ],
            {"bits": q.bits, "block_size": q.block_size, "gather_axis": 0, "quantize_axis": 2},
            domain=ORT_DOMAIN,
            name=f"{prefix}.gather_block_quantized",
        )
        padded = q.k_blocks * q.block_size
        target = np.array([0] * len(indices.shape) + [padded], np.int64)
        shape = _add_initializer(graph, f"{prefix}.shape", target)
        nodes = [gbq, ir.node("Reshape", [gbq.outputs[0], shape], name=f"{prefix}.reshape")]
        if padded != q.k:  # drop the zero padding of the last block
            starts = _add_initializer(graph, f"{prefix}.starts", np.array([0], np.int64))
            ends = _add_initializer(graph, f"{prefix}.ends", np.array([q.k], np.int64))
            axes = _add_initializer(graph, f"{prefix}.axes", np.array([-1], np.int64))
            nodes.append(
                ir.node("Slice", [nodes[-1].outputs[0], starts, ends, axes], name=f"{prefix}.slice")
            )
        _swap(graph, node, nodes)


def _classify(weight: ir.Value) -> tuple[list[_Use], str | None]:
    """The quantizable uses of WEIGHT, or ([], why not) when it must stay as it is; ([], None)
    for initializers that no MatMul/Gemm/Gather reads (norm weights, shapes): not reported."""
    uses = list(weight.uses())
    if not any(_WEIGHT_INPUT.get(node.op_type) == index for node, index in uses):
        return [], None
    value = weight.const_value
    if value is None:
        return [], "weight is not a constant"
    if value.dtype != ir.DataType.FLOAT:
        return [], f"weight dtype is {value.dtype} (only float32 is quantized)"
    if len(value.shape) != 2:
        return [], f"weight has rank {len(value.shape)} (only 2-D is quantized)"
    result: list[_Use] = []
    for node, index in uses:
        kind = _use_kind(node, index)
        if kind is None:
            return [], f"the weight is also read by {node.op_type} input {index}"
        if kind == "gather":
            indices = node.inputs[1]
            if indices is None or indices.shape is None:
                return [], "Gather indices of unknown rank"
        result.append(_Use(node, kind))
    return result, None


# Which input of each op is the weight a quantized op can take over.
_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Gather": 0}


def _use_kind(node: ir.Node, index: int) -> str | None:
    """How NODE reads a 2-D weight at input INDEX, or None when it cannot be quantized."""
    if node.domain != "":
        return None
    attrs = {k: a.value for k, a in node.attributes.items()}
    if node.op_type == "MatMul" and index == 1:
        return "matmul"
    if node.op_type == "Gemm" and index == 1:
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        vector_bias = bias is None or (bias.shape is not None and len(bias.shape) == 1)
        if plain and vector_bias and not attrs.get("transA", 0):
            return "gemm_t" if attrs.get("transB", 0) else "matmul"
        return None
    if node.op_type == "Gather" and index == 0 and attrs.get("axis", 0) == 0:
        return "gather"
    return None


def _add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value


def _swap(graph: ir.Graph, old: ir.Node, new_nodes: list[ir.Node]) -> None:
    """Put NEW_NODES where OLD was; the last one takes over OLD's outputs (names included)."""
    graph.insert_before(old, new_nodes)
    for before, after in zip(old.outputs, new_nodes[-1].outputs, strict=True):
        after.name, after.shape, after.type = before.name, before.shape, before.type
        before.name = None
        ir.convenience.replace_all_uses_with(before, after, replace_graph_outputs=True)
    graph.remove(old, safe=True)


def _initializer_bytes(values: Iterable[ir.Value]) -> int:
    return sum(int(v.const_value.nbytes) for v in values if v.const_value is not None)


def manifest_entry(report: dict[str, Any]) -> dict[str, Any]:
    """The manifest's record of the quantization scheme, from the pass's report."""
    entry: dict[str, Any] = {
        "mode": f"int{report['bits']}",
        "bits": report["bits"],
        "block_size": report["block_size"],
        "scheme": report["scheme"],
        "op": f"{ORT_DOMAIN}::MatMulNBits",
        "accuracy_level": report["accuracy_level"],
        "embedding_bits": report["embedding_bits"],
        "embedding_block_size": report["embedding_block_size"],
        "embedding_op": f"{ORT_DOMAIN}::GatherBlockQuantized" if report["embedding"] else None,
        "lm_head": "MatMulNBits" if report["lm_head"] else None,
        "tied_table_shared": bool(report["tied_tables_shared"]),
        "kept_grid": report.get("kept_grid", {}),
        "matmuls_quantized": report["matmuls_quantized"],
        "weight_bytes": report["weight_bytes_after"],
        "weight_bytes_fp32": report["weight_bytes_before"],
    }
    return entry
