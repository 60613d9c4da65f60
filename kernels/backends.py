"""What every kernel dispatcher shares: the backend name resolved for a device, packed offsets
checked on the host, the output allocator, and the timing that picks between paths.

Offsets (``cu_seqlens``, ``cu_markers``) delimit N packed segments as N+1
ascending ints; they come as tensors or lists and are read on the host once,
so a dispatcher never syncs a device twice for them.
"""

from __future__ import annotations

import math
import time

import torch

from mmprm_infer.kernels.triton_runtime import check_triton_usable, triton


def empty(shape, dtype, device) -> torch.Tensor:
    """Output allocator of every kernel; tests swap it for a NaN-filled one to catch unwritten entries."""
    return torch.empty(shape, dtype=dtype, device=device)


def resolve(backend: str, device: torch.device, choices: tuple[str, ...]) -> str:
    """``backend`` checked against ``choices``; "auto" is Triton on CUDA, torch elsewhere."""
    if backend not in choices:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(choices)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton is not None else "torch"
    if backend == "triton":
        check_triton_usable(device)
    return backend


def host_offsets(offsets, name: str, unit: str) -> list[int]:
    """``offsets`` (a 1-D integer tensor or a sequence) as host ints with at least one segment, from 0."""
    if isinstance(offsets, torch.Tensor):
        if offsets.dim() != 1 or offsets.is_floating_point():
            raise ValueError(
                f"{name} must be a 1-D integer tensor [N+1], got {offsets.dtype} {tuple(offsets.shape)}"
            )
        cu = offsets.tolist()
    else:
        cu = [int(c) for c in offsets]
    if len(cu) < 2:
        raise ValueError(f"{name} needs N+1 >= 2 entries (one {unit} at least), got {len(cu)}")
    if cu[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0]={cu[0]}")
    return cu


def time_interleaved(calls: dict, reps: int = 3, sync=None) -> dict[str, float]:
    """Best wall seconds of each call over ``reps`` rounds after one warm-up round, the calls taking turns so
    a burst of load from elsewhere hits all of them alike.  sync: called before each clock read (CUDA)."""
    sync = sync or (lambda: None)
    best = {name: math.inf for name in calls}
    for round_ in range(reps + 1):
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            if round_:  # round 0 warms up
                best[name] = min(best[name], time.perf_counter() - start)
    return best
