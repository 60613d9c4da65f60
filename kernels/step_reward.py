"""Fused step-reward extraction: marker hidden states -> step rewards -> candidate scores.

A PRM's step reward only needs the final-normed hidden state at each marker
position and the difference of two LM-head rows (PRM_FORMATS.md):

    p = sigmoid(rmsnorm(hidden[pos]) . (W[good] - W[bad]) + (b_good - b_bad))

so the full [T, vocab] logits are never formed.  Rewards of one candidate
(its markers are contiguous in ``positions``, delimited by ``cu_markers``)
are then reduced to one score by a named aggregation.

Each aggregation is data: a per-step transform of p and a reduction.  The
transform and reduction run in float64 on the fp32 rewards, so scores match
a Python-float evaluation of the same definitions.  The definitions are
``mmprm_infer.aggregation``'s table (p clamped into [1e-12, 1 - 1e-12] for
log, logit and odds; see there), so kernels and the list version cannot drift apart.

Backends: "reference" (plain loops, float64), "torch" (index_select +
vectorized norm/dot + scatter_reduce), "triton" (a marker kernel and a
per-candidate reduction kernel), "auto" (Triton on CUDA, torch elsewhere).
"""


import torch

from mmprm_infer.aggregation import AGGREGATIONS as _AGG_TABLE
from mmprm_infer.aggregation import ALIASES, LOG_EPS, REDUCTIONS, TRANSFORMS
from mmprm_infer.kernels.triton_runtime import check_triton_usable, tl, triton
from mmprm_infer.kernels.triton_runtime import jit_lazily as _jit

BACKENDS = ("auto", "triton", "torch", "reference")
# name -> (transform of p, reduction over a candidate's steps), from the one table
AGGREGATIONS: dict[str, tuple[str, str]] = {name: (a.transform, a.reduce) for name, a in _AGG_TABLE.items()}
# integer codes the Triton kernel is specialized on
_TRANSFORM_CODE = {"p": 0, "log": 1, "logit": 2, "odds": 3}
_REDUCE_CODE = {"min": 0, "max": 1, "sum": 2, "mean": 3, "last": 4, "prod": 5}


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocator; tests swap it for a NaN-filled one to catch unwritten entries."""
    return torch.empty(shape, dtype=dtype, device=device)


def resolve_aggregation(name: str) -> tuple[str, str]:
    """(transform, reduce) of an aggregation name or alias."""
    key = ALIASES.get(name, name)
    if key not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {name!r}; choose one of {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[key]


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------


def _check_positions(positions, num_rows: int) -> None:
    if positions.dim() != 1 or positions.is_floating_point():
        raise ValueError(f"positions must be a 1-D integer tensor [M], got {positions.dtype} {tuple(positions.shape)}")
    if positions.numel():
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= num_rows:
            raise ValueError(f"positions must index rows of hidden in [0, {num_rows}), got values in [{lo}, {hi}]")


def _cu_list(cu_markers) -> list[int]:
    """cu_markers (tensor or sequence) as host ints."""
    if isinstance(cu_markers, torch.Tensor):
        if cu_markers.dim() != 1 or cu_markers.is_floating_point():
            raise ValueError(
                f"cu_markers must be a 1-D integer tensor [N+1], got {cu_markers.dtype} {tuple(cu_markers.shape)}"
            )
        return cu_markers.tolist()
    return [int(c) for c in cu_markers]


def _check_cu(cu: list[int], num_markers: int, what: str) -> None:
    if len(cu) < 2:
        raise ValueError(f"cu_markers needs N+1 >= 2 entries (one candidate at least), got {len(cu)}")
    if cu[0] != 0:
        raise ValueError(f"cu_markers must start at 0, got cu_markers[0]={cu[0]}")
    if cu[-1] != num_markers:
        raise ValueError(f"cu_markers[-1]={cu[-1]} must equal the number of {what} M={num_markers}")
    empty = [n for n, (a, b) in enumerate(zip(cu, cu[1:])) if b <= a]
    if empty:
        raise ValueError(
            f"every candidate needs at least one marker, but candidates {empty[:10]} have none "
            "(cu_markers must be strictly increasing); drop those candidates or give them a final marker"
        )


def _check_weights(hidden, norm_weight, w_diff, positions) -> None:
    if hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating [T, d] tensor, got {hidden.dtype} {tuple(hidden.shape)}")
    d = hidden.shape[1]
    if w_diff.shape != (d,):
        raise ValueError(f"w_diff must be [d] = [{d}] (W_lm[good] - W_lm[bad]), got {tuple(w_diff.shape)}")
    if norm_weight is not None and norm_weight.shape != (d,):
        raise ValueError(f"norm_weight must be [d] = [{d}] or None (already normed), got {tuple(norm_weight.shape)}")
    for name, t in (("w_diff", w_diff), ("norm_weight", norm_weight), ("positions", positions)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}; move it to {hidden.device}")




def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton is not None else "torch"
    if backend == "triton":
        check_triton_usable(device)
    return backend


# --------------------------------------------------------------------------
# reference: one marker and one candidate at a time, Python floats
# --------------------------------------------------------------------------


def _rewards_reference(hidden, positions, norm_weight, eps, w_diff, b_diff):
    rewards = _empty((positions.numel(),), torch.float32, hidden.device)
    w_diff = w_diff.double()
    for i, pos in enumerate(positions.tolist()):
        x = hidden[pos].double()
        if norm_weight is not None:
            x = x * torch.rsqrt(x.pow(2).mean() + eps) * norm_weight.double()
        rewards[i] = torch.sigmoid(x @ w_diff + b_diff).item()
    return rewards


def _aggregate_reference(rewards, cu: list[int], aggregation: str):
    transform, reduce = resolve_aggregation(aggregation)
    values = [float(p) for p in rewards.tolist()]
    scores = _empty((len(cu) - 1,), torch.float32, rewards.device)
    for n, (a, b) in enumerate(zip(cu, cu[1:])):
        scores[n] = REDUCTIONS[reduce]([TRANSFORMS[transform](p) for p in values[a:b]])
    return scores


# --------------------------------------------------------------------------
# fast torch
# --------------------------------------------------------------------------


def _rewards_torch(hidden, positions, norm_weight, eps, w_diff, b_diff):
    x = hidden.index_select(0, positions).float()  # only marker rows are normed and projected
    if norm_weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * norm_weight.float()
    return torch.sigmoid(torch.mv(x, w_diff.float()) + b_diff)


def _transform_torch(p: torch.Tensor, transform: str) -> torch.Tensor:
    if transform == "p":
        return p
    if transform == "log":
        return torch.log(p.clamp_min(LOG_EPS))
    c = p.clamp(LOG_EPS, 1.0 - LOG_EPS)
    return c / (1.0 - c) if transform == "odds" else torch.log(c / (1.0 - c))


_SCATTER_REDUCE = {"min": "amin", "max": "amax", "sum": "sum", "mean": "mean", "prod": "prod"}


def _aggregate_torch(rewards, cu: list[int], aggregation: str):
    transform, reduce = resolve_aggregation(aggregation)
    n = len(cu) - 1
    cu_t = torch.tensor(cu, device=rewards.device)
    values = _transform_torch(rewards.double(), transform)
    if reduce == "last":
        return values[cu_t[1:] - 1].float()
    owner = torch.repeat_interleave(torch.arange(n, device=rewards.device), cu_t.diff())
    scores = values.new_zeros(n).scatter_reduce(0, owner, values, reduce=_SCATTER_REDUCE[reduce], include_self=False)
    return scores.float()


# --------------------------------------------------------------------------
# Triton: a marker kernel (BLOCK_M markers x d in BLOCK_D chunks, one pass:
# x.(w*w_diff) and sum(x^2) together, since rmsnorm only rescales each row)
# and a reduction kernel (one program per candidate, scalar float64 loop over
# its few markers so every reduction, prod included, is exact and in order).
# --------------------------------------------------------------------------


def _marker_reward_kernel(
    Hid, Pos, NormW, Wd, Out, M, d, s_ht, s_hd, eps, bias,
    HAS_NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    pos = tl.load(Pos + rows, mask=row_ok, other=0).to(tl.int64)
    dot = tl.zeros([BLOCK_M], tl.float32)
    sumsq = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        x = tl.load(Hid + pos[:, None] * s_ht + cols[None, :] * s_hd,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(Wd + cols, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_NORM:
            w = w * tl.load(NormW + cols, mask=col_ok, other=0.0).to(tl.float32)
            sumsq += tl.sum(x * x, 1)
        dot += tl.sum(x * w[None, :], 1)
    if HAS_NORM:
        dot = dot * (1.0 / tl.sqrt(sumsq / d + eps))
    z = dot + bias
    tl.store(Out + rows, 1.0 / (1.0 + tl.exp(-z)), mask=row_ok)


def _segment_aggregate_kernel(R, Cu, Scores, TRANSFORM: tl.constexpr, REDUCE: tl.constexpr):
    n = tl.program_id(0)
    a = tl.load(Cu + n)
    b = tl.load(Cu + n + 1)
    # float64 constants built with tl.full: bare Python floats would be fp32 (1 - 1e-12 -> 1.0)
    lo = tl.full([], 1e-12, tl.float64)  # LOG_EPS
    hi = 1.0 - lo
    one = tl.full([], 1.0, tl.float64)
    if REDUCE == 0:
        acc = tl.full([], float("inf"), tl.float64)
    elif REDUCE == 1:
        acc = tl.full([], float("-inf"), tl.float64)
    elif REDUCE == 5:
        acc = tl.full([], 1.0, tl.float64)
    else:
        acc = tl.full([], 0.0, tl.float64)
    for i in range(a, b):
        p = tl.load(R + i).to(tl.float64)
        if TRANSFORM == 0:
            v = p
        elif TRANSFORM == 1:
            v = tl.log(tl.maximum(p, lo))
        elif TRANSFORM == 2:
            c = tl.minimum(tl.maximum(p, lo), hi)
            v = tl.log(c / (one - c))
        else:
            c = tl.minimum(tl.maximum(p, lo), hi)
            v = c / (one - c)
        if REDUCE == 0:
            acc = tl.minimum(acc, v)
        elif REDUCE == 1:
            acc = tl.maximum(acc, v)
        elif REDUCE == 4:
            acc = v
        elif REDUCE == 5:
            acc = acc * v
        else:
            acc = acc + v
    if REDUCE == 3:
        acc = acc / (b - a).to(tl.float64)
    tl.store(Scores + n, acc.to(tl.float32))




def _rewards_triton(hidden, positions, norm_weight, eps, w_diff, b_diff, block_m=16, block_d=None):
    m, d = positions.numel(), hidden.shape[1]
    rewards = _empty((m,), torch.float32, hidden.device)
    if m == 0:
        return rewards
    block_d = block_d or min(1024, triton.next_power_of_2(d))
    has_norm = norm_weight is not None
    _jit(_marker_reward_kernel)[(triton.cdiv(m, block_m),)](
        hidden, positions, norm_weight if has_norm else w_diff, w_diff, rewards,
        m, d, *hidden.stride(), float(eps), float(b_diff),
        HAS_NORM=has_norm, BLOCK_M=block_m, BLOCK_D=block_d,
    )
    return rewards


def _aggregate_triton(rewards, cu: list[int], aggregation: str):
    transform, reduce = resolve_aggregation(aggregation)
    n = len(cu) - 1
    scores = _empty((n,), torch.float32, rewards.device)
    cu_t = torch.tensor(cu, dtype=torch.int32).to(rewards.device)
    _jit(_segment_aggregate_kernel)[(n,)](
        rewards, cu_t, scores, TRANSFORM=_TRANSFORM_CODE[transform], REDUCE=_REDUCE_CODE[reduce],
    )
    return scores


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


def aggregate_step_rewards(rewards, cu_markers, aggregation: str = "min", backend: str = "auto"):
    """scores [N] fp32 from rewards [M] grouped by cu_markers [N+1] (for heads that are not a w_diff dot)."""
    if rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating [M] tensor, got {rewards.dtype} {tuple(rewards.shape)}")
    resolve_aggregation(aggregation)
    cu = _cu_list(cu_markers)
    _check_cu(cu, rewards.numel(), "rewards")
    backend = _resolve_backend(backend, rewards.device)
    rewards = rewards.float()
    if backend == "reference":
        return _aggregate_reference(rewards, cu, aggregation)
    if backend == "torch":
        return _aggregate_torch(rewards, cu, aggregation)
    return _aggregate_triton(rewards.contiguous(), cu, aggregation)


def fused_step_rewards(hidden, positions, cu_markers, norm_weight, eps: float, w_diff, b_diff: float = 0.0,
                       aggregation: str = "min", backend: str = "auto"):
    """Step rewards at marker rows and per-candidate scores, without forming logits.

    hidden [T, d] pre-final-norm states; positions int [M] (markers grouped by
    candidate); cu_markers [N+1] (>= 1 marker per candidate); norm_weight [d]
    (RMSNorm, fp32) or None if hidden is already normed; w_diff [d] =
    W_lm[good] - W_lm[bad]; b_diff their bias difference.
    Returns (rewards [M] fp32, scores [N] fp32).
    """
    _check_weights(hidden, norm_weight, w_diff, positions)
    resolve_aggregation(aggregation)
    _check_positions(positions, hidden.shape[0])
    cu = _cu_list(cu_markers)
    _check_cu(cu, positions.numel(), "positions")
    backend = _resolve_backend(backend, hidden.device)
    b_diff = float(b_diff)
    if backend == "reference":
        rewards = _rewards_reference(hidden, positions, norm_weight, eps, w_diff, b_diff)
        return rewards, _aggregate_reference(rewards, cu, aggregation)
    if backend == "torch":
        rewards = _rewards_torch(hidden, positions.long(), norm_weight, eps, w_diff, b_diff)
        return rewards, _aggregate_torch(rewards, cu, aggregation)
    # the kernel indexes these 1-D tensors with unit stride
    norm_weight = norm_weight.contiguous() if norm_weight is not None else None
    rewards = _rewards_triton(hidden, positions.contiguous(), norm_weight, eps, w_diff.contiguous(), b_diff)
    return rewards, _aggregate_triton(rewards, cu, aggregation)
