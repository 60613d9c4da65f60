"""One interface over the model classes a PRM can live in.

Engines never touch model classes directly: they ask the adapter for the
text decoder, the input embeddings, the final norm and the reward head.  A
new architecture family is one new adapter.
"""

from __future__ import annotations

import torch
from torch import nn

from mmprm_infer.formats.base import (
    MODEL_CAUSAL_LM,
    MODEL_INTERNVL,
    MODEL_QWEN2_PRM,
    MODEL_TOKEN_CLASSIFICATION,
    MODEL_VALUE_HEAD,
    RewardColumns,
)


class ModelAdapter:
    """Causal LM whose LM head gives the reward logits (math-shepherd, custom, ...)."""

    kind = MODEL_CAUSAL_LM
    # reward = sigmoid(h . (W[good] - W[bad]) + db): engines may use the fused two-row kernel.
    two_row_head = True
    # Positions are M-RoPE triples from position_ids() (Qwen2.5-VL), not the token index.
    multimodal_rope = False

    def __init__(self, model: nn.Module):
        self.model = model

    # --- structure -----------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        """The text decoder (embeddings, layers, final norm), e.g. Qwen2Model/LlamaModel."""
        return self.model.get_decoder()

    @property
    def text_config(self):
        config = self.model.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    @property
    def max_positions(self) -> int | None:
        return getattr(self.text_config, "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.get_input_embeddings()(input_ids)

    # --- images (vision-language adapters override) --------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"this {type(self.model).__name__} model has no vision tower; pass image=None")

    def merge_image_features(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor | None:
        """inputs_embeds with the image placeholder rows replaced, or None for text-only input."""
        if image_features is not None:
            raise ValueError(f"this {type(self.model).__name__} model has no vision tower; pass image=None")
        return None

    # --- positions -------------------------------------------------------
    def position_ids(self, input_ids, image_features) -> torch.Tensor | None:
        """Rotary position ids of one whole sequence when they are not 0..T-1 (Qwen2.5-VL's
        M-RoPE with an image: [3, T]); None means the usual 1-D positions."""
        return None

    # --- reward head ---------------------------------------------------
    def output_head(self) -> nn.Linear:
        """The Linear whose rows give the output columns (the LM head here)."""
        return self.model.get_output_embeddings()

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full output logits for final-normed hidden states (the reference path)."""
        return self.output_head()(hidden)

    def reward_weights(self, columns: RewardColumns) -> tuple[torch.Tensor, torch.Tensor | float]:
        """(W[good] - W[bad], b[good] - b[bad]): the two head rows the reward needs (differentiable)."""
        head = self.output_head()
        w_diff = head.weight[columns.good] - head.weight[columns.bad]
        bias = getattr(head, "bias", None)
        b_diff = (bias[columns.good] - bias[columns.bad]).float() if bias is not None else 0.0
        return w_diff, b_diff

    def reward_logit_diff(self, hidden: torch.Tensor, columns: RewardColumns) -> torch.Tensor:
        """logit_good - logit_bad for final-normed hidden rows [M, d]; differentiable (the trainer's loss)."""
        w_diff, b_diff = self.reward_weights(columns)
        return hidden.float() @ w_diff.float() + b_diff

    def rewards_from_hidden(self, hidden: torch.Tensor, columns: RewardColumns) -> torch.Tensor:
        """p_good for final-normed hidden rows [M, d], reading only two head rows."""
        return torch.sigmoid(self.reward_logit_diff(hidden, columns))

    # --- full forward (reference) -------------------------------------
    def full_logits(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [T, V] of one sequence, computed by the model's own forward (``position_ids``:
        what ``self.position_ids`` gave, None for the model's default)."""
        pos = {} if position_ids is None else {"position_ids": position_ids[..., None, :]}
        if inputs_embeds is not None:
            return self.model(inputs_embeds=inputs_embeds[None], **pos).logits[0]
        return self.model(input_ids=input_ids[None], **pos).logits[0]


class Qwen2PRMAdapter(ModelAdapter):
    """Qwen2 body + 2-label score head (qwen2.5-math-prm)."""

    kind = MODEL_QWEN2_PRM
    two_row_head = False

    @property
    def decoder(self) -> nn.Module:
        return self.model.model

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.score(hidden)

    def reward_logit_diff(self, hidden: torch.Tensor, columns: RewardColumns) -> torch.Tensor:
        # The head is a small MLP: run it only on the marker rows.
        logits = self.model.score(hidden).float()
        return logits[:, columns.good] - logits[:, columns.bad]

    def reward_weights(self, columns: RewardColumns):
        raise NotImplementedError("the qwen2.5-math-prm head is an MLP, not two LM-head rows")


class TokenClassificationAdapter(ModelAdapter):
    """AutoModelForTokenClassification with 2 labels (TRL PRMTrainer, PURE): a Linear head, two rows."""

    kind = MODEL_TOKEN_CLASSIFICATION

    @property
    def decoder(self) -> nn.Module:
        return self.model.base_model

    def output_head(self) -> nn.Linear:
        # Qwen2/Llama/Mistral...ForTokenClassification call it ``score``; BERT-style models ``classifier``.
        head = getattr(self.model, "score", None) or getattr(self.model, "classifier", None)
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"{type(self.model).__name__} has no Linear token-classification head (score/classifier); "
                "the token-classification format reads one"
            )
        return head


class ValueHeadAdapter(ModelAdapter):
    """A body with a scalar value head (Skywork's Qwen2ForPrmModel): reward = sigmoid(v).

    The value is presented as two output columns ``[v, 0]``, so the engines'
    ``softmax(out[[0, 1]])[0] = sigmoid(v)`` and the two-row form
    ``h . w + b`` read it unchanged.
    """

    kind = MODEL_VALUE_HEAD

    @property
    def decoder(self) -> nn.Module:
        return self.model.model

    def output_head(self) -> nn.Linear:
        return self.model.v_head.summary

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        value = self.model.v_head(hidden)
        return torch.cat([value, torch.zeros_like(value)], dim=-1)

    def reward_weights(self, columns: RewardColumns):
        if (columns.good, columns.bad) != (0, 1):
            raise ValueError(f"a value head has columns (value, 0) = (0, 1); got {columns}")
        head = self.output_head()
        b = head.bias[0].float() if head.bias is not None else 0.0
        return head.weight[0], b

    def full_logits(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
        value = super().full_logits(input_ids, inputs_embeds, position_ids)
        return torch.cat([value, torch.zeros_like(value)], dim=-1)


ADAPTERS: dict[str, type[ModelAdapter]] = {
    MODEL_CAUSAL_LM: ModelAdapter,
    MODEL_QWEN2_PRM: Qwen2PRMAdapter,
    MODEL_TOKEN_CLASSIFICATION: TokenClassificationAdapter,
    MODEL_VALUE_HEAD: ValueHeadAdapter,
}


def register_adapter(kind: str, adapter: type[ModelAdapter]) -> None:
    ADAPTERS[kind] = adapter


def adapter_for(model: nn.Module, kind: str) -> ModelAdapter:
    if kind not in ADAPTERS:
        raise ValueError(f"no model adapter for kind {kind!r}; known: {sorted(ADAPTERS)}")
    return ADAPTERS[kind](model)


__all__ = ["ModelAdapter", "Qwen2PRMAdapter", "TokenClassificationAdapter", "ValueHeadAdapter", "adapter_for",
           "register_adapter", "ADAPTERS", "MODEL_INTERNVL"]
