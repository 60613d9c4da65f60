"""The flash-attn backend (CUDA, fp16/bf16): its varlen kernels return the lse the partials merge on.

Where the installed flash-attn pads its lse per batch (older releases), the
partials fall back to the Triton kernels.
"""

from __future__ import annotations

import functools

import torch

from mmprm_infer.kernels.prefix_attention import triton_ops
from mmprm_infer.kernels.prefix_attention.partials import no_keys


@functools.cache
def varlen_func():
    """flash_attn_varlen_func when the package imports, else None; probed once per process."""
    try:
        from flash_attn import flash_attn_varlen_func  # optional: the gpu extra
    except Exception:  # noqa: BLE001 - not installed, or built for another torch/CUDA
        return None
    return flash_attn_varlen_func


def usable(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """flash-attn only runs half precision on CUDA with head dims up to 256."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_dim <= 256
            and varlen_func() is not None)


def _partial(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    result = varlen_func()(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal,
                           return_attn_probs=True)
    out, lse = result[0], result[1]
    if lse.dim() != 2 or lse.shape != (q.shape[1], q.shape[0]):
        return None  # older flash-attn pads lse per batch; the caller falls back to Triton
    return out.float(), lse.transpose(0, 1).float()


def prefix_partial(q, k_prefix, v_prefix, scale):
    t, h, d = q.shape
    p = k_prefix.shape[0]
    if p == 0 or t == 0:
        return no_keys(t, h, d, torch.float32, q.device)
    cu_q = torch.tensor([0, t], dtype=torch.int32, device=q.device)
    cu_k = torch.tensor([0, p], dtype=torch.int32, device=q.device)
    part = _partial(q, k_prefix, v_prefix, cu_q, cu_k, t, p, scale, causal=False)
    return part if part is not None else triton_ops.prefix_partial(q, k_prefix, v_prefix, scale)


def suffix_partial(q, k_suffix, v_suffix, cu, scale, cu_tensor=None):
    """cu_tensor: ``cu`` as an int32 device tensor, when the caller keeps one (``AttentionPlan``)."""
    if q.shape[0] == 0:
        return triton_ops.suffix(q, k_suffix, v_suffix, cu, scale)
    cu_t = cu_tensor if cu_tensor is not None else torch.tensor(cu, dtype=torch.int32, device=q.device)
    max_s = max(b - a for a, b in zip(cu, cu[1:]))
    part = _partial(q, k_suffix, v_suffix, cu_t, cu_t, max_s, max_s, scale, causal=True)
    return part if part is not None else triton_ops.suffix(q, k_suffix, v_suffix, cu, scale)


def attention(q, k_suffix, v_suffix, k_prefix, v_prefix, cu, scale, cu_tensor=None):
    pre = prefix_partial(q, k_prefix, v_prefix, scale)
    suf = suffix_partial(q, k_suffix, v_suffix, cu, scale, cu_tensor)
    return triton_ops.merge(*pre, *suf, out_dtype=q.dtype)
