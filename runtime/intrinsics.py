"""LLVM intrinsics that numba-compiled kernels call: a software prefetch and atomic int64
counters (runtime/decode_kernels.py).

* prefetch: the hardware prefetchers follow a stream only within a 4 KiB page and after a few
  misses; the decode attention walks many short key/value runs (one per KV head and context
  chunk, read while the weights stream past), so it names the rows it reads next itself.
* atomic_add / atomic_load: the decode step is one parallel region whose threads claim chunks
  of each phase from shared counters and wait for the phase's done counter, instead of an
  OpenMP fork and join per weight product.
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_READ = 0  # llvm.prefetch rw: 0 = read
_LOCALITY = 3  # 0..3: 3 = keep in all cache levels (the rows are read within microseconds)
_DATA_CACHE = 1  # 1 = data, 0 = instruction


def _element_pointer(context: Any, builder: Any, array_type: Any, array: Any, index: Any) -> Any:
    """LLVM pointer to array[index] of a 1-D numba array."""
    view = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer2(
        context,
        builder,
        view.data,
        cgutils.unpack_tuple(builder, view.shape),
        cgutils.unpack_tuple(builder, view.strides),
        array_type.layout,
        [index],
    )


def _is_1d_indexed(array: Any, index: Any) -> bool:
    return isinstance(array, types.Array) and array.ndim == 1 and isinstance(index, types.Integer)


@intrinsic
def prefetch(typingctx: Any, array: Any, index: Any) -> Any:
    """prefetch(array, i): hint that array[i] (a 1-D array) is read soon. No effect on values."""
    if not _is_1d_indexed(array, index):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1])
        i32 = ir.IntType(32)
        fn_type = ir.FunctionType(ir.VoidType(), [pointer.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fn_type, "llvm.prefetch.p0")
        builder.call(fn, [pointer, i32(_READ), i32(_LOCALITY), i32(_DATA_CACHE)])
        return context.get_dummy_value()

    return types.void(array, types.intp), codegen


def _is_counter(array: Any, index: Any) -> bool:
    return _is_1d_indexed(array, index) and array.dtype == types.int64


@intrinsic
def atomic_add(typingctx: Any, array: Any, index: Any, value: Any) -> Any:
    """atomic_add(counters, i, v): counters[i] += v atomically (sequentially consistent, so
    every write before it is visible to whoever sees the new value); returns the old value."""
    if not _is_counter(array, index) or not isinstance(value, types.Integer):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1])
        addend = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", pointer, addend, "seq_cst")

    return types.int64(array, types.intp, types.int64), codegen


@intrinsic
def atomic_load(typingctx: Any, array: Any, index: Any) -> Any:
    """atomic_load(counters, i): counters[i], read with acquire ordering (reads after it see
    every write made before the atomic_add that produced the value); never cached in a
    register, so a spin loop on it terminates."""
    if not _is_counter(array, index):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(pointer, "acquire", 8)

    return types.int64(array, types.intp), codegen
