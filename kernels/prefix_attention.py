"""Shared-prefix attention: N candidates attend to one prefix plus their own suffix.

PRM scoring runs N candidate solutions after one shared prompt.  The prompt's
keys/values (``k_prefix``, ``v_prefix``, P tokens) are computed once; the
candidates' suffix tokens are packed without padding into T = sum(S_i) rows
delimited by ``cu_seqlens``.  Query t of segment n attends to every prefix key
plus the suffix keys of its own segment up to and including itself.

The work splits into two exact partial attentions that are merged by their
log-sum-exp (the flash-decoding / cascade-attention identity):

    prefix partial: all T queries against the P prefix keys (no mask)
    suffix partial: block-diagonal causal attention within each segment
    merge:          out = (e^lse1 out1 + e^lse2 out2) / (e^lse1 + e^lse2)

so the prefix is never copied N times.  Each piece has a plain torch
reference (the test oracle), a fast torch path for the CPU and Triton kernels
for CUDA; ``shared_prefix_attention`` is the one dispatcher.

Layouts: q [T, H, D]; k/v suffix [T, Hkv, D]; k/v prefix [P, Hkv, D];
query head h reads kv head h // (H // Hkv) (GQA).  Partials are fp32:
out [T, H, D] and lse [T, H] (natural log; -inf where there are no keys).
"""

import bisect
import math

import torch

from mmprm_infer.kernels import triton_runtime
from mmprm_infer.kernels.triton_runtime import check_triton_usable, tl, triton
from mmprm_infer.kernels.triton_runtime import jit_lazily as _jit

BACKENDS = ("auto", "triton", "torch", "reference", "flash_attn")
LOG2E = 1.4426950408889634

# The matmul prefix fallback chunks queries so one [chunk * H, P] score block
# stays ~16 MB instead of T * H * P floats (100+ MB at T=3200, P=1000).
_PREFIX_SCORE_BUDGET = 1 << 22  # floats in one score chunk
# Triton tiles; None = pick by head dim and dtype (_tiles).  Tests override them.
BLOCK_M = None
BLOCK_N = None


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocator; tests swap it for a NaN-filled one to catch unwritten rows."""
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------


def _check_qkv(q, k, v, k_name: str, v_name: str) -> None:
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


def _cu_list(cu_seqlens, total: int) -> list[int]:
    """cu_seqlens as host ints, checked: 1-D, starts at 0, non-decreasing, ends at T."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise ValueError(
                f"cu_seqlens must be a 1-D integer tensor [N+1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
            )
        cu = cu_seqlens.tolist()
    else:
        cu = [int(c) for c in cu_seqlens]
    if len(cu) < 2:
        raise ValueError(f"cu_seqlens needs N+1 >= 2 entries (one segment at least), got {len(cu)}")
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0]={cu[0]}")
    if cu[-1] != total:
        raise ValueError(
            f"cu_seqlens[-1]={cu[-1]} must equal the number of packed suffix tokens T={total} "
            "(q.shape[0]); rebuild cu_seqlens from the suffix lengths"
        )
    if any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing (segment lengths >= 0), got {cu}")
    return cu


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")




def _flash_attn_func():
    """flash_attn_varlen_func when the package imports, else None."""
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    return flash_attn_varlen_func


def _flash_attn_usable(q: torch.Tensor) -> bool:
    # flash-attn only runs half precision on CUDA with head dims up to 256
    return (
        q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[2] <= 256
        and _flash_attn_func() is not None
    )


def _resolve(backend: str, device: torch.device, q: torch.Tensor | None = None) -> str:
    _check_backend(backend)
    if backend == "auto":
        if device.type == "cuda" and triton is not None:
            return "flash_attn" if q is not None and _flash_attn_usable(q) else "triton"
        return "torch"
    if backend == "triton":
        check_triton_usable(device)
    if backend == "flash_attn" and (q is None or not _flash_attn_usable(q)):
        raise ValueError(
            "backend='flash_attn' needs flash_attn installed, CUDA tensors in fp16/bf16 and D <= 256; "
            "use backend='triton' or 'auto'"
        )
    return backend


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _no_keys(t: int, h: int, d: int, dtype, device):
    out = _empty((t, h, d), dtype, device)
    lse = _empty((t, h), dtype, device)
    out.zero_()
    lse.fill_(-math.inf)
    return out, lse


# --------------------------------------------------------------------------
# reference (oracle): explicit float64 math, one segment and head group at a time
# --------------------------------------------------------------------------


def _expand_kv(k: torch.Tensor, heads: int) -> torch.Tensor:
    return k.repeat_interleave(heads // k.shape[1], dim=1)


def _masked_attention_reference(q, k, v, allowed, scale):
    """q [L, H, D], k/v [S, H, D], allowed [L, S] -> (out [L, H, D], lse [L, H]) in float64."""
    scores = torch.einsum("lhd,shd->hls", q.double(), k.double()) * scale
    scores = scores.masked_fill(~allowed[None], -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [H, L]
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # rows without keys -> 0
    out = torch.einsum("hls,shd->lhd", probs, v.double())
    return out, lse.transpose(0, 1)


def _prefix_partial_reference(q, k_prefix, v_prefix, scale):
    t, h, d = q.shape
    if k_prefix.shape[0] == 0 or t == 0:
        return _no_keys(t, h, d, torch.float32, q.device)
    allowed = torch.ones(t, k_prefix.shape[0], dtype=torch.bool, device=q.device)
    out, lse = _masked_attention_reference(q, _expand_kv(k_prefix, h), _expand_kv(v_prefix, h), allowed, scale)
    return out.float(), lse.float()


def _suffix_partial_reference(q, k_suffix, v_suffix, cu, scale):
    t, h, d = q.shape
    out = _empty((t, h, d), torch.float32, q.device)
    lse = _empty((t, h), torch.float32, q.device)
    for a, b in zip(cu, cu[1:]):
        causal = torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).tril()
        o, l = _masked_attention_reference(
            q[a:b], _expand_kv(k_suffix[a:b], h), _expand_kv(v_suffix[a:b], h), causal, scale
        )
        out[a:b], lse[a:b] = o.float(), l.float()
    return out, lse


def _attention_reference(q, k_suffix, v_suffix, k_prefix, v_prefix, cu, scale):
    """The definition itself: each segment attends to cat(prefix, own suffix) under a shifted causal mask."""
    t, h, d = q.shape
    p = k_prefix.shape[0]
    out = _empty((t, h, d), q.dtype, q.device)
    for a, b in zip(cu, cu[1:]):
        s = b - a
        keys = torch.cat([k_prefix, k_suffix[a:b]])
        values = torch.cat([v_prefix, v_suffix[a:b]])
        # query i sees key j when j is in the prefix (j < P) or j - P <= i
        allowed = torch.ones(s, p + s, dtype=torch.bool, device=q.device).tril(diagonal=p)
        o, _ = _masked_attention_reference(q[a:b], _expand_kv(keys, h), _expand_kv(values, h), allowed, scale)
        out[a:b] = o.to(q.dtype)
    return out


def _merge_reference(out1, lse1, out2, lse2):
    lse1, lse2 = lse1.double(), lse2.double()
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).nan_to_num(0.0)  # both -inf: no keys at all -> 0
    w2 = torch.exp(lse2 - lse).nan_to_num(0.0)
    return (out1.double() * w1[..., None] + out2.double() * w2[..., None]).float()


# --------------------------------------------------------------------------
# fast torch (CPU): ATen's CPU flash kernel when present, batched matmuls otherwise
# --------------------------------------------------------------------------


def _cpu_flash_op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _use_cpu_flash(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and _cpu_flash_op() is not None


def _gqa_view(q, k, v):
    """Views for one batched call without copying kv: q -> [Hkv, G, L, D], k/v -> [Hkv, G(stride 0), S, D]."""
    length, h, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    qv = q.reshape(length, hkv, g, d).permute(1, 2, 0, 3)
    kv = k.permute(1, 0, 2).unsqueeze(1).expand(hkv, g, k.shape[0], d)
    vv = v.permute(1, 0, 2).unsqueeze(1).expand(hkv, g, v.shape[0], d)
    return qv, kv, vv


def _flash_cpu(q, k, v, scale, causal):
    """ATen CPU flash attention with lse.  Callers guarantee >= 1 query and key (0 crashes ATen)."""
    length, h, d = q.shape
    qv, kv, vv = _gqa_view(q, k, v)
    out, lse = _cpu_flash_op()(qv, kv, vv, is_causal=causal, scale=scale)
    # out [Hkv, G, L, D] -> [L, H, D]; lse [Hkv, G, L] -> [L, H]
    return out.permute(2, 0, 1, 3).reshape(length, h, d), lse.permute(2, 0, 1).reshape(length, h)


def _softmax_partial_matmul(qg, kt, vv, scale, mask=None):
    """qg [B, R, D] @ kt [B, D, S] -> normalized out [B, R, D], lse [B, R]; mask [R, S] True = keep."""
    scores = torch.bmm(qg, kt).mul_(scale)
    if mask is not None:
        scores.masked_fill_(~mask, -math.inf)
    m = scores.amax(dim=-1, keepdim=True)
    scores.sub_(m).exp_()
    denom = scores.sum(dim=-1, keepdim=True)
    out = torch.bmm(scores, vv).div_(denom)
    return out, (m + denom.log()).squeeze(-1)


def _prefix_partial_matmul(q, k_prefix, v_prefix, scale, chunk: int | None = None):
    """Fallback when ATen has no CPU flash op: per kv head, the G query heads of a chunk form one matmul."""
    t, h, d = q.shape
    p, hkv, _ = k_prefix.shape
    g = h // hkv
    chunk = chunk or max(16, _PREFIX_SCORE_BUDGET // max(1, h * p))
    out = _empty((t, h, d), q.dtype, q.device)
    lse = _empty((t, h), q.dtype, q.device)
    kt = k_prefix.permute(1, 2, 0)  # [Hkv, D, P]
    vv = v_prefix.permute(1, 0, 2)  # [Hkv, P, D]
    for s in range(0, t, chunk):
        c = min(chunk, t - s)
        qg = q[s : s + c].reshape(c, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, c * g, d)
        o, l = _softmax_partial_matmul(qg, kt, vv, scale)
        out[s : s + c] = o.view(hkv, c, g, d).permute(1, 0, 2, 3).reshape(c, h, d)
        lse[s : s + c] = l.view(hkv, c, g).permute(1, 0, 2).reshape(c, h)
    return out, lse


def _suffix_segment_matmul(q, k, v, scale):
    s, h, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    qg = q.reshape(s, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, s * g, d)
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    mask = causal[:, None, :].expand(s, g, s).reshape(s * g, s)  # rows are (query, head in group)
    o, l = _softmax_partial_matmul(qg, k.permute(1, 2, 0), v.permute(1, 0, 2), scale, mask)
    return o.view(hkv, s, g, d).permute(1, 0, 2, 3).reshape(s, h, d), l.view(hkv, s, g).permute(1, 0, 2).reshape(s, h)


def _flash_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the CPU flash op runs in: half precision as given (ATen's CPU flash kernel accumulates
    in fp32 and uses the CPU's bf16 matrix instructions; measured in bench/README.md), everything else
    as ``_compute_dtype``."""
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else _compute_dtype(x.dtype)


def _prefix_partial_torch(q, k_prefix, v_prefix, scale):
    t, h, d = q.shape
    cdt = _compute_dtype(q.dtype)
    if k_prefix.shape[0] == 0 or t == 0:
        return _no_keys(t, h, d, cdt, q.device)
    if _use_cpu_flash(q):
        fdt = _flash_dtype(q)
        out, lse = _flash_cpu(q.to(fdt), k_prefix.to(fdt), v_prefix.to(fdt), scale, causal=False)
        return out.to(cdt), lse.to(cdt)
    q, k_prefix, v_prefix = q.to(cdt), k_prefix.to(cdt), v_prefix.to(cdt)
    return _prefix_partial_matmul(q, k_prefix, v_prefix, scale)


def _suffix_partial_torch(q, k_suffix, v_suffix, cu, scale):
    """One causal call per segment: as fast as one padded batch when lengths are
    equal (measured, N=16 x 200) and no padding waste when they are ragged."""
    t, h, d = q.shape
    cdt = _compute_dtype(q.dtype)
    flash = _use_cpu_flash(q)
    wdt = _flash_dtype(q) if flash else cdt  # what the segment op computes in; results are stored in cdt
    q, k_suffix, v_suffix = q.to(wdt), k_suffix.to(wdt), v_suffix.to(wdt)
    out = _empty((t, h, d), cdt, q.device)
    lse = _empty((t, h), cdt, q.device)
    segment = (lambda *a: _flash_cpu(*a, causal=True)) if flash else _suffix_segment_matmul
    for a, b in zip(cu, cu[1:]):
        if b > a:  # empty segments have no queries (and would crash ATen's flash op)
            out[a:b], lse[a:b] = segment(q[a:b], k_suffix[a:b], v_suffix[a:b], scale)
    return out, lse


def _merge_torch(out1, lse1, out2, lse2):
    lse = torch.logaddexp(lse1, lse2)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # both -inf: weights 0, not NaN
    w1 = torch.exp(lse1 - finite).unsqueeze(-1)
    w2 = torch.exp(lse2 - finite).unsqueeze(-1)
    return torch.addcmul(out1 * w1, out2, w2)


# --------------------------------------------------------------------------
# Triton kernels.  Plain functions, jitted on first use (see _jit), so the
# module imports without triton and follows whichever mode triton runs in.
#
# GQA packing: the G = H // Hkv query heads that share a kv head are laid out
# as rows r = t * G + g of one tile, so each K/V tile is loaded once for all
# of them.  Program (i, kvh) owns rows [i*BLOCK_M, (i+1)*BLOCK_M).
# Scores are kept in log2 units (scale * log2 e) so the loop uses exp2.
# --------------------------------------------------------------------------


def _prefix_fwd_kernel(
    Q, K, V, Out, Lse,
    n_rows, P, G, D, qk_scale,
    s_qt, s_qh, s_qd, s_kt, s_kh, s_kd, s_vt, s_vh, s_vd, s_ot, s_oh, s_od, s_lt, s_lh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    kvh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    t = rows // G
    h = kvh * G + rows % G
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(Q + t[:, None] * s_qt + h[:, None] * s_qh + d[None, :] * s_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, P, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < P
        kt = tl.load(K + j[None, :] * s_kt + kvh * s_kh + d[:, None] * s_kd,
                     mask=j_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(V + j[:, None] * s_vt + kvh * s_vh + d[None, :] * s_vd,
                    mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            s = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
            v = v.to(tl.float32)
        else:
            s = tl.dot(q, kt)
        s = tl.where(j_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: avoid inf - inf
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has_keys = l_i > 0.0
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(Out + t[:, None] * s_ot + h[:, None] * s_oh + d[None, :] * s_od, out,
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + t * s_lt + h * s_lh, lse, mask=row_ok)


def _suffix_fwd_kernel(
    Q, K, V, Out, Lse, Out0, Lse0, BlkRow, BlkStart, BlkEnd,
    G, D, qk_scale,
    s_qt, s_qh, s_qd, s_kt, s_kh, s_kd, s_vt, s_vh, s_vd, s_ot, s_oh, s_od, s_lt, s_lh,
    s_o0t, s_o0h, s_o0d, s_l0t, s_l0h,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    HAS_INIT: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    """Causal attention inside one segment.  The host block table gives each
    program its first packed row and its segment's token range.  With HAS_INIT
    the softmax state starts from the prefix partial (Out0, Lse0), which fuses
    the merge: (m, l, acc) = (lse0, 1, out0) is exactly the state after the
    prefix keys."""
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    row0 = tl.load(BlkRow + pid)
    seg_start = tl.load(BlkStart + pid)
    seg_end = tl.load(BlkEnd + pid)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < seg_end * G
    t = rows // G
    h = kvh * G + rows % G
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    io_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + t[:, None] * s_qt + h[:, None] * s_qh + d[None, :] * s_qd, mask=io_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    if HAS_INIT:
        m_i = (tl.load(Lse0 + t * s_l0t + h * s_l0h, mask=row_ok, other=float("-inf")).to(tl.float32)
               * 1.4426950408889634)
        l_i = tl.where(m_i > float("-inf"), 1.0, 0.0)
        acc = tl.load(Out0 + t[:, None] * s_o0t + h[:, None] * s_o0h + d[None, :] * s_o0d,
                      mask=io_mask, other=0.0).to(tl.float32)
        acc = tl.where(l_i[:, None] > 0.0, acc, 0.0)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # keys past the last query of this tile are causally masked for every row
    t_hi = tl.minimum((row0 + BLOCK_M - 1) // G, seg_end - 1) + 1
    for start in range(seg_start, t_hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < t_hi
        kt = tl.load(K + j[None, :] * s_kt + kvh * s_kh + d[:, None] * s_kd,
                     mask=j_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(V + j[:, None] * s_vt + kvh * s_vh + d[None, :] * s_vd,
                    mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            s = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
            v = v.to(tl.float32)
        else:
            s = tl.dot(q, kt)
        keep = j_ok[None, :] & (j[None, :] <= t[:, None])
        s = tl.where(keep, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has_keys = l_i > 0.0
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
    tl.store(Out + t[:, None] * s_ot + h[:, None] * s_oh + d[None, :] * s_od,
             out.to(Out.dtype.element_ty), mask=io_mask)
    if WRITE_LSE:
        lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(Lse + t * s_lt + h * s_lh, lse, mask=row_ok)


def _merge_kernel(O1, L1, O2, L2, Out, n_rows, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows r = t * H + h of contiguous [T, H, D] partials."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (d[None, :] < D)
    l1 = tl.load(L1 + rows, mask=row_ok, other=float("-inf")).to(tl.float32)
    l2 = tl.load(L2 + rows, mask=row_ok, other=float("-inf")).to(tl.float32)
    m = tl.maximum(l1, l2)
    m = tl.where(m == float("-inf"), 0.0, m)
    w1 = tl.exp(l1 - m)
    w2 = tl.exp(l2 - m)
    total = w1 + w2
    total = tl.where(total > 0.0, total, 1.0)  # no keys anywhere -> 0 output
    o1 = tl.load(O1 + rows[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    o2 = tl.load(O2 + rows[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    out = (o1 * (w1 / total)[:, None] + o2 * (w2 / total)[:, None])
    tl.store(Out + rows[:, None] * D + d[None, :], out.to(Out.dtype.element_ty), mask=mask)




def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))  # tl.dot needs every dim >= 16


def _upcast(x: torch.Tensor) -> bool:
    # fp32 inputs need IEEE dots (TF32 misses 1e-5); the interpreter gets bf16 arithmetic wrong
    return x.dtype not in (torch.float16, torch.bfloat16) or triton_runtime.interpreter_active()


def _tiles(d: int, upcast: bool) -> dict:
    """Tile sizes and launch options: narrower key tiles and fewer pipeline stages
    as rows get wider, so K/V stages fit in shared memory (fp32 D=256 included)."""
    row_bytes = _block_d(d) * (4 if upcast else 2)
    block_n = 64 if row_bytes <= 256 else 32 if row_bytes <= 512 else 16
    return dict(
        BLOCK_M=BLOCK_M or 64,
        BLOCK_N=BLOCK_N or block_n,
        BLOCK_D=_block_d(d),
        UPCAST=upcast,
        num_warps=4 if _block_d(d) <= 64 else 8,
        num_stages=3 if row_bytes <= 256 else 2,
    )


def _prefix_partial_triton(q, k_prefix, v_prefix, scale):
    t, h, d = q.shape
    p, hkv, _ = k_prefix.shape
    g = h // hkv
    if p == 0 or t == 0:
        return _no_keys(t, h, d, torch.float32, q.device)
    tiles = _tiles(d, _upcast(q))
    out = _empty((t, h, d), torch.float32, q.device)
    lse = _empty((t, h), torch.float32, q.device)
    grid = (triton.cdiv(t * g, tiles["BLOCK_M"]), hkv)
    _jit(_prefix_fwd_kernel)[grid](
        q, k_prefix, v_prefix, out, lse,
        t * g, p, g, d, scale * LOG2E,
        *q.stride(), *k_prefix.stride(), *v_prefix.stride(), *out.stride(), *lse.stride(),
        **tiles,
    )
    return out, lse


def _block_table(cu: list[int], g: int, block_m: int, device):
    """One entry per (segment, tile of BLOCK_M packed rows): first row, segment start, segment end."""
    row0, start, end = [], [], []
    for a, b in zip(cu, cu[1:]):
        for r in range(a * g, b * g, block_m):
            row0.append(r)
            start.append(a)
            end.append(b)
    table = torch.tensor([row0, start, end], dtype=torch.int32).to(device)
    return table[0], table[1], table[2]


def _suffix_triton(q, k_suffix, v_suffix, cu, scale, init=None, out_dtype=torch.float32, write_lse=True):
    """Suffix partial (out fp32, lse), or with init=(out0, lse0) the merged output (lse None)."""
    t, h, d = q.shape
    hkv = k_suffix.shape[1]
    g = h // hkv
    tiles = _tiles(d, _upcast(q))
    out = _empty((t, h, d), out_dtype, q.device)
    lse = _empty((t, h), torch.float32, q.device) if write_lse else None
    if t == 0:
        return out, lse
    blk_row, blk_start, blk_end = _block_table(cu, g, tiles["BLOCK_M"], q.device)
    # pointers a constexpr branch never touches still need real tensors: pass out
    lse_arg = lse if write_lse else out
    out0, lse0 = init if init is not None else (out, lse_arg)
    _jit(_suffix_fwd_kernel)[(blk_row.numel(), hkv)](
        q, k_suffix, v_suffix, out, lse_arg, out0, lse0, blk_row, blk_start, blk_end,
        g, d, scale * LOG2E,
        *q.stride(), *k_suffix.stride(), *v_suffix.stride(), *out.stride(),
        *(lse.stride() if write_lse else (0, 0)), *out0.stride(),
        *(lse0.stride() if init is not None else (0, 0)),
        HAS_INIT=init is not None, WRITE_LSE=write_lse, **tiles,
    )
    return out, lse


def _merge_triton(out1, lse1, out2, lse2, out_dtype=torch.float32):
    t, h, d = out1.shape
    out = _empty((t, h, d), out_dtype, out1.device)
    if t * h == 0:
        return out
    block_r = 32
    _jit(_merge_kernel)[(triton.cdiv(t * h, block_r),)](
        out1.contiguous(), lse1.contiguous(), out2.contiguous(), lse2.contiguous(), out,
        t * h, d, BLOCK_R=block_r, BLOCK_D=triton.next_power_of_2(d),
    )
    return out


# --------------------------------------------------------------------------
# flash-attn (CUDA, fp16/bf16): its varlen kernels return the lse we merge on
# --------------------------------------------------------------------------


def _flash_attn_partial(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    result = _flash_attn_func()(
        q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal, return_attn_probs=True
    )
    out, lse = result[0], result[1]
    if lse.dim() != 2 or lse.shape != (q.shape[1], q.shape[0]):
        return None  # older flash-attn pads lse per batch; the caller falls back to Triton
    return out.float(), lse.transpose(0, 1).float()


def _flash_attn_prefix(q, k_prefix, v_prefix, scale):
    t, h, d = q.shape
    p = k_prefix.shape[0]
    if p == 0 or t == 0:
        return _no_keys(t, h, d, torch.float32, q.device)
    cu_q = torch.tensor([0, t], dtype=torch.int32, device=q.device)
    cu_k = torch.tensor([0, p], dtype=torch.int32, device=q.device)
    part = _flash_attn_partial(q, k_prefix, v_prefix, cu_q, cu_k, t, p, scale, causal=False)
    return part if part is not None else _prefix_partial_triton(q, k_prefix, v_prefix, scale)


def _flash_attn_suffix(q, k_suffix, v_suffix, cu, scale):
    if q.shape[0] == 0:
        return _suffix_triton(q, k_suffix, v_suffix, cu, scale)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=q.device)
    max_s = max(b - a for a, b in zip(cu, cu[1:]))
    part = _flash_attn_partial(q, k_suffix, v_suffix, cu_t, cu_t, max_s, max_s, scale, causal=True)
    return part if part is not None else _suffix_triton(q, k_suffix, v_suffix, cu, scale)


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


def prefix_partial(q, k_prefix, v_prefix, scale: float, backend: str = "auto"):
    """All T queries against the P prefix keys: (out [T, H, D] fp32, lse [T, H] fp32).

    P = 0 gives out = 0 and lse = -inf, which merges as "no prefix"."""
    _check_qkv(q, k_prefix, v_prefix, "k_prefix", "v_prefix")
    backend = _resolve(backend, q.device, q)
    scale = float(scale)
    if backend == "reference":
        return _prefix_partial_reference(q, k_prefix, v_prefix, scale)
    if backend == "torch":
        out, lse = _prefix_partial_torch(q, k_prefix, v_prefix, scale)
        return out.float(), lse.float()
    if backend == "flash_attn":
        return _flash_attn_prefix(q, k_prefix, v_prefix, scale)
    return _prefix_partial_triton(q, k_prefix, v_prefix, scale)


def suffix_partial(q, k_suffix, v_suffix, cu_seqlens, scale: float, backend: str = "auto"):
    """Block-diagonal causal attention within each packed segment: (out [T, H, D] fp32, lse [T, H] fp32)."""
    _check_qkv(q, k_suffix, v_suffix, "k_suffix", "v_suffix")
    if k_suffix.shape[0] != q.shape[0]:
        raise ValueError(
            f"k_suffix has {k_suffix.shape[0]} tokens but q has {q.shape[0]}; both hold the packed suffixes"
        )
    cu = _cu_list(cu_seqlens, q.shape[0])
    backend = _resolve(backend, q.device, q)
    scale = float(scale)
    if backend == "reference":
        return _suffix_partial_reference(q, k_suffix, v_suffix, cu, scale)
    if backend == "torch":
        out, lse = _suffix_partial_torch(q, k_suffix, v_suffix, cu, scale)
        return out.float(), lse.float()
    if backend == "flash_attn":
        return _flash_attn_suffix(q, k_suffix, v_suffix, cu, scale)
    return _suffix_triton(q, k_suffix, v_suffix, cu, scale)


def merge_partials(out1, lse1, out2, lse2, backend: str = "auto"):
    """Exact merge of two attention partials over disjoint key sets; fp32 [T, H, D].

    lse = -inf marks a partial with no keys (weight 0); both -inf gives 0."""
    if out1.dim() != 3 or out1.shape != out2.shape:
        raise ValueError(f"out1 and out2 must both be [T, H, D], got {tuple(out1.shape)} and {tuple(out2.shape)}")
    if lse1.shape != out1.shape[:2] or lse2.shape != out1.shape[:2]:
        raise ValueError(
            f"lse1/lse2 must be [T, H] = {tuple(out1.shape[:2])}, got {tuple(lse1.shape)} and {tuple(lse2.shape)}"
        )
    backend = _resolve(backend, out1.device)
    if backend == "reference":
        return _merge_reference(out1, lse1, out2, lse2)
    if backend == "torch":
        return _merge_torch(out1.float(), lse1.float(), out2.float(), lse2.float())
    return _merge_triton(out1, lse1, out2, lse2)


def shared_prefix_attention(q, k_suffix, v_suffix, k_prefix, v_prefix, cu_seqlens, scale: float,
                            backend: str = "auto"):
    """Attention of packed suffix queries over (shared prefix + own causal suffix); [T, H, D] in q's dtype.

    backend: "auto" (Triton, or flash-attn partials when installed, on CUDA;
    torch elsewhere), "triton", "torch", "reference" (float64 oracle) or
    "flash_attn".  cu_seqlens may be a tensor or a list; a list avoids a
    device sync on CUDA.
    """
    _check_qkv(q, k_suffix, v_suffix, "k_suffix", "v_suffix")
    _check_qkv(q, k_prefix, v_prefix, "k_prefix", "v_prefix")
    if k_suffix.shape[0] != q.shape[0]:
        raise ValueError(
            f"k_suffix has {k_suffix.shape[0]} tokens but q has {q.shape[0]}; both hold the packed suffixes"
        )
    if k_prefix.shape[1] != k_suffix.shape[1]:
        raise ValueError(
            f"k_prefix has {k_prefix.shape[1]} kv heads but k_suffix has {k_suffix.shape[1]}; they must match"
        )
    cu = _cu_list(cu_seqlens, q.shape[0])
    backend = _resolve(backend, q.device, q)
    scale = float(scale)
    if backend == "reference":
        return _attention_reference(q, k_suffix, v_suffix, k_prefix, v_prefix, cu, scale)
    if backend == "torch":
        pre = _prefix_partial_torch(q, k_prefix, v_prefix, scale)
        suf = _suffix_partial_torch(q, k_suffix, v_suffix, cu, scale)
        return _merge_torch(*pre, *suf).to(q.dtype)
    if backend == "flash_attn":
        pre = _flash_attn_prefix(q, k_prefix, v_prefix, scale)
        suf = _flash_attn_suffix(q, k_suffix, v_suffix, cu, scale)
        return _merge_triton(*pre, *suf, out_dtype=q.dtype)
    pre = _prefix_partial_triton(q, k_prefix, v_prefix, scale)
    out, _ = _suffix_triton(q, k_suffix, v_suffix, cu, scale, init=pre, out_dtype=q.dtype, write_lse=False)
    return out


# --------------------------------------------------------------------------
# Query rows only: the last decoder layer needs attention outputs at the
# reward markers alone (its K/V still cover every row).  M marker queries are
# few, so the suffix part is one masked batched matmul per chunk of rows, on
# any device; the prefix part is ``prefix_partial`` (any query subset works).
# --------------------------------------------------------------------------


def _segment_bounds(rows: list[int], cu: list[int]) -> list[int]:
    """Start of the segment holding each packed row; rows outside [0, T) are an error."""
    starts = []
    for r in rows:
        i = bisect.bisect_right(cu, r) - 1
        if r < 0 or i >= len(cu) - 1:
            raise ValueError(f"query row {r} lies outside the packed suffixes [0, {cu[-1]})")
        starts.append(cu[i])
    return starts


def _rows_mask(rows: list[int], starts: list[int], t: int, device) -> torch.Tensor:
    """allowed [M, T]: row r (segment start a) sees suffix keys a..r."""
    keys = torch.arange(t, device=device)
    hi = torch.tensor(rows, device=device)[:, None]
    lo = torch.tensor(starts, device=device)[:, None]
    return (keys[None] >= lo) & (keys[None] <= hi)


def _suffix_rows_reference(q, rows, k_suffix, v_suffix, cu, scale):
    h = q.shape[1]
    allowed = _rows_mask(rows, _segment_bounds(rows, cu), k_suffix.shape[0], q.device)
    out, lse = _masked_attention_reference(q, _expand_kv(k_suffix, h), _expand_kv(v_suffix, h), allowed, scale)
    return out.float(), lse.float()


def _suffix_rows_torch(q, rows, k_suffix, v_suffix, cu, scale):
    """Per kv head, the G query heads of a chunk of rows form one masked matmul over the suffix keys
    they can reach (the span from the first row's segment start to the last row)."""
    m, h, d = q.shape
    hkv = k_suffix.shape[1]
    g = h // hkv
    cdt = _compute_dtype(q.dtype)
    out = _empty((m, h, d), cdt, q.device)
    lse = _empty((m, h), cdt, q.device)
    starts = _segment_bounds(rows, cu)
    lo, hi = min(starts), max(rows) + 1
    chunk = max(1, _PREFIX_SCORE_BUDGET // max(1, h * (hi - lo)))
    for s in range(0, m, chunk):
        c = min(chunk, m - s)
        r, st = rows[s:s + c], starts[s:s + c]
        a, b = min(st), max(r) + 1  # rows are usually sorted, so this span is short
        kk = k_suffix[a:b].to(cdt)
        vv = v_suffix[a:b].to(cdt)
        qg = q[s:s + c].to(cdt).reshape(c, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, c * g, d)
        allowed = _rows_mask([x - a for x in r], [x - a for x in st], b - a, q.device)
        mask = allowed[:, None, :].expand(c, g, b - a).reshape(c * g, b - a)
        o, l = _softmax_partial_matmul(qg, kk.permute(1, 2, 0), vv.permute(1, 0, 2), scale, mask)
        out[s:s + c] = o.view(hkv, c, g, d).permute(1, 0, 2, 3).reshape(c, h, d)
        lse[s:s + c] = l.view(hkv, c, g).permute(1, 0, 2).reshape(c, h)
    return out, lse


def suffix_rows_partial(q_rows, rows, k_suffix, v_suffix, cu_seqlens, scale: float, backend: str = "auto"):
    """``suffix_partial`` for a subset of query rows: q_rows [M, H, D] are the queries of packed rows
    ``rows`` (M ints in [0, T)); each sees its own segment's suffix keys up to itself.
    Returns (out [M, H, D] fp32, lse [M, H] fp32).  backend: "reference" (float64 oracle) or
    anything else for the batched-matmul path, which runs on every device."""
    _check_qkv(q_rows, k_suffix, v_suffix, "k_suffix", "v_suffix")
    rows = [int(r) for r in (rows.tolist() if isinstance(rows, torch.Tensor) else rows)]
    if len(rows) != q_rows.shape[0]:
        raise ValueError(
            f"rows has {len(rows)} entries but q_rows has {q_rows.shape[0]} queries; give one row per query"
        )
    cu = _cu_list(cu_seqlens, k_suffix.shape[0])
    _check_backend(backend)
    m, h, d = q_rows.shape
    if m == 0:
        return _no_keys(0, h, d, torch.float32, q_rows.device)
    if backend == "reference":
        return _suffix_rows_reference(q_rows, rows, k_suffix, v_suffix, cu, float(scale))
    out, lse = _suffix_rows_torch(q_rows, rows, k_suffix, v_suffix, cu, float(scale))
    return out.float(), lse.float()


def shared_prefix_attention_rows(q_rows, rows, k_suffix, v_suffix, k_prefix, v_prefix, cu_seqlens, scale: float,
                                 backend: str = "auto"):
    """``shared_prefix_attention(q, ...)[rows]`` computed from the queries of those rows alone;
    [M, H, D] in q_rows' dtype.  backend as for ``shared_prefix_attention`` ("reference" is the
    float64 oracle; the suffix part is the batched-matmul path on every other backend)."""
    _check_qkv(q_rows, k_prefix, v_prefix, "k_prefix", "v_prefix")
    if k_prefix.shape[1] != k_suffix.shape[1]:
        raise ValueError(
            f"k_prefix has {k_prefix.shape[1]} kv heads but k_suffix has {k_suffix.shape[1]}; they must match"
        )
    ref = backend == "reference"
    pre = prefix_partial(q_rows, k_prefix, v_prefix, scale, backend="reference" if ref else backend)
    suf = suffix_rows_partial(q_rows, rows, k_suffix, v_suffix, cu_seqlens, scale,
                              backend="reference" if ref else "torch")
    return merge_partials(*pre, *suf, backend="reference" if ref else "auto").to(q_rows.dtype)
