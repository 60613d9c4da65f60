"""The engine contract: encoded questions in, step rewards out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from mmprm_infer.formats.base import EncodedCandidate, RewardColumns
from mmprm_infer.models.adapters import ModelAdapter


@dataclass
class EncodedQuestion:
    """All candidates of one question, plus its image features computed once."""

    candidates: list[EncodedCandidate]
    # [image tokens, hidden] (Qwen2.5-VL: with its grid), shared by all candidates
    image_features: torch.Tensor | None = None


class NonFiniteRewardError(FloatingPointError):
    pass


class Engine(ABC):
    name = ""

    @abstractmethod
    def score(
        self, adapter: ModelAdapter, columns: RewardColumns, questions: list[EncodedQuestion]
    ) -> list[list[list[float]]]:
        """Step rewards per question, per candidate, per step; same order as the input."""


def check_finite(rewards: torch.Tensor, question: int, candidate: int) -> None:
    if not torch.isfinite(rewards).all():
        raise NonFiniteRewardError(
            f"question {question} candidate {candidate}: the model produced non-finite logits at "
            "step markers (NaN/inf); check the checkpoint's weights and dtype (fp16 overflow? "
            "try dtype=torch.float32 or bfloat16)"
        )
