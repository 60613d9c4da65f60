"""The oracle: explicit float64 math, one segment and head group at a time.

Every other backend is tested against these functions; nothing here is fast.
Shapes as in the package docstring; partials come back in fp32.
"""

from __future__ import annotations

import math

import torch

from mmprm_infer.kernels import backends
from mmprm_infer.kernels.prefix_attention.partials import expand_kv, no_keys, rows_mask


def masked_attention(q, k, v, allowed, scale):
    """q [L, H, D], k/v [S, H, D], allowed [L, S] -> (out [L, H, D], lse [L, H]) in float64."""
    scores = torch.einsum("lhd,shd->hls", q.double(), k.double()) * scale
    scores = scores.masked_fill(~allowed[None], -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [H, L]
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # rows without keys -> 0
    out = torch.einsum("hls,shd->lhd", probs, v.double())
    return out, lse.transpose(0, 1)


def prefix_partial(q, k_prefix, v_prefix, scale):
    t, h, d = q.shape
    if k_prefix.shape[0] == 0 or t == 0:
        return no_keys(t, h, d, torch.float32, q.device)
    allowed = torch.ones(t, k_prefix.shape[0], dtype=torch.bool, device=q.device)
    out, lse = masked_attention(q, expand_kv(k_prefix, h), expand_kv(v_prefix, h), allowed, scale)
    return out.float(), lse.float()


def suffix_partial(q, k_suffix, v_suffix, cu, scale):
    t, h, d = q.shape
    out = backends.empty((t, h, d), torch.float32, q.device)
    lse = backends.empty((t, h), torch.float32, q.device)
    for a, b in zip(cu, cu[1:]):
        causal = torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).tril()
        o, l = masked_attention(q[a:b], expand_kv(k_suffix[a:b], h), expand_kv(v_suffix[a:b], h), causal, scale)
        out[a:b], lse[a:b] = o.float(), l.float()
    return out, lse


def attention(q, k_suffix, v_suffix, k_prefix, v_prefix, cu, scale):
    """The definition itself: each segment attends to cat(prefix, own suffix) under a shifted causal mask."""
    t, h, d = q.shape
    p = k_prefix.shape[0]
    out = backends.empty((t, h, d), q.dtype, q.device)
    for a, b in zip(cu, cu[1:]):
        s = b - a
        keys = torch.cat([k_prefix, k_suffix[a:b]])
        values = torch.cat([v_prefix, v_suffix[a:b]])
        # query i sees key j when j is in the prefix (j < P) or j - P <= i
        allowed = torch.ones(s, p + s, dtype=torch.bool, device=q.device).tril(diagonal=p)
        o, _ = masked_attention(q[a:b], expand_kv(keys, h), expand_kv(values, h), allowed, scale)
        out[a:b] = o.to(q.dtype)
    return out


def merge(out1, lse1, out2, lse2):
    lse1, lse2 = lse1.double(), lse2.double()
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).nan_to_num(0.0)  # both -inf: no keys at all -> 0
    w2 = torch.exp(lse2 - lse).nan_to_num(0.0)
    return (out1.double() * w1[..., None] + out2.double() * w2[..., None]).float()


def suffix_rows_partial(q, rows, starts, k_suffix, v_suffix, scale):
    h = q.shape[1]
    allowed = rows_mask(rows, starts, k_suffix.shape[0], q.device)
    out, lse = masked_attention(q, expand_kv(k_suffix, h), expand_kv(v_suffix, h), allowed, scale)
    return out.float(), lse.float()
