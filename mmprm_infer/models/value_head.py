"""Qwen2ForPrmModel: Skywork-o1-Open-PRM's value-head PRM, without remote code.

The Skywork release wraps a Qwen2 causal LM with TRL's value head
(``v_head = ValueHead``: dropout, then ``summary = Linear(hidden, 1)``) and
reads ``sigmoid(v_head(h))`` per token (SkyworkAI/skywork-o1-prm-inference,
``model_utils/prm_model.py``; its vLLM plugin names the architecture
``Qwen2ForPrmModel``).  The parameter names here (``model.*``,
``v_head.summary.weight``, ``v_head.summary.bias``) match its checkpoints, so
``from_pretrained`` loads them as they are; the LM head those checkpoints
also hold is never used for rewards and is not loaded.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2Model

from mmprm_infer.models.qwen2_prm import Qwen2WithTokenHead


class ValueHead(nn.Module):
    """``summary = Linear(hidden, 1)``; the release's dropout is the identity at inference."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # The release upcasts to the head's dtype before the Linear.
        return self.summary(hidden.to(self.summary.weight.dtype))


class Qwen2ForPrmModel(Qwen2WithTokenHead):
    """``forward(...).logits`` [batch, tokens, 1]: the value head's output (a logit; sigmoid gives the reward)."""

    # Skywork's checkpoints keep the causal LM's head beside the value head.
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    def __init__(self, config: Qwen2Config):
        super().__init__(config)
        self.model = Qwen2Model(config)
        self.v_head = ValueHead(config.hidden_size)
        self.post_init()

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.v_head(hidden)
