"""A kernel that only the Triton CPU interpreter accepts: it calls a plain Python helper, which the
compiler rejects. tests/test_kernel_aot.py checks that the AOT compile catches it."""

import triton.language as tl


def _double(x):
    return x * 2


def scale_kernel(X, Y, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    tl.store(Y + i, _double(tl.load(X + i, mask=ok)), mask=ok)
