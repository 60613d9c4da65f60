"""Compile every Triton launch the dispatchers can make, ahead of time, for CUDA targets -- no GPU needed.

    python -m mmprm_infer.kernels.aot              # sm_80 and sm_90, every dtype and head dim below

``triton.compile`` with a ``GPUTarget`` runs the whole NVIDIA pipeline (TTIR ->
TTGIR -> LLVM -> PTX -> cubin, with the ptxas that ships in the triton wheel)
on a machine without CUDA.  So a kernel change that only the CPU interpreter
accepts (interpreter tests run on numpy and miss type, layout and
shared-memory errors) fails here, on any CI machine.

The launches are not written out by hand: each dispatcher's Triton path runs
on small CPU tensors with the kernel launcher swapped for a recorder, so the
list is what the code really launches -- the same tile choices, constexprs,
dtypes and launch options.  Needs Triton in compiled (not interpreter) mode:
run it in a process without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from mmprm_infer.kernels import step_reward
from mmprm_infer.kernels.prefix_attention import triton_ops
from mmprm_infer.kernels.triton_runtime import interpreter_active, triton

# What the engines feed the kernels: model dtypes, and head dims from tiny models to 7B-class ones
# (80 is a non-power of two: BLOCK_D pads it).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HEAD_DIMS = (64, 80, 128, 256)
HIDDEN_SIZES = (512, 3584)  # step_reward: BLOCK_D = min(1024, next power of two)
TARGETS = ((80, 32), (90, 32))  # (compute capability, warp size)

_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
                 torch.int32: "i32", torch.int64: "i64"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


@dataclass
class Launch:
    """One recorded kernel launch: the kernel function, its positional args and keyword args."""

    fn: Callable
    args: tuple
    kwargs: dict

    def signature(self) -> tuple[dict[str, str], dict[str, Any], dict[str, int]]:
        """(argument name -> Triton type, constexpr values, launch options) as ``triton.compile`` takes them."""

        names = list(inspect.signature(self.fn).parameters)
        constexprs = {k: v for k, v in self.kwargs.items() if k not in _LAUNCH_OPTIONS}
        options = {k: v for k, v in self.kwargs.items() if k in _LAUNCH_OPTIONS}
        if len(self.args) + len(constexprs) != len(names):
            raise RuntimeError(f"{self.fn.__name__}: {len(self.args)} args + {sorted(constexprs)} do not cover "
                               f"its parameters {names}")
        sig = {}
        for name, value in zip(names, self.args):
            sig[name] = _triton_type(name, value)
        for name in constexprs:
            sig[name] = "constexpr"
        return sig, constexprs, options

    def key(self) -> tuple:
        sig, constexprs, options = self.signature()
        return (self.fn.__name__, tuple(sig.items()), tuple(sorted(constexprs.items())), tuple(sorted(options.items())))


def _triton_type(name: str, value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if not -2**31 <= value < 2**31 else "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument {name}: no Triton type for {type(value).__name__}")


@dataclass
class _Recorder:
    launches: list[Launch] = field(default_factory=list)

    def jit(self, fn):
        recorder = self

        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: recorder.launches.append(Launch(fn, args, kwargs))

        return _Grid()


@contextmanager
def _recording():
    """Swap the kernel modules' launcher (``_jit``) for a recorder."""
    recorder = _Recorder()
    saved = {m: m._jit for m in (triton_ops, step_reward)}
    try:
        for m in saved:
            m._jit = recorder.jit
        yield recorder
    finally:
        for m, jit in saved.items():
            m._jit = jit


def record_launches(dtypes=DTYPES, head_dims=HEAD_DIMS, hidden_sizes=HIDDEN_SIZES) -> list[Launch]:
    """Every distinct Triton launch of the public entry points' Triton paths (as ``prefix_attention``'s
    and ``step_reward``'s dispatchers call them) over the given dtypes and sizes."""
    pa, sr = triton_ops, step_reward
    t, p, h, hkv, cu = 6, 5, 4, 2, [0, 2, 6]
    with _recording() as rec:
        for dtype in dtypes:
            for d in head_dims:
                q = torch.zeros(t, h, d, dtype=dtype)
                k, kp = torch.zeros(t, hkv, d, dtype=dtype), torch.zeros(p, hkv, d, dtype=dtype)
                part = (torch.zeros(t, h, d), torch.zeros(t, h))
                pa.prefix_partial(q, kp, kp, 1.0)  # prefix_partial
                pa.suffix(q, k, k, cu, 1.0)  # suffix_partial
                # shared_prefix_attention: prefix partial, then the suffix kernel with the merge fused in
                pa.suffix(q, k, k, cu, 1.0, init=part, out_dtype=dtype, write_lse=False)
                # flash_attn backend: its partials (out in q's dtype, lse fp32) merged into q's dtype
                pa.merge(part[0].to(dtype), part[1], part[0].to(dtype), part[1], out_dtype=dtype)
            pa.merge(*part, *part)  # merge_partials (fp32)
            for hidden_size in hidden_sizes:  # marker_rewards: rows [M, d] of the model's dtype, w [d]
                sr._rewards_triton(torch.zeros(t, hidden_size, dtype=dtype), torch.zeros(hidden_size, dtype=dtype), 0.0)
    unique: dict[tuple, Launch] = {}
    for launch in rec.launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


def compile_launch(launch: Launch, capability: int, warp_size: int = 32):
    """``triton.compile`` one recorded launch for ``cuda:capability``; returns the compiled kernel."""
    import triton  # triton: heavy, and optional where there is no GPU
    from triton.backends.compiler import GPUTarget  # triton: heavy, and optional where there is no GPU
    from triton.compiler import ASTSource  # triton: heavy, and optional where there is no GPU
    from triton.runtime.jit import JITFunction  # triton: heavy, and optional where there is no GPU

    sig, constexprs, options = launch.signature()
    src = ASTSource(fn=JITFunction(launch.fn), signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", capability, warp_size), options=options)


def compile_all(targets=TARGETS, progress: bool = True) -> list[tuple[str, int, str]]:
    """Compile every recorded launch for every target; returns (kernel, capability, error) per failure."""

    if triton is None:
        raise RuntimeError("AOT compilation needs the triton package")
    if interpreter_active():
        raise RuntimeError("Triton is in interpreter mode (TRITON_INTERPRET=1): run the AOT check in a process "
                           "without it")
    launches = record_launches()
    failures = []
    for capability, warp_size in targets:
        for launch in launches:
            try:
                kernel = compile_launch(launch, capability, warp_size)
                if not kernel.asm.get("cubin"):
                    raise RuntimeError("no cubin produced")
            except Exception as exc:  # noqa: BLE001 - every failure is reported, not only the first
                failures.append((launch.fn.__name__, capability, f"{type(exc).__name__}: {exc}"))
        if progress:
            print(f"sm_{capability}: {len(launches)} launches compiled, "
                  f"{sum(f[1] == capability for f in failures)} failed", flush=True)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmprm_infer.kernels.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--capability", type=int, action="append",
                        help="CUDA compute capability, e.g. 80 or 90 (repeatable; default both)")
    args = parser.parse_args(argv)
    targets = tuple((c, 32) for c in args.capability) if args.capability else TARGETS
    failures = compile_all(targets)
    for name, capability, error in failures:
        print(f"FAILED {name} for sm_{capability}: {error.splitlines()[0] if error else error}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
