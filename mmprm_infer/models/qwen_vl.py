"""Qwen2.5-VL (transformers' ``Qwen2_5_VLForConditionalGeneration``) as a PRM body.

The reward is read from the LM head like any causal-LM PRM.  Two things
differ from InternVL:

- Images have dynamic resolution: each is cut into a (t, h, w) grid of
  14 px patches, and 2 x 2 patches merge into one ``<|image_pad|>`` token.
  ``image_features`` runs the vision tower once per question and returns the
  features together with that grid (``GridImageFeatures``);
  ``merge_image_features`` writes them into a candidate's embeddings where
  its ``<|image_pad|>`` tokens stand, the same ``masked_scatter`` the
  model's forward does.
- Positions are M-RoPE: three position ids (temporal, height, width) per
  token.  Text tokens carry the same id three times; an image's tokens carry
  their grid coordinates offset by the position the image starts at, and the
  text after an image continues from ``start + max(h, w) / merge``, not from
  its token index.  ``position_ids`` computes them for a whole candidate with
  the model's own ``get_rope_index``; engines slice them for a prefix chunk
  or a suffix, so each suffix continues the prefix's positions, image offsets
  ("rope deltas") included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmprm_infer.formats.base import MODEL_QWEN2_5_VL
from mmprm_infer.models.vision_language import VisionLanguageAdapter


@dataclass
class GridImageFeatures:
    """A question's image features and the patch grid each image was cut into."""

    features: torch.Tensor  # [image tokens, text hidden], all images in order
    grid_thw: torch.Tensor  # [images, 3] (t, h, w) in patches, as the image processor returns it

    @property
    def shape(self) -> torch.Size:
        return self.features.shape

    # the tensor methods training calls on image features (train/trainer.py)
    def is_inference(self) -> bool:
        return self.features.is_inference()

    def clone(self) -> GridImageFeatures:
        return dataclasses.replace(self, features=self.features.clone())


class Qwen2_5_VLAdapter(VisionLanguageAdapter):  # noqa: N801 - named after transformers' Qwen2_5_VL classes
    """Vision tower + merger + text decoder (M-RoPE) + LM head of a Qwen2.5-VL model."""

    kind = MODEL_QWEN2_5_VL
    multimodal_rope = True
    family = "a Qwen2.5-VL"
    vision_attr = "visual"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    image_token = "<|image_pad|>"

    # --- structure -----------------------------------------------------
    @property
    def vision_config(self):
        return self.model.config.vision_config

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    # --- images ----------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None = None) -> GridImageFeatures:
        """Flattened patches [patches, C * t * p * p] and their grid [images, 3] -> features + grid."""
        if grid_thw is None or pixel_values.dim() != 2:
            raise ValueError(
                "Qwen2.5-VL takes pixel_values as flattened patches [patches, C*t*p*p] with image_grid_thw "
                "[images, 3], as its image processor returns them"
            )
        grid_thw = grid_thw.to(device=self.device, dtype=torch.long)
        with torch.inference_mode():
            out = self.model.model.get_image_features(
                pixel_values.to(device=self.device, dtype=self.dtype), grid_thw, return_dict=True)
        return GridImageFeatures(torch.cat(list(out.pooler_output), dim=0), grid_thw)

    def feature_rows(self, image_features: GridImageFeatures) -> torch.Tensor:
        return image_features.features

    # --- positions -------------------------------------------------------
    def position_ids(self, input_ids: Sequence[int] | torch.Tensor,
                     image_features: GridImageFeatures | None) -> torch.Tensor | None:
        """M-RoPE ids [3, T] of one whole sequence, as the model's own get_rope_index gives them.

        Text only: 0..T-1 three times (what the model does without an image), still [3, T] so that
        text and image questions pack into one batch."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)[None]
        if image_features is None:
            return torch.arange(ids.shape[1], device=ids.device)[None].expand(3, -1)
        token_type = (ids == self.image_token_id).int()
        grid = image_features.grid_thw
        merge = self.vision_config.spatial_merge_size
        expected = int((grid.prod(-1) // merge ** 2).sum())
        if int(token_type.sum()) != expected:
            raise ValueError(
                f"the input holds {int(token_type.sum())} <|image_pad|> tokens but the image grid(s) "
                f"{grid.tolist()} need {expected}; the text must carry exactly the image blocks the format's "
                "prepare_images returned"
            )
        positions, _ = self.model.model.get_rope_index(ids, mm_token_type_ids=token_type, image_grid_thw=grid)
        return positions[:, 0]

    # --- full forward (reference) -------------------------------------
    def full_logits(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
        # Positions are always passed: without them the model falls back on rope deltas cached
        # by an earlier call (Qwen2_5_VLModel.rope_deltas), which belong to another input.
        if position_ids is None:
            position_ids = self.position_ids(input_ids, None)
        # position_ids() always returns a tensor
        pos = position_ids.to(input_ids.device)[:, None, :]  # type: ignore[union-attr]
        if inputs_embeds is None:
            inputs_embeds = self.merge_image_features(input_ids, None)
        if inputs_embeds is None:
            return self.model(input_ids=input_ids[None], position_ids=pos).logits[0]
        return self.model(inputs_embeds=inputs_embeds[None], position_ids=pos).logits[0]


__all__ = ["GridImageFeatures", "Qwen2_5_VLAdapter"]
