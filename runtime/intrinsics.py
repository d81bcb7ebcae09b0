"""LLVM intrinsics that numba-compiled kernels call: a software prefetch, atomic int64
counters and a vector argmax (runtime/decode_kernels.py).

* prefetch: the hardware prefetchers follow a stream only within a 4 KiB page and after a few
  misses; the decode attention walks many short key/value runs (one per KV head and context
  chunk, read while the weights stream past), so it names the rows it reads next itself.
* atomic_add / atomic_load: the decode step is one parallel region whose threads claim chunks
  of each phase from shared counters and wait for the phase's done counter, instead of an
  OpenMP fork and join per weight product.
* argmax: a greedy decode run picks each step's token in the kernel, over the whole
  vocabulary, while the other thread waits.
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


_LANES = 16  # fp32 lanes of a 512-bit vector
_F32_VECTOR = ir.VectorType(ir.FloatType(), _LANES)
_MASK = ir.VectorType(ir.IntType(1), _LANES)


def _vector_call(builder: Any, name: str, result: Any, args: list[Any]) -> Any:
    fn_type = ir.FunctionType(result, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fn_type, name), args)


def _splat(value: Any) -> Any:
    """A vector constant of 16 copies of the constant VALUE."""
    return ir.Constant(ir.VectorType(value.type, _LANES), [value] * _LANES)


def _broadcast(builder: Any, value: Any) -> Any:
    """A vector of 16 copies of the run-time VALUE."""
    vector = ir.VectorType(value.type, _LANES)
    one = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.IntType(32)(0))
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), _LANES), [ir.IntType(32)(0)] * _LANES)
    return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), zeros)


@intrinsic
def argmax(typingctx: Any, values: Any) -> Any:
    """argmax(values): np.argmax of a 1-D C-contiguous float32 array (the first largest
    value's index, the first NaN's if there is one; 0 if empty), 16 lanes at a time.

    A greedy decode run takes it over the vocabulary after every step (runtime/decode_kernels
    .py). Two passes over 16-lane blocks: the largest value and whether there is a NaN, then
    the first lane holding it. With a scalar loop carrying the best value and its index
    instead, greedy runs were no faster than a kernel call per token
    (scripts/compare_greedy_runs.py, docs/benchmarks.md)."""
    if not (
        isinstance(values, types.Array)
        and values.ndim == 1
        and values.dtype == types.float32
        and values.layout == "C"
    ):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        view = context.make_array(signature.args[0])(context, builder, args[0])
        (n,) = cgutils.unpack_tuple(builder, view.shape)
        i64, i32, f32 = ir.IntType(64), ir.IntType(32), ir.FloatType()
        blocks = builder.sdiv(builder.add(n, i64(_LANES - 1)), i64(_LANES))
        lane_index = ir.Constant(ir.VectorType(i64, _LANES), [i64(i) for i in range(_LANES)])
        pointer_type = _F32_VECTOR.as_pointer()

        minus_inf = _splat(f32(float("-inf")))

        def load(block: Any) -> Any:
            """Block BLOCK's 16 values, lanes past the end -inf (never a NaN or a new max)."""
            first = builder.mul(block, i64(_LANES))
            mask = builder.icmp_signed("<", lane_index, _broadcast(builder, builder.sub(n, first)))
            address = builder.bitcast(builder.gep(view.data, [first]), pointer_type)
            return _vector_call(builder, "llvm.masked.load.v16f32.p0", _F32_VECTOR,
                                [address, i32(4), mask, minus_inf])  # fmt: skip

        largest = cgutils.alloca_once_value(builder, minus_inf)
        nan_seen = cgutils.alloca_once_value(
            builder, ir.Constant(_MASK, [ir.IntType(1)(0)] * _LANES)
        )
        with cgutils.for_range(builder, blocks) as loop:
            v = load(loop.index)
            best = builder.load(largest)
            builder.store(builder.select(builder.fcmp_ordered(">", v, best), v, best), largest)
            builder.store(
                builder.or_(builder.load(nan_seen), builder.fcmp_unordered("uno", v, v)), nan_seen
            )
        top = _vector_call(builder, "llvm.vector.reduce.fmax.v16f32", f32, [builder.load(largest)])
        any_nan = _vector_call(builder, "llvm.vector.reduce.or.v16i1", ir.IntType(1),
                               [builder.load(nan_seen)])  # fmt: skip
        found = cgutils.alloca_once_value(builder, n)
        with cgutils.for_range(builder, blocks) as loop:
            v = load(loop.index)
            hit = builder.select(any_nan, builder.fcmp_unordered("uno", v, v),
                                 builder.fcmp_ordered("==", v, _broadcast(builder, top)))  # fmt: skip
            bits = builder.bitcast(hit, ir.IntType(_LANES))
            lane = builder.zext(_vector_call(builder, "llvm.cttz.i16", ir.IntType(_LANES),
                                             [bits, ir.IntType(1)(0)]), i64)  # fmt: skip
            here = builder.add(builder.mul(loop.index, i64(_LANES)), lane)
            so_far = builder.load(found)
            first_hit = builder.and_(builder.icmp_unsigned("!=", bits, ir.IntType(_LANES)(0)),
                                     builder.icmp_signed("==", so_far, n))  # fmt: skip
            builder.store(builder.select(first_hit, here, so_far), found)
        result = builder.load(found)
        return builder.select(builder.icmp_signed("==", result, n), i64(0), result)

    return types.int64(values), codegen
