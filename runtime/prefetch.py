"""A software prefetch that numba-compiled kernels can call (LLVM's llvm.prefetch intrinsic).

The hardware prefetchers follow a stream only within a 4 KiB page and after a few misses: the
decode attention walks many short key/value runs (one per KV head and context chunk, read
while the weights stream past), so it names the rows it reads next itself.
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


@intrinsic
def prefetch(typingctx: Any, array: Any, index: Any) -> Any:
    """prefetch(array, i): hint that array[i] (a 1-D array) is read soon. No effect on values."""
    if (
        not isinstance(array, types.Array)
        or array.ndim != 1
        or not isinstance(index, types.Integer)
    ):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer2(
            context,
            builder,
            view.data,
            cgutils.unpack_tuple(builder, view.shape),
            cgutils.unpack_tuple(builder, view.strides),
            array_type.layout,
            [args[1]],
        )
        i32 = ir.IntType(32)
        fn_type = ir.FunctionType(ir.VoidType(), [pointer.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fn_type, "llvm.prefetch.p0")
        builder.call(fn, [pointer, i32(_READ), i32(_LOCALITY), i32(_DATA_CACHE)])
        return context.get_dummy_value()

    return types.void(array, types.intp), codegen
