"""Quantized KV cache for the ONNX Runtime lowering: int8, or int4 packed two per byte.

ONNX Runtime 1.32's CPU GroupQueryAttention reads and writes a quantized cache when it gets
`kv_cache_bit_width` (8: int8 cache; 4: uint8 bytes holding two values, low nibble = element
2i, stored as q + 8), `k_quant_type` = `v_quant_type` (PER_TENSOR or PER_CHANNEL; both the same)
and float32 scale inputs 12 / 13 (`k_scale`, `v_scale`: [1] or [1, kv_heads, 1, head_dim]).
The quantization is symmetric and static: value = q * scale, and a new token is stored as
rint(x / scale) clamped to the integer range. Scales come from calibration at build time
(compiler/kv_cache_calibration.py); this module holds the format, a NumPy model of it (the
reference the tests compare the kernel with) and the pass that rewrites the lowered graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from enginesmith.passes.base import EnginePass, PassError

KV_CACHE_DTYPES = ("float32", "int8", "int4")
BITS = {"int8": 8, "int4": 4}
QUANT_TYPE = "PER_CHANNEL"  # one scale per (layer, KV head, channel): keys have outlier channels
_K_SCALE_INPUT, _V_SCALE_INPUT = 12, 13  # GroupQueryAttention input indices


def qmax(bits: int) -> int:
    """Largest stored magnitude of the symmetric grid: 127 (int8) or 7 (int4)."""
    return (1 << (bits - 1)) - 1


def cache_numpy_dtype(dtype: str) -> np.dtype:
    """Element dtype of the cache buffers of a KV_CACHE_DTYPES entry."""
    return np.dtype({"float32": np.float32, "int8": np.int8, "int4": np.uint8}[dtype])


def cache_last_dim(dtype: str, head_dim: int) -> int:
    """The buffers' last dimension: head_dim, or head_dim / 2 bytes for int4 (two per byte)."""
    return head_dim // 2 if dtype == "int4" else head_dim


def bytes_per_element(dtype: str) -> float:
    return {"float32": 4.0, "int8": 1.0, "int4": 0.5}[dtype]


# --- NumPy model of the cache format (the tests' reference) -------------------------------------


def quantize(x: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """Integers q = clip(rint(x / scale)) of X (..., head_dim) on the symmetric grid of BITS;
    int8 for 8 bits, the int4 values as int8 in [-8, 7] for 4 (pack with pack_int4)."""
    limit = qmax(bits)
    q = np.rint(x.astype(np.float32) / scale.astype(np.float32))
    return np.clip(q, -limit - 1, limit).astype(np.int8)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """[..., D] int4 values in [-8, 7] -> [..., D / 2] uint8: low nibble = element 2i, q + 8."""
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """Inverse of pack_int4: [..., D / 2] uint8 -> [..., D] int8 in [-8, 7]."""
    low = (packed & 0x0F).astype(np.int8) - 8
    high = (packed >> 4).astype(np.int8) - 8
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.int8)
    out[..., 0::2], out[..., 1::2] = low, high
    return out


def encode(x: np.ndarray, scale: np.ndarray, dtype: str) -> np.ndarray:
    """Float cache entries (..., head_dim) -> their stored form in a DTYPE cache."""
    q = quantize(x, scale, BITS[dtype])
    return pack_int4(q) if dtype == "int4" else q


def decode(stored: np.ndarray, scale: np.ndarray, dtype: str) -> np.ndarray:
    """Stored cache entries of a DTYPE cache -> float32 values q * scale."""
    q = unpack_int4(stored) if dtype == "int4" else stored
    return q.astype(np.float32) * scale.astype(np.float32)


def reference_store(
    dtype: str,
    key_scale: np.ndarray,  # [kv_heads, head_dim] (one layer)
    value_scale: np.ndarray,
) -> Callable[[str, np.ndarray], np.ndarray]:
    """The `store` round trip of reference.flash_attention_reference for a DTYPE cache: a new
    token reads back decode(encode(x))."""

    def store(kind: str, rows: np.ndarray) -> np.ndarray:  # rows [kv_heads, Q, head_dim]
        scale = (key_scale if kind == "key" else value_scale)[:, None, :]
        return decode(encode(rows.astype(np.float32), scale, dtype), scale, dtype)

    return store


def rotary_pairs(model: ir.Model) -> tuple[int, bool] | None:
    """(rotary_dim, interleaved) of the lowered graph's rotary, None without one. Rotary turns
    each channel pair by a position-dependent angle, so a key channel's range at positions the
    calibration never reached is bounded by its pair's norm, not by its own calibrated max."""
    for node in model.graph:
        if node.op_type != "GroupQueryAttention":
            continue
        attrs = {k: a.value for k, a in node.attributes.items()}
        cos = node.inputs[7] if len(node.inputs) > 7 else None
        if not attrs.get("do_rotary") or cos is None or cos.shape is None:
            return None
        return 2 * int(str(cos.shape[-1])), bool(attrs.get("rotary_interleaved", 0))
    return None


def pair_norm_absmax(
    keys: np.ndarray,  # [..., T, head_dim] rotated keys
    rotary: tuple[int, bool] | None,
) -> np.ndarray:
    """Per-channel bound of |k| over KEYS at any position: max over T of the rotary pair's norm
    for rotated channels (both channels of a pair get it), of |k| for the rest. [..., head_dim]"""
    bound = np.abs(keys).max(axis=-2)
    if rotary is None:
        return bound
    dim, interleaved = rotary
    half = dim // 2
    first = np.arange(0, dim, 2) if interleaved else np.arange(half)
    second = first + 1 if interleaved else first + half
    norm = np.sqrt(np.square(keys[..., first]) + np.square(keys[..., second])).max(axis=-2)
    bound[..., first] = norm
    bound[..., second] = norm
    return bound


# --- The graph rewrite --------------------------------------------------------------------------


@dataclass(frozen=True)
class KVCacheQuantization:
    """A quantized cache's format and its calibrated per-channel scales."""

    dtype: str  # "int8" | "int4"
    key_scale: np.ndarray  # [layers, kv_heads, head_dim] float32
    value_scale: np.ndarray  # [layers, kv_heads, head_dim] float32

    def __post_init__(self) -> None:
        if self.dtype not in BITS:
            raise PassError(f"KV cache dtype must be one of {', '.join(BITS)} (got {self.dtype!r})")
        if self.key_scale.shape != self.value_scale.shape or self.key_scale.ndim != 3:
            raise PassError("KV scales must be [layers, kv_heads, head_dim] [developer error]")
        if not (np.all(self.key_scale > 0) and np.all(self.value_scale > 0)):
            raise PassError("KV scales must be positive [developer error]")

    @property
    def bits(self) -> int:
        return BITS[self.dtype]


class QuantizeKVCachePass(EnginePass):
    """Give every GroupQueryAttention node a quantized cache: attributes, per-channel scale
    initializers [1, kv_heads, 1, head_dim], and int8 / packed-uint8 cache inputs and outputs.
    Layer i is the i-th GroupQueryAttention node in graph order (the exporter's layer order)."""

    name = "quantize-kv-cache"

    def __init__(self, quantization: KVCacheQuantization) -> None:
        super().__init__()
        self.quantization = quantization

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        quant = self.quantization
        graph = model.graph
        nodes = [n for n in graph if n.op_type == "GroupQueryAttention"]
        if len(nodes) != quant.key_scale.shape[0]:
            raise PassError(
                f"{len(nodes)} GroupQueryAttention nodes but scales for "
                f"{quant.key_scale.shape[0]} layers [developer error]"
            )
        element = ir.DataType.UINT8 if quant.dtype == "int4" else ir.DataType.INT8
        kv_heads, head_dim = quant.key_scale.shape[1:]
        for layer, node in enumerate(nodes):
            if int(node.attributes["kv_num_heads"].value) != kv_heads:
                raise PassError(
                    f"layer {layer} has {node.attributes['kv_num_heads'].value} KV heads, scales "
                    f"have {kv_heads} [developer error]"
                )
            node.attributes["kv_cache_bit_width"] = ir.Attr(
                "kv_cache_bit_width", ir.AttributeType.INT, quant.bits
            )
            for attr in ("k_quant_type", "v_quant_type"):
                node.attributes[attr] = ir.Attr(attr, ir.AttributeType.STRING, QUANT_TYPE)
            for index, scales, kind in (
                (_K_SCALE_INPUT, quant.key_scale, "key"),
                (_V_SCALE_INPUT, quant.value_scale, "value"),
            ):
                init = ir.Value(
                    name=f"kv_scale_{kind}.{layer}",
                    const_value=ir.tensor(
                        scales[layer].astype(np.float32).reshape(1, kv_heads, 1, head_dim)
                    ),
                )
                graph.register_initializer(init)
                node.replace_input_with(index, init)
            # Cache inputs (past) and outputs (present) of this layer: new element type and width.
            for value in (node.inputs[3], node.inputs[4], node.outputs[1], node.outputs[2]):
                assert value is not None
                value.type = ir.TensorType(element)
                if value.shape is not None:
                    dims = list(value.shape)
                    dims[-1] = cache_last_dim(quant.dtype, head_dim)
                    value.shape = ir.Shape(dims)
        self.report = {
            "dtype": quant.dtype,
            "bit_width": quant.bits,
            "quant_type": QUANT_TYPE,
            "layers": len(nodes),
        }
        return ir.passes.PassResult(model, modified=bool(nodes))
