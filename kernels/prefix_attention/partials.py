"""Attention partials, the currency every backend trades in.

A partial over a key set is (out [T, H, D], lse [T, H]): the softmax-weighted
values and the natural-log sum of the exponentiated scores.  Partials over
disjoint key sets merge exactly by their lse (each backend's ``merge``).  A
partial with no keys is out = 0, lse = -inf, which merges as "nothing here".
"""

from __future__ import annotations

import math

import torch

from mmprm_infer.kernels import backends


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype partials are kept in: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_keys(t: int, h: int, d: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial of T queries over an empty key set."""
    out = backends.empty((t, h, d), dtype, device)
    lse = backends.empty((t, h), dtype, device)
    out.zero_()
    lse.fill_(-math.inf)
    return out, lse


def expand_kv(k: torch.Tensor, heads: int) -> torch.Tensor:
    """[S, Hkv, D] -> [S, H, D]: each kv head repeated for the H // Hkv query heads reading it (GQA)."""
    return k.repeat_interleave(heads // k.shape[1], dim=1)


def rows_mask(rows: list[int], starts: list[int], t: int, device) -> torch.Tensor:
    """allowed [M, T]: query row r of the segment starting at packed row a sees suffix keys a..r."""
    keys = torch.arange(t, device=device)
    hi = torch.tensor(rows, device=device)[:, None]
    lo = torch.tensor(starts, device=device)[:, None]
    return (keys[None] >= lo) & (keys[None] <= hi)
