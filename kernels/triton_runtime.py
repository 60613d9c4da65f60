"""Whether and how Triton can run here: CUDA, the CPU interpreter, or not at all.

triton 3.9 decides between compiled and interpreted when it is first
imported, so TRITON_INTERPRET=1 must be set before that import (the tests'
conftest does it on machines without CUDA).
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # torch paths still work on installs without triton

    triton = None

    class tl:  # type: ignore[no-redef]  # noqa: N801 - stands in for the kernels' annotations only
        constexpr = None


def interpreter_active() -> bool:
    """True when Triton runs on the CPU interpreter (numpy)."""
    return (
        triton is not None and bool(triton.knobs.runtime.interpret)
        and type(tl.zeros).__name__ == "InterpretedFunction"
    )


def check_triton_usable(device: torch.device) -> None:
    """Raise a clear error when backend='triton' cannot run on ``device``."""
    if triton is None:
        raise ValueError("backend='triton' needs the triton package; use backend='torch'")
    if device.type != "cuda" and not interpreter_active():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device}) or the Triton CPU interpreter "
            "(TRITON_INTERPRET=1 set before triton is first imported); use backend='torch' on CPU"
        )


_JITTED: dict = {}


def jit_lazily(fn):
    """triton.jit picks compiled vs interpreted when it wraps, so wrap on first use, per mode."""
    key = (fn.__module__, fn.__qualname__, bool(triton.knobs.runtime.interpret))
    if key not in _JITTED:
        _JITTED[key] = triton.jit(fn)
    return _JITTED[key]
