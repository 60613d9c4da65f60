"""Plan once, run per layer: what one forward's shared-prefix attention needs, resolved and checked once.

A forward runs the same segment layout through every decoder layer.  ``plan``
resolves the backend, checks the segment offsets (and the query rows, for the
rows-only variant) on the host, and keeps what a backend builds from them
(Triton block tables, the offsets as a device tensor, the CPU's prefix path);
``AttentionPlan.run`` is then all a layer calls, with no validation and no
device sync (FlashInfer's ``plan()`` / ``run()`` split).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from mmprm_infer.kernels import backends
from mmprm_infer.kernels.prefix_attention import flash_attn_ops, reference, torch_ops, triton_ops
from mmprm_infer.kernels.prefix_attention.partials import no_keys

BACKENDS = ("auto", "triton", "torch", "reference", "flash_attn")
_cuda_choices: dict[tuple, str] = {}  # (shape class, dtype, device) -> measured backend


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """"auto" is flash-attn on CUDA in half precision where it is installed, else Triton on CUDA, else torch."""
    resolved = backends.resolve(backend, device, BACKENDS)
    usable = flash_attn_ops.usable(device, dtype, head_dim)
    if backend == "auto" and resolved == "triton" and usable:
        return "flash_attn"
    if backend == "flash_attn" and not usable:
        raise ValueError(
            "backend='flash_attn' needs flash_attn installed, CUDA tensors in fp16/bf16 and D <= 256; "
            "use backend='triton' or 'auto'"
        )
    return resolved


def choose_cuda_backend(rows: int, prefix: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                        device: torch.device, reps: int = 3) -> str:
    """"flash_attn" or "triton", whichever runs these shapes faster on this GPU (both usable: half
    precision, flash-attn installed); timed once per shape class (powers of two) on random inputs."""
    rows_class, prefix_class = 1 << max(0, rows - 1).bit_length(), 1 << max(0, prefix - 1).bit_length()
    key = (rows_class, prefix_class, heads, kv_heads, head_dim, dtype, str(device))
    if key not in _cuda_choices:
        gen = torch.Generator(device=device).manual_seed(0)
        t = min(rows_class, 8192)
        q = torch.randn(t, heads, head_dim, generator=gen, device=device, dtype=dtype)
        ks, vs = torch.randn(2, t, kv_heads, head_dim, generator=gen, device=device, dtype=dtype).unbind(0)
        kp, vp = torch.randn(2, prefix_class, kv_heads, head_dim, generator=gen, device=device, dtype=dtype).unbind(0)
        cu = list(range(0, t, max(1, t // 16))) + [t]
        cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
        scale = head_dim ** -0.5
        calls = {"flash_attn": lambda: flash_attn_ops.attention(q, ks, vs, kp, vp, cu, scale, cu_t),
                 "triton": lambda: triton_ops.attention(q, ks, vs, kp, vp, cu, scale, {})}
        best = backends.time_interleaved(calls, reps, sync=torch.cuda.synchronize)
        _cuda_choices[key] = min(best, key=best.get)  # type: ignore[arg-type]
    return _cuda_choices[key]


def segment_offsets(cu_seqlens, total: int) -> list[int]:
    """cu_seqlens as host ints, checked: 1-D, starts at 0, non-decreasing, ends at T = ``total``."""
    cu = backends.host_offsets(cu_seqlens, "cu_seqlens", "segment")
    if cu[-1] != total:
        raise ValueError(
            f"cu_seqlens[-1]={cu[-1]} must equal the number of packed suffix tokens T={total} "
            "(q.shape[0]); rebuild cu_seqlens from the suffix lengths"
        )
    if any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing (segment lengths >= 0), got {cu}")
    return cu


def segment_starts(rows: list[int], cu: list[int]) -> list[int]:
    """Start of the segment holding each packed row; rows outside [0, T) are an error."""
    starts = []
    for r in rows:
        i = bisect.bisect_right(cu, r) - 1
        if r < 0 or i >= len(cu) - 1:
            raise ValueError(f"query row {r} lies outside the packed suffixes [0, {cu[-1]})")
        starts.append(cu[i])
    return starts


@dataclass
class AttentionPlan:
    """One forward's attention layout: T packed suffix rows in segments ``cu``, over one shared prefix.

    backend: resolved ("reference", "torch", "triton" or "flash_attn"); rows: the packed rows the
    rows-only variant computes (None: not planned), with ``starts`` their segments' first rows;
    prefix_path: the torch backend's prefix partial, "flash", "matmul" or "auto" (measured at the
    first run, ``torch_ops.choose_prefix_path``); measure_cuda: "auto" resolved to flash-attn on CUDA,
    to be confirmed against Triton at the first run (``choose_cuda_backend``)."""

    backend: str
    cu: list[int]
    rows: list[int] | None = None
    starts: list[int] | None = None
    prefix_path: str = "auto"
    measure_cuda: bool = False
    _built: dict = field(default_factory=dict, repr=False)  # what backends build once per plan

    @property
    def num_tokens(self) -> int:
        return self.cu[-1]

    def _torch_prefix_path(self, q: torch.Tensor, k_prefix: torch.Tensor) -> str:
        if self.prefix_path == "auto":
            self.prefix_path = torch_ops.choose_prefix_path(
                q.shape[0], k_prefix.shape[0], q.shape[1], k_prefix.shape[1], q.shape[2], q.dtype)
        return self.prefix_path

    def run(self, q, k_suffix, v_suffix, k_prefix, v_prefix, scale: float) -> torch.Tensor:
        """q [T, H, D], k/v_suffix [T, Hkv, D], k/v_prefix [P, Hkv, D] -> [T, H, D] in q's dtype."""
        if self.measure_cuda:
            self.backend = choose_cuda_backend(q.shape[0], k_prefix.shape[0], q.shape[1], k_prefix.shape[1],
                                               q.shape[2], q.dtype, q.device)
            self.measure_cuda = False
        if self.backend == "torch":
            path = self._torch_prefix_path(q, k_prefix)
            return torch_ops.attention(q, k_suffix, v_suffix, k_prefix, v_prefix, self.cu, scale, path)
        if self.backend == "reference":
            return reference.attention(q, k_suffix, v_suffix, k_prefix, v_prefix, self.cu, scale)
        if self.backend == "flash_attn":
            if "cu_tensor" not in self._built:
                self._built["cu_tensor"] = torch.tensor(self.cu, dtype=torch.int32, device=q.device)
            return flash_attn_ops.attention(q, k_suffix, v_suffix, k_prefix, v_prefix, self.cu, scale,
                                            self._built["cu_tensor"])
        tables = self._built.setdefault("triton_tables", {})
        return triton_ops.attention(q, k_suffix, v_suffix, k_prefix, v_prefix, self.cu, scale, tables)

    def run_rows(self, q_rows, k_suffix, v_suffix, k_prefix, v_prefix, scale: float) -> torch.Tensor:
        """The planned rows only: q_rows [M, H, D] (their queries, in ``rows`` order) -> [M, H, D] in q's dtype.

        The suffix part is a masked batched matmul on every device (M marker queries are few); the
        prefix part and the merge take the plan's backend."""
        if self.rows is None:
            raise ValueError("this plan was made without rows; pass rows=... to plan_attention()")
        m, h, d = q_rows.shape
        if m == 0:
            return no_keys(0, h, d, q_rows.dtype, q_rows.device)[0]
        if self.backend == "reference":
            pre = reference.prefix_partial(q_rows, k_prefix, v_prefix, scale)
            suf = reference.suffix_rows_partial(q_rows, self.rows, self.starts, k_suffix, v_suffix, scale)
            return reference.merge(*pre, *suf).to(q_rows.dtype)
        suf = torch_ops.suffix_rows_partial(q_rows, self.rows, self.starts, k_suffix, v_suffix, scale)
        if self.backend == "torch":
            pre = torch_ops.prefix_partial(q_rows, k_prefix, v_prefix, scale, self._torch_prefix_path(q_rows, k_prefix))
            return torch_ops.merge_with_suffix(pre, suf, q_rows.dtype)
        if self.backend == "flash_attn":
            pre = flash_attn_ops.prefix_partial(q_rows, k_prefix, v_prefix, scale)
        else:
            pre = triton_ops.prefix_partial(q_rows, k_prefix, v_prefix, scale)
        # pre is the prefix partial's (out, lse) pair
        return triton_ops.merge(*pre, suf[0].float(), suf[1].float(), out_dtype=q_rows.dtype)  # type: ignore[call-arg, misc]


def plan_attention(cu_seqlens, num_tokens: int, *, device, dtype: torch.dtype = torch.float32, head_dim: int = 64,
         backend: str = "auto", rows=None, prefix_path: str = "auto") -> AttentionPlan:
    """Plan the attention of ``num_tokens`` packed suffix rows in segments ``cu_seqlens`` (tensor or list).

    device, dtype, head_dim: of the queries (they decide "auto"); rows: packed rows for ``run_rows``
    (a list or 1-D tensor of ints in [0, T)); prefix_path: see ``AttentionPlan``."""
    if prefix_path not in torch_ops.PREFIX_PATHS:
        raise ValueError(f"unknown prefix path {prefix_path!r}; choose one of {list(torch_ops.PREFIX_PATHS)}")
    device = torch.device(device)
    cu = segment_offsets(cu_seqlens, num_tokens)
    resolved = resolve_backend(backend, device, dtype, head_dim)
    starts = None
    if rows is not None:
        rows = [int(r) for r in (rows.tolist() if isinstance(rows, torch.Tensor) else rows)]
        starts = segment_starts(rows, cu)
    return AttentionPlan(resolved, cu, rows, starts, prefix_path,
                         measure_cuda=backend == "auto" and resolved == "flash_attn")
