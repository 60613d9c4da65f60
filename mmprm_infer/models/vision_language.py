"""What the vision-language adapters (InternVL, Qwen2.5-VL) share.

Both transformers classes hold a ``model.model`` with a vision tower and a
``language_model`` text decoder, keep the text model's config as
``config.text_config`` and mark where an image's features go with one
placeholder token (``config.image_token_id``).  ``merge_image_features``
writes the features into those rows with the ``masked_scatter`` the models'
own forward uses.  A subclass names its family, vision tower and placeholder
(for the checks and their messages) and computes ``image_features``.
"""

from __future__ import annotations

import torch
from torch import nn

from mmprm_infer.models.adapters import ModelAdapter


class VisionLanguageAdapter(ModelAdapter):
    """Vision tower + text decoder + LM head, images merged at the placeholder token's rows."""

    family = ""  # "an InternVL", "a Qwen2.5-VL": as the messages name the model
    vision_attr = ""  # the vision tower's attribute of model.model
    model_class = ""  # the transformers class that loads such a model
    image_token = ""  # the placeholder token's text, e.g. "<IMG_CONTEXT>"
    image_token_noun = "image tokens"  # what the messages call the placeholder tokens

    def __init__(self, model: nn.Module):
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, self.vision_attr) or not hasattr(inner, "language_model"):
            raise ValueError(
                f"a {type(model).__name__} is not {self.family} vision-language model (no {self.vision_attr} / "
                f"language_model); load it with {self.model_class}, or pick a text format"
            )
        super().__init__(model)

    # --- structure -----------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    # --- images ----------------------------------------------------------
    def feature_rows(self, image_features) -> torch.Tensor:
        """The [image tokens, text hidden] rows of what ``image_features`` returned."""
        return image_features

    def merge_image_features(self, input_ids: torch.Tensor, image_features) -> torch.Tensor | None:
        mask = input_ids == self.image_token_id
        n_tokens = int(mask.sum())
        if image_features is None:
            if n_tokens:
                raise ValueError(
                    f"the input holds {n_tokens} {self.image_token_noun} ({self.image_token}, id "
                    f"{self.image_token_id}) but no image was given; pass the image, or remove the placeholder "
                    "text from the input"
                )
            return None
        features = self.feature_rows(image_features)
        if n_tokens != features.shape[0]:
            raise ValueError(
                f"image placeholders and image features differ: the input holds {n_tokens} {self.image_token} "
                f"tokens but the image(s) gave {features.shape[0]} feature rows; the text must carry "
                "exactly the image blocks the format's prepare_images returned"
            )
        embeds = self.embed(input_ids)
        # The same op as the model's own forward (InternVLModel, Qwen2_5_VLModel): bit-identical rows.
        return embeds.masked_scatter(mask[:, None].to(embeds.device), features.to(embeds.device, embeds.dtype))


__all__ = ["VisionLanguageAdapter"]
