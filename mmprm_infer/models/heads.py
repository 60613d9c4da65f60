"""Reward heads: "which head" turns the hidden rows at step markers into step rewards.

Which rows carry a reward is the format's business (``EncodedCandidate.reward_positions``); an engine
gathers them -- the fast engine as packed marker rows, the tree cache as every row it computes, the
reference engine from the model's own full output -- and hands them to the adapter's head
(``ModelAdapter.reward_head(columns)``), as vLLM's ``TokenPooler`` composes ``StepPool`` with
``TokenClassifierPoolerHead``.  One head class per kind of output layer:

- ``TwoRowHead``: a Linear whose rows ``good`` and ``bad`` are the reward logits (the LM head of
  math-shepherd / custom / mm-prm / visualprm / vl-prm / rlhflow, the 2-label ``score`` of
  token-classification models);
- ``ValueHead``: a Linear(d, 1) value head whose output is the reward's logit (Skywork);
- ``ClassifierHead``: any module giving per-row logits, two columns of which are read (qwen2.5-math-prm's
  Linear -> ReLU -> Linear ``score``).

Every head answers, for final-normed hidden rows [M, d]:

- ``logit_diff(rows)``: ``logit_good - logit_bad`` [M] fp32, differentiable (the trainer's loss);
- ``rewards(rows)``: p_good [M] fp32, ``sigmoid(logit_diff)``; the dot-product heads use the marker
  kernel (``mmprm_infer.kernels.step_reward``), so the full logits are never formed.

and, for the reference engine, which reads the model's own forward output [M, C] at those rows:

- ``output_columns(outputs)``: the columns the release reads, fp32 ([M, 2] good and bad, or the value
  [M, 1]);
- ``rewards_from_columns(columns)``: the release's formula on them (softmax over good/bad, or sigmoid of
  the value).

The two readouts share nothing but the column ids: the reference's goes through the model's own head
modules (bias, MLP, dtype handling included) and the release's formula, the fast one through the head
rows extracted here, so an error in either shows up as a disagreement between the engines.
"""

from __future__ import annotations

import torch
from torch import nn

from mmprm_infer.formats.base import RewardColumns
from mmprm_infer.kernels.step_reward import marker_rewards

__all__ = ["RewardHead", "DotHead", "TwoRowHead", "ValueHead", "ClassifierHead"]


class RewardHead:
    """Which head: hidden rows at step markers -> step rewards (see the module docstring)."""

    def __init__(self, columns: RewardColumns):
        self.columns = columns

    def logit_diff(self, rows: torch.Tensor) -> torch.Tensor:
        """logit_good - logit_bad [M] fp32 for final-normed hidden rows [M, d]; differentiable."""
        raise NotImplementedError

    def rewards(self, rows: torch.Tensor) -> torch.Tensor:
        """p_good [M] fp32 for final-normed hidden rows [M, d]."""
        return torch.sigmoid(self.logit_diff(rows))

    # --- the reference engine's readout: the model's own output at the reward rows -----------
    def output_columns(self, outputs: torch.Tensor) -> torch.Tensor:
        """The columns [M, 2] (good, bad) of the model's per-token outputs [M, C] the reward is read from."""
        return outputs[:, [self.columns.good, self.columns.bad]].float()

    def rewards_from_columns(self, columns: torch.Tensor) -> torch.Tensor:
        """p_good [M] from ``output_columns``: softmax over (good, bad), as the releases compute it."""
        return columns.softmax(dim=-1)[:, 0]


class DotHead(RewardHead):
    """A head whose reward logit is one dot product per row: ``rows . w + b``."""

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | float]:
        """(w [d], b): the reward logit is ``rows . w + b``; differentiable."""
        raise NotImplementedError

    def logit_diff(self, rows: torch.Tensor) -> torch.Tensor:
        w, b = self.weights()
        return rows.float() @ w.float() + b

    def rewards(self, rows: torch.Tensor) -> torch.Tensor:
        w, b = self.weights()
        return marker_rewards(rows, w.detach(), float(b))


class TwoRowHead(DotHead):
    """Rows ``good`` and ``bad`` of a Linear (an LM head, a 2-label token classifier) give the reward logits."""

    def __init__(self, linear: nn.Module, columns: RewardColumns):
        if columns.bad is None:
            raise ValueError(f"a two-row head reads two output columns (good, bad); got {columns}")
        super().__init__(columns)
        self.linear = linear

    def head_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W[good], W[bad]) [d] each: the two rows of the head the reward needs."""
        weight = self.linear.weight
        return weight[self.columns.good], weight[self.columns.bad]

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | float]:
        """(W[good] - W[bad], b[good] - b[bad])."""
        good, bad = self.head_rows()
        bias = getattr(self.linear, "bias", None)
        b = (bias[self.columns.good] - bias[self.columns.bad]).float() if bias is not None else 0.0
        return good - bad, b


class ValueHead(DotHead):
    """A Linear(d, 1) whose output is the reward's logit: p = sigmoid(value) (Skywork's ``v_head.summary``)."""

    def __init__(self, linear: nn.Linear, columns: RewardColumns):
        if (columns.good, columns.bad) != (0, None):
            raise ValueError(f"a value head has one output column, read as RewardColumns(good=0); got {columns}")
        super().__init__(columns)
        self.linear = linear

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | float]:
        bias = self.linear.bias
        return self.linear.weight[0], bias[0].float() if bias is not None else 0.0

    def output_columns(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs[:, [self.columns.good]].float()

    def rewards_from_columns(self, columns: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(columns[:, 0])


class ClassifierHead(RewardHead):
    """A module giving per-row logits [M, C] (an MLP), two columns of which are the reward logits; it runs
    on the marker rows only."""

    def __init__(self, module: nn.Module, columns: RewardColumns):
        if columns.bad is None:
            raise ValueError(f"a classifier head reads two output columns (good, bad); got {columns}")
        super().__init__(columns)
        self.module = module

    def logit_diff(self, rows: torch.Tensor) -> torch.Tensor:
        logits = self.module(rows).float()
        return logits[:, self.columns.good] - logits[:, self.columns.bad]
