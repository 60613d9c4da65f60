"""The Triton backend (CUDA; the CPU interpreter in tests): prefix, suffix and merge kernels.

Plain functions, jitted on first use (``_jit``), so the module imports without
triton and follows whichever mode triton runs in.

GQA packing: the G = H // Hkv query heads that share a kv head are laid out as
rows r = t * G + g of one tile, so each K/V tile is loaded once for all of
them.  Program (i, kvh) owns rows [i*BLOCK_M, (i+1)*BLOCK_M).  Scores are kept
in log2 units (scale * log2 e) so the loops use exp2.
"""

from __future__ import annotations

import torch

from mmprm_infer.kernels import backends, triton_runtime
from mmprm_infer.kernels.prefix_attention.partials import no_keys
from mmprm_infer.kernels.triton_runtime import jit_lazily as _jit
from mmprm_infer.kernels.triton_runtime import tl, triton

LOG2E = 1.4426950408889634
# Tiles; None = pick by head dim and dtype (_tiles).  Tests override them.
BLOCK_M = None
BLOCK_N = None


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


def prefix_partial(q, k_prefix, v_prefix, scale):
    t, h, d = q.shape
    p, hkv, _ = k_prefix.shape
    g = h // hkv
    if p == 0 or t == 0:
        return no_keys(t, h, d, torch.float32, q.device)
    tiles = _tiles(d, _upcast(q))
    out = backends.empty((t, h, d), torch.float32, q.device)
    lse = backends.empty((t, h), torch.float32, q.device)
    grid = (triton.cdiv(t * g, tiles["BLOCK_M"]), hkv)
    _jit(_prefix_fwd_kernel)[grid](
        q, k_prefix, v_prefix, out, lse,
        t * g, p, g, d, scale * LOG2E,
        *q.stride(), *k_prefix.stride(), *v_prefix.stride(), *out.stride(), *lse.stride(),
        **tiles,
    )
    return out, lse


def block_table(cu: list[int], g: int, block_m: int, device):
    """One entry per (segment, tile of BLOCK_M packed rows): first row, segment start, segment end."""
    row0, start, end = [], [], []
    for a, b in zip(cu, cu[1:]):
        for r in range(a * g, b * g, block_m):
            row0.append(r)
            start.append(a)
            end.append(b)
    table = torch.tensor([row0, start, end], dtype=torch.int32).to(device)
    return table[0], table[1], table[2]


def suffix(q, k_suffix, v_suffix, cu, scale, init=None, out_dtype=torch.float32, write_lse=True, tables=None):
    """Suffix partial (out fp32, lse), or with init=(out0, lse0) the merged output (lse None).

    tables: a dict the caller keeps across layers (``AttentionPlan``) to build each block table once."""
    t, h, d = q.shape
    hkv = k_suffix.shape[1]
    g = h // hkv
    tiles = _tiles(d, _upcast(q))
    out = backends.empty((t, h, d), out_dtype, q.device)
    lse = backends.empty((t, h), torch.float32, q.device) if write_lse else None
    if t == 0:
        return out, lse
    key = (g, tiles["BLOCK_M"], q.device)
    tables = {} if tables is None else tables
    if key not in tables:
        tables[key] = block_table(cu, g, tiles["BLOCK_M"], q.device)
    blk_row, blk_start, blk_end = tables[key]
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


def merge(out1, lse1, out2, lse2, out_dtype=torch.float32):
    t, h, d = out1.shape
    out = backends.empty((t, h, d), out_dtype, out1.device)
    if t * h == 0:
        return out
    block_r = 32
    _jit(_merge_kernel)[(triton.cdiv(t * h, block_r),)](
        out1.contiguous(), lse1.contiguous(), out2.contiguous(), lse2.contiguous(), out,
        t * h, d, BLOCK_R=block_r, BLOCK_D=triton.next_power_of_2(d),
    )
    return out


def attention(q, k_suffix, v_suffix, k_prefix, v_prefix, cu, scale, tables=None):
    """The prefix partial, then the suffix kernel starting from it (the merge fused in); q's dtype."""
    pre = prefix_partial(q, k_prefix, v_prefix, scale)
    out, _ = suffix(q, k_suffix, v_suffix, cu, scale, init=pre, out_dtype=q.dtype, write_lse=False, tables=tables)
    return out
