"""A numba intrinsic for software prefetch (LLVM's llvm.prefetch), for kernels whose loads
are random and known ahead: hash probes, row gathers, bitset marks."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def prefetcher(write: int):
    """An intrinsic `f(arr, i)` that prefetches the cache line of arr[i] (arr[i, 0] for 2-D)."""

    @intrinsic
    def prefetch(typingctx, arr, idx):
        def codegen(context, builder, signature, args):
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            zero = ir.Constant(ir.IntType(64), 0)
            ptr = cgutils.get_item_pointer2(
                context, builder, ary.data, cgutils.unpack_tuple(builder, ary.shape),
                cgutils.unpack_tuple(builder, ary.strides), aryty.layout,
                [args[1]] + [zero] * (aryty.ndim - 1), wraparound=False, boundscheck=False)
            i32 = ir.IntType(32)
            bytes_ptr = ir.IntType(8).as_pointer()
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [bytes_ptr, i32, i32, i32]),
                "llvm.prefetch.p0")
            # (address, rw, locality 3 = keep in all levels, cache type 1 = data)
            builder.call(fn, [builder.bitcast(ptr, bytes_ptr), ir.Constant(i32, write),
                              ir.Constant(i32, 3), ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return types.void(arr, types.int64), codegen

    return prefetch
