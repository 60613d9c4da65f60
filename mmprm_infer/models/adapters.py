"""One interface over the model classes a PRM can live in.

Engines never touch model classes directly: they ask the adapter for the
text decoder, the input embeddings, the positions and the reward head
(``reward_head(columns)``, a ``mmprm_infer.models.heads.RewardHead``).  A
new architecture family is one new adapter, registered by kind in
``mmprm_infer.models``.
"""

from __future__ import annotations

import torch
from torch import nn

from mmprm_infer.formats.base import (
    MODEL_CAUSAL_LM,
    MODEL_QWEN2_PRM,
    MODEL_TOKEN_CLASSIFICATION,
    MODEL_VALUE_HEAD,
    RewardColumns,
)
from mmprm_infer.models.heads import ClassifierHead, RewardHead, TwoRowHead, ValueHead


class ModelAdapter:
    """Causal LM whose LM head gives the reward logits (math-shepherd, custom, ...)."""

    kind = MODEL_CAUSAL_LM
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
    def reward_head(self, columns: RewardColumns) -> RewardHead:
        """The head that reads rewards from final-normed hidden rows: two rows of the LM head here."""
        return TwoRowHead(self.model.get_output_embeddings(), columns)

    # --- full forward (reference) -------------------------------------
    def full_logits(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token outputs [T, C] of one sequence (the logits; a value head's [T, 1]), computed by the
        model's own forward (``position_ids``: what ``self.position_ids`` gave, None for the model's
        default).  The reference engine reads its rewards from these through ``reward_head``."""
        pos = {} if position_ids is None else {"position_ids": position_ids[..., None, :]}
        if inputs_embeds is not None:
            return self.model(inputs_embeds=inputs_embeds[None], **pos).logits[0]
        return self.model(input_ids=input_ids[None], **pos).logits[0]


class Qwen2PRMAdapter(ModelAdapter):
    """Qwen2 body + 2-label score head (qwen2.5-math-prm): an MLP, run on the marker rows only."""

    kind = MODEL_QWEN2_PRM

    @property
    def decoder(self) -> nn.Module:
        return self.model.model

    def reward_head(self, columns: RewardColumns) -> RewardHead:
        return ClassifierHead(self.model.score, columns)


class TokenClassificationAdapter(ModelAdapter):
    """AutoModelForTokenClassification with 2 labels (TRL PRMTrainer, PURE): a Linear head, two rows."""

    kind = MODEL_TOKEN_CLASSIFICATION

    @property
    def decoder(self) -> nn.Module:
        return self.model.base_model

    def reward_head(self, columns: RewardColumns) -> RewardHead:
        # Qwen2/Llama/Mistral...ForTokenClassification call it ``score``; BERT-style models ``classifier``.
        head = getattr(self.model, "score", None) or getattr(self.model, "classifier", None)
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"{type(self.model).__name__} has no Linear token-classification head (score/classifier); "
                "the token-classification format reads one"
            )
        return TwoRowHead(head, columns)


class ValueHeadAdapter(ModelAdapter):
    """A body with a scalar value head (Skywork's Qwen2ForPrmModel): reward = sigmoid(v)."""

    kind = MODEL_VALUE_HEAD

    @property
    def decoder(self) -> nn.Module:
        return self.model.model

    def reward_head(self, columns: RewardColumns) -> RewardHead:
        return ValueHead(self.model.v_head.summary, columns)


__all__ = ["ModelAdapter", "Qwen2PRMAdapter", "TokenClassificationAdapter", "ValueHeadAdapter"]
