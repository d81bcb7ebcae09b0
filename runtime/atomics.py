"""Atomic int64 counters that numba-compiled kernels can call (LLVM atomicrmw / atomic load).

The decode step runs as one parallel region whose threads claim chunks of each phase from a
shared counter and wait for the phase's done counter (runtime/decode_kernels.py): a phase
then costs two atomics per chunk instead of an OpenMP fork and join.
"""

from __future__ import annotations

from typing import Any

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _counter_pointer(context: Any, builder: Any, array_type: Any, array: Any, index: Any) -> Any:
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


def _is_counter_array(array: Any, index: Any) -> bool:
    return (
        isinstance(array, types.Array)
        and array.ndim == 1
        and array.dtype == types.int64
        and isinstance(index, types.Integer)
    )


@intrinsic
def atomic_add(typingctx: Any, array: Any, index: Any, value: Any) -> Any:
    """atomic_add(counters, i, v): counters[i] += v atomically (sequentially consistent, so
    every write before it is visible to whoever sees the new value); returns the old value."""
    if not _is_counter_array(array, index) or not isinstance(value, types.Integer):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        pointer = _counter_pointer(context, builder, signature.args[0], args[0], args[1])
        addend = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", pointer, addend, "seq_cst")

    return types.int64(array, types.intp, types.int64), codegen


@intrinsic
def atomic_load(typingctx: Any, array: Any, index: Any) -> Any:
    """atomic_load(counters, i): counters[i], read with acquire ordering (reads after it see
    every write made before the atomic_add that produced the value); never cached in a
    register, so a spin loop on it terminates."""
    if not _is_counter_array(array, index):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        pointer = _counter_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(pointer, "acquire", 8)

    return types.int64(array, types.intp), codegen
