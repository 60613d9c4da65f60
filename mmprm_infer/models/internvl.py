"""InternVL (transformers-native ``InternVLForConditionalGeneration``) as a PRM body.

The reward is read from the LM head like any causal-LM PRM; what is new is
the image path.  ``image_features`` runs the vision tower, pixel shuffle and
projector once per question; ``merge_image_features`` writes those rows into
a candidate's token embeddings where its ``<IMG_CONTEXT>`` tokens stand --
the same ``masked_scatter`` the model's own forward does -- so engines can
feed the text model ``inputs_embeds`` without re-running the vision tower for
each candidate.

Checkpoints in InternVL's own published layout (``InternVLChatModel``, e.g.
MM-PRM-8B, VisualPRM-8B) are converted first with ``mmprm convert-internvl``.
"""

from __future__ import annotations

import torch

from mmprm_infer.formats.base import MODEL_INTERNVL
from mmprm_infer.models.vision_language import VisionLanguageAdapter


class InternVLAdapter(VisionLanguageAdapter):
    """Vision tower + projector + text decoder + LM head of an InternVL model."""

    kind = MODEL_INTERNVL
    family = "an InternVL"
    vision_attr = "vision_tower"
    model_class = "InternVLForConditionalGeneration"
    image_token = "<IMG_CONTEXT>"
    image_token_noun = "image-context tokens"

    # --- images ----------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, H, W] pixels -> [tiles * tokens_per_tile, text_hidden] projected features.

        Scoring (model in eval mode, or grad disabled): computed under inference_mode.
        Training (model.train() with grad enabled): the vision tower runs without
        gradients (frozen, as MM-PRM trains: freeze_backbone) and the projector with
        them, so a trainer can update the projector (MM-PRM: freeze_mlp False).
        """
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be [tiles, 3, H, W], got shape {tuple(pixel_values.shape)}")
        config = self.model.config
        if self.model.training and torch.is_grad_enabled() and isinstance(config.vision_feature_layer, int):
            return self._trainable_image_features(pixel_values.to(device=self.device, dtype=self.dtype))
        with torch.inference_mode():
            out = self.model.model.get_image_features(
                pixel_values=pixel_values.to(device=self.device, dtype=self.dtype),
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
                return_dict=True,
            )
        features = out.pooler_output
        return features.reshape(-1, features.shape[-1])

    def _trainable_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """get_image_features step by step: frozen tower and pixel shuffle, projector with gradients."""
        inner, config = self.model.model, self.model.config
        layer = config.vision_feature_layer
        with torch.no_grad():
            out = inner.vision_tower(pixel_values=pixel_values, output_hidden_states=layer != -1, return_dict=True)
            features = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
            if config.vision_feature_select_strategy == "default":
                features = features[:, 1:, :]
            side = int(features.shape[1] ** 0.5)
            features = inner.pixel_shuffle(features.reshape(features.shape[0], side, side, -1),
                                           scale_factor=config.downsample_ratio)
            features = features.reshape(features.shape[0], -1, features.shape[-1])
        features = inner.multi_modal_projector(features)
        return features.reshape(-1, features.shape[-1])

    # --- full forward (reference) -------------------------------------
    # InternVL takes no position ids (no M-RoPE)
    def full_logits(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if inputs_embeds is None:
            inputs_embeds = self.merge_image_features(input_ids, None)
        if inputs_embeds is None:
            return self.model(input_ids=input_ids[None]).logits[0]
        return self.model(inputs_embeds=inputs_embeds[None]).logits[0]


__all__ = ["InternVLAdapter"]
