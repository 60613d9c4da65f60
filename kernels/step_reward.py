"""The marker readout: final-normed hidden rows at step markers -> step rewards, without forming logits.

A reward head that is one dot product per row (``mmprm_infer.models.heads.DotHead``: two rows of an LM
head or of a 2-label Linear, or a value head's one row) reads

    p = sigmoid(rows . w + b)        rows [M, d], w [d], b a float

with ``w = W[good] - W[bad]`` and ``b = bias[good] - bias[bad]`` (or the value row and its bias), so the
full [M, vocab] logits are never formed.  Aggregating step rewards into a candidate score is
``mmprm_infer.aggregation``'s job, not this kernel's.

Backends: "reference" (one row at a time in float64), "torch" (``mv`` in fp32), "triton" (one program per
``BLOCK_M`` rows, ``d`` in ``BLOCK_D`` chunks, fp32 accumulation), "auto" (Triton on CUDA, torch
elsewhere).  Every backend upcasts half-precision inputs and returns fp32.
"""

import torch

from mmprm_infer.kernels import backends
from mmprm_infer.kernels.triton_runtime import jit_lazily as _jit
from mmprm_infer.kernels.triton_runtime import tl, triton

BACKENDS = ("auto", "triton", "torch", "reference")


def _check(rows, w) -> None:
    if rows.dim() != 2 or not rows.is_floating_point():
        raise ValueError(f"rows must be a floating [M, d] tensor, got {rows.dtype} {tuple(rows.shape)}")
    d = rows.shape[1]
    if w.shape != (d,):
        raise ValueError(f"w must be [d] = [{d}] (W[good] - W[bad], or a value head's row), got {tuple(w.shape)}")
    if w.device != rows.device:
        raise ValueError(f"w is on {w.device} but rows are on {rows.device}; move it to {rows.device}")


# --------------------------------------------------------------------------
# reference: one row at a time, float64
# --------------------------------------------------------------------------


def _rewards_reference(rows, w, b):
    rewards = backends.empty((rows.shape[0],), torch.float32, rows.device)
    w = w.double()
    for i in range(rows.shape[0]):
        rewards[i] = torch.sigmoid(rows[i].double() @ w + b).item()
    return rewards


# --------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------


def _rewards_torch(rows, w, b):
    return torch.sigmoid(torch.mv(rows.float(), w.float()) + b)


# --------------------------------------------------------------------------
# Triton: BLOCK_M rows x d in BLOCK_D chunks, one fp32 dot per row, then the sigmoid
# --------------------------------------------------------------------------


def _marker_reward_kernel(Rows, W, Out, M, d, s_rm, s_rd, bias, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    offsets = rows.to(tl.int64) * s_rm
    dot = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        x = tl.load(Rows + offsets[:, None] + cols[None, :] * s_rd,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        dot += tl.sum(x * w[None, :], 1)
    z = dot + bias
    tl.store(Out + rows, 1.0 / (1.0 + tl.exp(-z)), mask=row_ok)


def _rewards_triton(rows, w, b, block_m=16, block_d=None):
    m, d = rows.shape
    rewards = backends.empty((m,), torch.float32, rows.device)
    if m == 0:
        return rewards
    block_d = block_d or min(1024, triton.next_power_of_2(d))
    _jit(_marker_reward_kernel)[(triton.cdiv(m, block_m),)](
        rows, w, rewards, m, d, *rows.stride(), float(b), BLOCK_M=block_m, BLOCK_D=block_d,
    )
    return rewards


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


def marker_rewards(rows: torch.Tensor, w: torch.Tensor, b: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """p = sigmoid(rows . w + b) per row, fp32 [M].

    rows [M, d]: final-normed hidden states at the step markers (any float dtype, any strides);
    w [d]: ``W[good] - W[bad]`` of a two-row head, or a value head's row; b: the matching bias (a float).
    """
    _check(rows, w)
    backend = backends.resolve(backend, rows.device, BACKENDS)
    b = float(b)
    if backend == "reference":
        return _rewards_reference(rows, w, b)
    if backend == "torch":
        return _rewards_torch(rows, w, b)
    return _rewards_triton(rows, w.contiguous(), b)  # the kernel reads w with unit stride
