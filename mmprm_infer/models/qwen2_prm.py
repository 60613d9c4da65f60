"""Qwen2ForProcessRewardModel without remote code.

The Qwen2.5-Math-PRM release ships this class as remote code; transformers
does not.  It is a Qwen2 body with a 2-label head
``score = Linear(d, d) -> ReLU -> Linear(d, 2)``; the parameter names here
(``model.*``, ``score.0.*``, ``score.2.*``) match the released safetensors,
so ``from_pretrained`` loads those checkpoints as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2Model, Qwen2PreTrainedModel
from transformers.modeling_outputs import TokenClassifierOutput


class Qwen2WithTokenHead(Qwen2PreTrainedModel):
    """A Qwen2 body (``model.*``) whose per-token output is ``self.head_logits(h)``; subclasses add the head."""

    config_class = Qwen2Config

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> TokenClassifierOutput:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        return TokenClassifierOutput(logits=self.head_logits(out.last_hidden_state))


class Qwen2ForProcessRewardModel(Qwen2WithTokenHead):
    def __init__(self, config: Qwen2Config):
        super().__init__(config)
        self.num_labels = 2
        self.model = Qwen2Model(config)
        hidden = config.hidden_size
        self.score = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, self.num_labels))
        self.post_init()

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden)
