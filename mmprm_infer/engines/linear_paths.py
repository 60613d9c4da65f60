"""The decoder's linear layers on the CPU's fastest GEMM path.

torch's default fp32 ``F.linear`` on the CPU goes through MKL/OpenBLAS; oneDNN
with the weight reordered once into its blocked layout ("prepacked") is up to
2.5x faster on some CPUs (AVX-512 EPYC) and slower on others (measured in
bench/README.md).  So the path is measured, not assumed: ``choose_path``
times both on the model's own linear shapes at the engine's batch size, once
per process and shape set, and keeps torch unless oneDNN is clearly faster.

``PackedLinears`` holds one model's packed weights (packed once, repacked if a
weight tensor changes) and, while ``active``, routes every ``nn.Linear`` of
the decoder through them.  Outputs equal ``F.linear`` to fp32 rounding.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from mmprm_infer.kernels.backends import time_interleaved

PATHS = ("auto", "torch", "onednn")
ENV_VAR = "MMPRM_CPU_LINEAR"  # overrides "auto": torch | onednn
CLEAR_WIN = 0.95  # oneDNN must take at most this fraction of torch's time to be chosen
_choices: dict[tuple, str] = {}  # (shapes, dtype, rows, threads) -> measured path
_half_fast: dict[tuple, bool] = {}  # (dtype, threads) -> measured
HALF_WIN = 1.0  # a half-precision GEMM must take at most this fraction of fp32's time to be used


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN's packed linear exists for ``dtype`` here (bf16 packing needs avx512bw/vl/dq or avx_ne_convert)."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    if not (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")
            and hasattr(mkldnn, "_reorder_linear_weight")):
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(getattr(mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


def _linears(decoder: nn.Module) -> list[nn.Linear]:
    return [m for m in decoder.modules() if type(m) is nn.Linear]


def pack_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """W [out, in] reordered once into oneDNN's blocked layout for about ``rows`` input rows per call."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, W, bias) with W given as oneDNN's packed weight; x [..., in] in W's dtype."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


def packed_linear_add(x: torch.Tensor, residual: torch.Tensor, packed: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """residual + F.linear(x, W, bias) in one oneDNN call (a binary post-op): x [T, in], residual [T, out]."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, bias, "add")


def choose_path(decoder: nn.Module, rows: int, requested: str = "auto", reps: int = 3,
                dtype: torch.dtype | None = None) -> str:
    """"torch" or "onednn" for this decoder's linears at ``rows`` tokens per call, computed in ``dtype``
    (default: the weights' dtype).

    An explicit ``requested`` path (or $MMPRM_CPU_LINEAR) wins; "auto" measures both on each
    distinct weight shape (times the layers of that shape) and caches the answer."""
    if requested not in PATHS:
        raise ValueError(f"unknown linear path {requested!r}; choose one of {list(PATHS)}")
    requested = os.environ.get(ENV_VAR, requested) if requested == "auto" else requested
    if requested not in PATHS:
        raise ValueError(f"${ENV_VAR}={requested!r} is not a linear path; use one of {list(PATHS[1:])}")
    linears = _linears(decoder)
    dtype = dtype or (linears[0].weight.dtype if linears else torch.float32)
    if requested == "onednn" and not onednn_available(dtype):
        raise RuntimeError(f"linear path 'onednn' needs torch built with oneDNN and, for {dtype}, CPU support "
                           "for it (torch.backends.mkldnn); use 'torch'")
    if requested != "auto":
        return requested
    if not linears or not onednn_available(dtype) or linears[0].weight.device.type != "cpu":
        return "torch"
    counts: dict[tuple, int] = {}
    for m in linears:
        counts[tuple(m.weight.shape)] = counts.get(tuple(m.weight.shape), 0) + 1
    key = (tuple(sorted(counts.items())), dtype, rows, torch.get_num_threads())
    if key not in _choices:
        # The engine's own batch rows (up to 1024): at 512 rows the two paths were within noise on a
        # Zen 3 where oneDNN wins by 17 % at 1024.  Costs ~0.1 s for W1's shapes, ~25 s for 7B shapes.
        rows_timed = min(rows, 1024)
        totals = {"torch": 0.0, "onednn": 0.0}
        gen = torch.Generator().manual_seed(0)  # never the global RNG: callers' draws must not move
        with torch.inference_mode():
            for (out_f, in_f), n in counts.items():
                x = torch.randn(rows_timed, in_f, dtype=dtype, generator=gen)
                w = torch.randn(out_f, in_f, dtype=dtype, generator=gen)
                packed = pack_weight(w, rows)
                # B023: the lambdas are timed (and done with) within this iteration
                calls = {"torch": lambda: F.linear(x, w), "onednn": lambda: packed_linear(x, packed, None)}  # noqa: B023
                for path, seconds in time_interleaved(calls, reps).items():
                    totals[path] += n * seconds
        _choices[key] = "onednn" if totals["onednn"] <= CLEAR_WIN * totals["torch"] else "torch"
    return _choices[key]


def half_precision_is_fast(dtype: torch.dtype, reps: int = 3) -> bool:
    """Whether this CPU has fast ``dtype`` (bf16, fp16) GEMMs: oneDNN packs such weights only where the
    CPU has the units (avx512_bf16 or AMX for bf16; DNNL_MAX_CPU_ISA can hold it back), and a packed GEMM
    of a decoder's size must then not be slower than the faster fp32 path (a loose bar: noise must not
    flip the answer; without the units half precision runs 7-10x slower, AMD Zen 3).  Measured once per
    process and thread count (tens of ms)."""
    key = (dtype, torch.get_num_threads())
    if key not in _half_fast:
        try:  # oneDNN refuses to pack half precision where the CPU (or DNNL_MAX_CPU_ISA) lacks the units
            fast = onednn_available(dtype) and pack_weight(torch.zeros(64, 64, dtype=dtype), 16) is not None
        except RuntimeError:
            fast = False
        if fast:
            gen = torch.Generator().manual_seed(0)
            x, w = torch.randn(512, 1024, generator=gen), torch.randn(1024, 1024, generator=gen)
            xh, packed_h, packed = x.to(dtype), pack_weight(w.to(dtype), 512), pack_weight(w, 512)
            calls = {"half": lambda: packed_linear(xh, packed_h, None), "fp32": lambda: F.linear(x, w),
                     "fp32 packed": lambda: packed_linear(x, packed, None)}
            with torch.inference_mode():
                best = time_interleaved(calls, reps)
            fast = best["half"] <= HALF_WIN * min(best["fp32"], best["fp32 packed"])
        _half_fast[key] = fast
    return _half_fast[key]


def compute_dtype(model_dtype: torch.dtype, device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype a model in ``model_dtype`` is best computed in on ``device``, and why.

    Half precision stays where the hardware runs it fast (any CUDA device; a CPU with bf16 units);
    on a CPU without them the engine computes in fp32 (``half_precision_is_fast``)."""
    if model_dtype not in (torch.bfloat16, torch.float16) or device.type != "cpu":
        return model_dtype, "the model's dtype"
    if half_precision_is_fast(model_dtype):
        return model_dtype, f"the model's dtype; this CPU multiplies {model_dtype} faster than fp32"
    return torch.float32, (f"fp32: this CPU has no fast {model_dtype} GEMM (no avx512_bf16/AMX, or measured "
                           f"slower than fp32), so the engine computes in fp32")


class PackedLinears:
    """One decoder's linear weights packed for oneDNN at ``rows`` tokens per call."""

    def __init__(self, decoder: nn.Module, rows: int):
        self.decoder = decoder
        self.rows = rows
        self._packed: dict[int, tuple[tuple, torch.Tensor]] = {}  # id(linear) -> (weight stamp, packed)

    @staticmethod
    def _stamp(weight: torch.Tensor) -> tuple:
        return weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape)

    def packed(self, linear: nn.Linear) -> torch.Tensor:
        """The packed weight, repacked when the weight tensor was replaced or written in place."""
        stamp = self._stamp(linear.weight)
        entry = self._packed.get(id(linear))
        if entry is None or entry[0] != stamp:
            entry = (stamp, pack_weight(linear.weight, self.rows))
            self._packed[id(linear)] = entry
        return entry[1]

    @staticmethod
    def _forward_of(linear: nn.Linear, packed: torch.Tensor):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if x.dtype != packed.dtype:  # a caller in another dtype gets the plain path
                return F.linear(x, linear.weight, linear.bias)
            return packed_linear(x, packed, linear.bias)
        return forward

    @contextmanager
    def active(self):
        """Within: the decoder's nn.Linear layers compute through their packed weights."""
        linears = _linears(self.decoder)
        for m in linears:
            m.forward = self._forward_of(m, self.packed(m))
        try:
            yield
        finally:
            for m in linears:
                del m.forward
