"""The one-shot public functions: check the tensors, plan, run.  A forward that runs many layers
over one layout plans once instead (``plan_attention``) and calls ``AttentionPlan.run`` per layer."""

from __future__ import annotations

import torch

from mmprm_infer.kernels.prefix_attention import flash_attn_ops, reference, torch_ops, triton_ops
from mmprm_infer.kernels.prefix_attention.partials import no_keys
from mmprm_infer.kernels.prefix_attention.plan import BACKENDS, plan_attention, resolve_backend, segment_offsets

__all__ = ["BACKENDS", "merge_partials", "prefix_partial", "shared_prefix_attention", "shared_prefix_attention_rows",
           "suffix_partial", "suffix_rows_partial"]


def check_qkv(q, k, v, k_name: str, v_name: str) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [T, H, D], got shape {tuple(q.shape)}")
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            f"{k_name} and {v_name} must both be [tokens, Hkv, D] with equal shapes, "
            f"got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"head dim mismatch: q has D={q.shape[2]}, {k_name} has D={k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"query heads H={q.shape[1]} must be a multiple of kv heads Hkv={k.shape[1]} "
            f"({k_name}); pass kv heads that divide H (GQA) or equal it (MHA)"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, {k_name}, {v_name} must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(
            f"q, {k_name}, {v_name} must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
            "cast them to the same dtype first"
        )


def _check_suffix(q, k_suffix) -> None:
    if k_suffix.shape[0] != q.shape[0]:
        raise ValueError(
            f"k_suffix has {k_suffix.shape[0]} tokens but q has {q.shape[0]}; both hold the packed suffixes"
        )


def _check_kv_heads(k_prefix, k_suffix) -> None:
    if k_prefix.shape[1] != k_suffix.shape[1]:
        raise ValueError(
            f"k_prefix has {k_prefix.shape[1]} kv heads but k_suffix has {k_suffix.shape[1]}; they must match"
        )


def _row_list(rows, q_rows) -> list[int]:
    rows = [int(r) for r in (rows.tolist() if isinstance(rows, torch.Tensor) else rows)]
    if len(rows) != q_rows.shape[0]:
        raise ValueError(
            f"rows has {len(rows)} entries but q_rows has {q_rows.shape[0]} queries; give one row per query"
        )
    return rows


def _resolve(backend: str, q: torch.Tensor) -> str:
    return resolve_backend(backend, q.device, q.dtype, q.shape[2])


def prefix_partial(q, k_prefix, v_prefix, scale: float, backend: str = "auto"):
    """All T queries against the P prefix keys: (out [T, H, D] fp32, lse [T, H] fp32).

    P = 0 gives out = 0 and lse = -inf, which merges as "no prefix"."""
    check_qkv(q, k_prefix, v_prefix, "k_prefix", "v_prefix")
    backend = _resolve(backend, q)
    scale = float(scale)
    if backend == "reference":
        return reference.prefix_partial(q, k_prefix, v_prefix, scale)
    if backend == "torch":
        path = torch_ops.choose_prefix_path(q.shape[0], k_prefix.shape[0], q.shape[1], k_prefix.shape[1],
                                            q.shape[2], q.dtype)
        out, lse = torch_ops.prefix_partial(q, k_prefix, v_prefix, scale, path)
        return out.float(), lse.float()
    if backend == "flash_attn":
        return flash_attn_ops.prefix_partial(q, k_prefix, v_prefix, scale)
    return triton_ops.prefix_partial(q, k_prefix, v_prefix, scale)


def suffix_partial(q, k_suffix, v_suffix, cu_seqlens, scale: float, backend: str = "auto"):
    """Block-diagonal causal attention within each packed segment: (out [T, H, D] fp32, lse [T, H] fp32)."""
    check_qkv(q, k_suffix, v_suffix, "k_suffix", "v_suffix")
    _check_suffix(q, k_suffix)
    cu = segment_offsets(cu_seqlens, q.shape[0])
    backend = _resolve(backend, q)
    scale = float(scale)
    if backend == "reference":
        return reference.suffix_partial(q, k_suffix, v_suffix, cu, scale)
    if backend == "torch":
        out, lse = torch_ops.suffix_partial(q, k_suffix, v_suffix, cu, scale)
        return out.float(), lse.float()
    if backend == "flash_attn":
        return flash_attn_ops.suffix_partial(q, k_suffix, v_suffix, cu, scale)
    return triton_ops.suffix(q, k_suffix, v_suffix, cu, scale)


def merge_partials(out1, lse1, out2, lse2, backend: str = "auto"):
    """Exact merge of two attention partials over disjoint key sets; fp32 [T, H, D].

    lse = -inf marks a partial with no keys (weight 0); both -inf gives 0."""
    if out1.dim() != 3 or out1.shape != out2.shape:
        raise ValueError(f"out1 and out2 must both be [T, H, D], got {tuple(out1.shape)} and {tuple(out2.shape)}")
    if lse1.shape != out1.shape[:2] or lse2.shape != out1.shape[:2]:
        raise ValueError(
            f"lse1/lse2 must be [T, H] = {tuple(out1.shape[:2])}, got {tuple(lse1.shape)} and {tuple(lse2.shape)}"
        )
    backend = resolve_backend(backend, out1.device, torch.float32, out1.shape[2])
    if backend == "reference":
        return reference.merge(out1, lse1, out2, lse2)
    if backend == "torch":
        return torch_ops.merge(out1, lse1, out2, lse2, torch.float32)
    return triton_ops.merge(out1, lse1, out2, lse2)


def shared_prefix_attention(q, k_suffix, v_suffix, k_prefix, v_prefix, cu_seqlens, scale: float,
                            backend: str = "auto"):
    """Attention of packed suffix queries over (shared prefix + own causal suffix); [T, H, D] in q's dtype.

    backend: "auto" (flash-attn in half precision where installed, else Triton, on CUDA; torch
    elsewhere), "triton", "torch", "reference" (float64 oracle) or "flash_attn".  cu_seqlens may be
    a tensor or a list; a list avoids a device sync on CUDA.  A caller that runs many layers over one
    layout plans once instead (``plan_attention``) and calls ``AttentionPlan.run`` per layer.
    """
    check_qkv(q, k_suffix, v_suffix, "k_suffix", "v_suffix")
    check_qkv(q, k_prefix, v_prefix, "k_prefix", "v_prefix")
    _check_suffix(q, k_suffix)
    _check_kv_heads(k_prefix, k_suffix)
    planned = plan_attention(cu_seqlens, q.shape[0], device=q.device, dtype=q.dtype, head_dim=q.shape[2],
                             backend=backend)
    return planned.run(q, k_suffix, v_suffix, k_prefix, v_prefix, float(scale))


def suffix_rows_partial(q_rows, rows, k_suffix, v_suffix, cu_seqlens, scale: float, backend: str = "auto"):
    """``suffix_partial`` for a subset of query rows: q_rows [M, H, D] are the queries of packed rows
    ``rows`` (M ints in [0, T)); each sees its own segment's suffix keys up to itself.
    Returns (out [M, H, D] fp32, lse [M, H] fp32).  backend: "reference" (float64 oracle) or
    anything else for the batched-matmul path, which runs on every device."""
    check_qkv(q_rows, k_suffix, v_suffix, "k_suffix", "v_suffix")
    rows = _row_list(rows, q_rows)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    planned = plan_attention(cu_seqlens, k_suffix.shape[0], device=q_rows.device, dtype=q_rows.dtype,
                   head_dim=q_rows.shape[2], backend="reference" if backend == "reference" else "torch", rows=rows)
    m, h, d = q_rows.shape
    if m == 0:
        return no_keys(0, h, d, torch.float32, q_rows.device)
    if planned.backend == "reference":
        return reference.suffix_rows_partial(q_rows, rows, planned.starts, k_suffix, v_suffix, float(scale))
    out, lse = torch_ops.suffix_rows_partial(q_rows, rows, planned.starts, k_suffix, v_suffix, float(scale))
    return out.float(), lse.float()


def shared_prefix_attention_rows(q_rows, rows, k_suffix, v_suffix, k_prefix, v_prefix, cu_seqlens, scale: float,
                                 backend: str = "auto"):
    """``shared_prefix_attention(q, ...)[rows]`` computed from the queries of those rows alone;
    [M, H, D] in q_rows' dtype.  backend as for ``shared_prefix_attention`` ("reference" is the
    float64 oracle; the suffix part is the batched-matmul path on every other backend)."""
    check_qkv(q_rows, k_prefix, v_prefix, "k_prefix", "v_prefix")
    check_qkv(q_rows, k_suffix, v_suffix, "k_suffix", "v_suffix")
    _check_kv_heads(k_prefix, k_suffix)
    planned = plan_attention(cu_seqlens, k_suffix.shape[0], device=q_rows.device, dtype=q_rows.dtype,
                   head_dim=q_rows.shape[2], backend=backend, rows=_row_list(rows, q_rows))
    return planned.run_rows(q_rows, k_suffix, v_suffix, k_prefix, v_prefix, float(scale))
