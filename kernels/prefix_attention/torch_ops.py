"""The torch backend (the CPU's path): ATen's CPU flash kernel where present, batched matmuls otherwise.

Prefix partial: every suffix query of a group against the shared prefix in
one call (the prefix K/V is read once for all candidates, never copied per
candidate).  Two ways to compute it, chosen per process by timing
(``prefix_path``): ATen's flash kernel, or a batched matrix product per kv
head (Hydragen: the G query heads of all T rows as one [T*G, D] x [D, P]
GEMM, then softmax and a second GEMM on V), which oneDNN runs on a CPU's
matrix units in bf16.  Suffix partial: one causal call per segment.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import torch

from mmprm_infer.kernels import backends
from mmprm_infer.kernels.prefix_attention.partials import compute_dtype, no_keys, rows_mask

# The matmul paths chunk queries so one [chunk * H, P] score block stays ~16 MB instead of
# T * H * P floats (100+ MB at T=3200, P=1000).
PREFIX_SCORE_BUDGET = 1 << 22  # floats in one score chunk
PREFIX_PATHS = ("auto", "flash", "matmul")
PREFIX_PATH_ENV = "MMPRM_PREFIX_ATTENTION"  # overrides "auto": flash | matmul
_prefix_choices: dict[tuple, str] = {}  # (shape, dtype, threads) -> measured path


def cpu_flash_op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def use_cpu_flash(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and cpu_flash_op() is not None


def flash_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the CPU flash op runs in: half precision as given (ATen's CPU flash kernel accumulates
    in fp32 and uses the CPU's bf16 matrix instructions where it has them), everything else as
    ``compute_dtype``."""
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else compute_dtype(x.dtype)


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
    out, lse = cpu_flash_op()(qv, kv, vv, is_causal=causal, scale=scale)
    # out [Hkv, G, L, D] -> [L, H, D] (a view); lse [Hkv, G, L] -> [L, H]
    return out.permute(2, 0, 1, 3).reshape(length, h, d), lse.permute(2, 0, 1).reshape(length, h)


@contextmanager
def _bf16_products(enabled: bool):
    """Within (when ``enabled``): fp32 matmuls run on the CPU's bf16 units through oneDNN, where it has
    them.  Exact for the upcast bf16 inputs this is used with (bf16 x bf16 products are exact in fp32,
    sums stay fp32); the softmax weights, rounded to bf16 for the second product, lose what flash-attn's
    do.  Elsewhere (no bf16 units) the products stay plain fp32."""
    if not enabled:
        yield
        return
    precision = torch.backends.mkldnn.matmul
    saved = precision.fp32_precision
    precision.fp32_precision = "bf16"
    try:
        yield
    finally:
        precision.fp32_precision = saved


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


def _heads_as_rows(q, hkv: int):
    """[L, H, D] -> [Hkv, L * G, D]: the G query heads of each kv head as rows (query-major)."""
    length, h, d = q.shape
    return q.reshape(length, hkv, h // hkv, d).permute(1, 0, 2, 3).reshape(hkv, length * (h // hkv), d)


def _rows_as_heads(x, length: int, h: int):
    """Inverse of ``_heads_as_rows`` for outputs [Hkv, L * G, D] (-> [L, H, D]) and lse [Hkv, L * G] (-> [L, H])."""
    hkv = x.shape[0]
    if x.dim() == 2:
        return x.view(hkv, length, h // hkv).permute(1, 0, 2).reshape(length, h)
    return x.view(hkv, length, h // hkv, x.shape[-1]).permute(1, 0, 2, 3).reshape(length, h, x.shape[-1])


def prefix_partial_matmul(q, k_prefix, v_prefix, scale, chunk: int | None = None):
    """Hydragen: per kv head, the G query heads of a chunk of rows form one GEMM over the prefix K/V
    (softmax between the two products).  (out, lse) in ``compute_dtype``; half-precision inputs are
    upcast and multiplied on the CPU's bf16 units where it has them (``_bf16_products``)."""
    t, h, d = q.shape
    p, hkv, _ = k_prefix.shape
    cdt = compute_dtype(q.dtype)
    chunk = chunk or max(16, PREFIX_SCORE_BUDGET // max(1, h * p))
    out = backends.empty((t, h, d), cdt, q.device)
    lse = backends.empty((t, h), cdt, q.device)
    kt = k_prefix.to(cdt).permute(1, 2, 0)  # [Hkv, D, P]
    vv = v_prefix.to(cdt).permute(1, 0, 2)  # [Hkv, P, D]
    with _bf16_products(q.dtype == torch.bfloat16 and q.device.type == "cpu"):
        for s in range(0, t, chunk):
            c = min(chunk, t - s)
            o, l = _softmax_partial_matmul(_heads_as_rows(q[s:s + c].to(cdt), hkv), kt, vv, scale)
            out[s:s + c] = _rows_as_heads(o, c, h)
            lse[s:s + c] = _rows_as_heads(l, c, h)
    return out, lse


def _suffix_segment_matmul(q, k, v, scale):
    s, h, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    mask = causal[:, None, :].expand(s, g, s).reshape(s * g, s)  # rows are (query, head in group)
    o, l = _softmax_partial_matmul(_heads_as_rows(q, hkv), k.permute(1, 2, 0), v.permute(1, 0, 2), scale, mask)
    return _rows_as_heads(o, s, h), _rows_as_heads(l, s, h)


def prefix_partial(q, k_prefix, v_prefix, scale, path: str = "flash"):
    """(out [T, H, D], lse [T, H]) over the prefix keys; out may be a view in q's dtype (flash), lse fp32+.

    path: "flash" (ATen's CPU flash kernel where present) or "matmul" (Hydragen's batched GEMMs)."""
    t, h, d = q.shape
    cdt = compute_dtype(q.dtype)
    if k_prefix.shape[0] == 0 or t == 0:
        return no_keys(t, h, d, cdt, q.device)
    if path == "flash" and use_cpu_flash(q):
        fdt = flash_dtype(q)
        return _flash_cpu(q.to(fdt), k_prefix.to(fdt), v_prefix.to(fdt), scale, causal=False)
    return prefix_partial_matmul(q, k_prefix, v_prefix, scale)


def suffix_partial(q, k_suffix, v_suffix, cu, scale):
    """One causal call per segment: as fast as one padded batch when lengths are
    equal (measured, N=16 x 200) and no padding waste when they are ragged.
    (out, lse) in ``compute_dtype``, or out in q's half precision on the CPU flash path."""
    t, h, d = q.shape
    cdt = compute_dtype(q.dtype)
    flash = use_cpu_flash(q)
    wdt = flash_dtype(q) if flash else cdt  # what the segment op computes in
    q, k_suffix, v_suffix = q.to(wdt), k_suffix.to(wdt), v_suffix.to(wdt)
    out = backends.empty((t, h, d), wdt, q.device)
    lse = backends.empty((t, h), cdt, q.device)
    segment = (lambda *a: _flash_cpu(*a, causal=True)) if flash else _suffix_segment_matmul
    for a, b in zip(cu, cu[1:]):
        if b > a:  # empty segments have no queries (and would crash ATen's flash op)
            out[a:b], lse[a:b] = segment(q[a:b], k_suffix[a:b], v_suffix[a:b], scale)
    return out, lse


def merge(out1, lse1, out2, lse2, out_dtype=None):
    """Exact merge of two partials (any float dtypes); -inf lse = no keys; both -inf gives 0."""
    lse1, lse2 = lse1.float(), lse2.float()
    lse = torch.logaddexp(lse1, lse2)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # both -inf: weights 0, not NaN
    w1 = torch.exp(lse1 - finite).unsqueeze(-1)
    w2 = torch.exp(lse2 - finite).unsqueeze(-1)
    out = torch.addcmul(out1.float() * w1, out2.float(), w2)
    return out if out_dtype is None else out.to(out_dtype)


def merge_with_suffix(prefix, suffix, out_dtype):
    """``merge`` of a prefix partial and a suffix partial, whose every row has >= 1 key (itself):
    out = suffix + sigmoid(lse_p - lse_s) * (prefix - suffix), one blend over the outputs, in fp32 (blending
    half-precision partials with half-precision weights doubles the error: measured on the kernel tests)."""
    (out1, lse1), (out2, lse2) = prefix, suffix
    cdt = compute_dtype(out_dtype)
    w1 = torch.sigmoid(lse1.to(cdt) - lse2.to(cdt)).unsqueeze(-1)  # prefix -inf (P = 0): weight 0
    return torch.lerp(out2.to(cdt), out1.to(cdt), w1).to(out_dtype)


def attention(q, k_suffix, v_suffix, k_prefix, v_prefix, cu, scale, prefix_path: str = "flash"):
    """Shared-prefix attention of packed suffix rows; [T, H, D] in q's dtype."""
    pre = prefix_partial(q, k_prefix, v_prefix, scale, prefix_path)
    suf = suffix_partial(q, k_suffix, v_suffix, cu, scale)
    return merge_with_suffix(pre, suf, q.dtype)


def suffix_rows_partial(q, rows, starts, k_suffix, v_suffix, scale):
    """Per kv head, the G query heads of a chunk of rows form one masked matmul over the suffix keys
    they can reach (the span from the first row's segment start to the last row); fp32+ partials."""
    m, h, d = q.shape
    hkv = k_suffix.shape[1]
    g = h // hkv
    cdt = compute_dtype(q.dtype)
    out = backends.empty((m, h, d), cdt, q.device)
    lse = backends.empty((m, h), cdt, q.device)
    lo, hi = min(starts), max(rows) + 1
    chunk = max(1, PREFIX_SCORE_BUDGET // max(1, h * (hi - lo)))
    for s in range(0, m, chunk):
        c = min(chunk, m - s)
        r, st = rows[s:s + c], starts[s:s + c]
        a, b = min(st), max(r) + 1  # rows are usually sorted, so this span is short
        kk = k_suffix[a:b].to(cdt)
        vv = v_suffix[a:b].to(cdt)
        allowed = rows_mask([x - a for x in r], [x - a for x in st], b - a, q.device)
        mask = allowed[:, None, :].expand(c, g, b - a).reshape(c * g, b - a)
        o, l = _softmax_partial_matmul(_heads_as_rows(q[s:s + c].to(cdt), hkv), kk.permute(1, 2, 0),
                                       vv.permute(1, 0, 2), scale, mask)
        out[s:s + c] = _rows_as_heads(o, c, h)
        lse[s:s + c] = _rows_as_heads(l, c, h)
    return out, lse


# --------------------------------------------------------------------------
# which prefix path: measured once per process and shape, like the linear layers' path
# --------------------------------------------------------------------------


def prefix_attention_paths() -> str:
    """The CPU prefix paths chosen so far in this process ("flash", "matmul", both), or "not measured yet"."""
    return "+".join(sorted(set(_prefix_choices.values()))) or "not measured yet"


def choose_prefix_path(rows: int, prefix: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                       requested: str = "auto", reps: int = 3) -> str:
    """"flash" or "matmul" for the prefix partial of ``rows`` queries over ``prefix`` keys on this CPU.

    An explicit ``requested`` path (or $MMPRM_PREFIX_ATTENTION) wins; "auto" times both on random
    inputs of these shapes (interleaved, best of ``reps``) and keeps flash unless matmul is clearly
    faster.  The answer is cached per shape class (rows and prefix rounded to powers of two)."""
    if requested not in PREFIX_PATHS:
        raise ValueError(f"unknown prefix path {requested!r}; choose one of {list(PREFIX_PATHS)}")
    requested = os.environ.get(PREFIX_PATH_ENV, requested) if requested == "auto" else requested
    if requested not in PREFIX_PATHS:
        raise ValueError(f"${PREFIX_PATH_ENV}={requested!r} is not a prefix path; use one of {list(PREFIX_PATHS[1:])}")
    if requested != "auto":
        return requested
    if cpu_flash_op() is None:
        return "matmul"
    rows_class, prefix_class = 1 << max(0, rows - 1).bit_length(), 1 << max(0, prefix - 1).bit_length()
    key = (rows_class, prefix_class, heads, kv_heads, head_dim, dtype, torch.get_num_threads())
    if key not in _prefix_choices:
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(min(rows_class, 1024), heads, head_dim, generator=gen).to(dtype)
        k, v = torch.randn(2, min(prefix_class, 4096), kv_heads, head_dim, generator=gen).to(dtype).unbind(0)
        calls = {path: (lambda path=path: prefix_partial(q, k, v, head_dim ** -0.5, path))
                 for path in ("flash", "matmul")}
        with torch.inference_mode():
            best = backends.time_interleaved(calls, reps)
        _prefix_choices[key] = "matmul" if best["matmul"] <= 0.9 * best["flash"] else "flash"
    return _prefix_choices[key]
