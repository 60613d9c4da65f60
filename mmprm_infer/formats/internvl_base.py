"""What the formats running on InternVL models share: images, placement, chat layout.

Facts from the releases (InternVL's ``internvl_chat`` code, which MM-PRM and
VisualPRM ship):

- ``<image>`` marks where an image goes; the text is built first, then each
  ``<image>`` is replaced, in order, by ``<img>`` + ``<IMG_CONTEXT>`` x
  (256 x tiles) + ``</img>`` (``query.replace('<image>', image_tokens, 1)``).
  When the text holds no ``<image>``, ``'<image>\\n'`` is put in front of it.
  Several images without placeholders follow InternVL's multi-image
  convention ``'Image-1: <image>\\nImage-2: <image>\\n'`` (its README and
  multi-image evaluations); neither PRM release defines that case.
- Conversation template ``internvl2_5`` (MPT separator style,
  ``internvl/conversation.py``): ``<|im_start|>system\\n{system}<|im_end|>\\n``,
  then per turn ``<|im_start|>{role}\\n{message}<|im_end|>\\n`` -- and a turn
  whose message is empty is rendered as its header alone, with no
  ``<|im_end|>`` (``if message: ... else: ret += role``).
- The query is tokenized whole with the tokenizer's special tokens
  (``tokenizer(query)``: a BOS for InternLM2 tokenizers, none for Qwen2).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    import torch

from mmprm_infer.formats.base import MODEL_INTERNVL, FormatError, single_token_id
from mmprm_infer.vision import (
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    InternVLImageConfig,
    dynamic_preprocess,
    image_token_block,
    num_tiles,
    open_rgb,
    tiles_to_tensor,
)

IMAGE_PLACEHOLDER = "<image>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Template "internvl2_5": its default system message (used by MM-PRM's
# batch_prm, which never sets one).
INTERNVL25_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)


# InternVL2.5 template (MPT separator style): the system turn is always
# present (default message when none is given); ``<image>`` stands where the
# caller substitutes ``vision.image_token_block(...)``, as InternVL's chat()
# does.
INTERNVL25_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = '" + INTERNVL25_SYSTEM_MESSAGE + "' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' -}}"
    "{%- for message in loop_messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def render_internvl25(system: str, turns: Sequence[tuple[str, str | None]]) -> str:
    """``get_conv_template('internvl2_5').get_prompt()`` for these turns.

    ``turns`` are (role, message) with role "user" or "assistant"; an empty or
    None message renders as the bare header, exactly as InternVL does.
    """
    text = f"{IM_START}system\n{system}{IM_END}\n"
    for role, message in turns:
        header = f"{IM_START}{role}\n"
        text += header + message + f"{IM_END}\n" if message else header
    return text


def image_prefix(num_images: int) -> str:
    """Placeholders put in front of a text that has none: ``<image>\\n`` or ``Image-k: <image>\\n`` lines."""
    if num_images == 1:
        return IMAGE_PLACEHOLDER + "\n"
    return "".join(f"Image-{i}: {IMAGE_PLACEHOLDER}\n" for i in range(1, num_images + 1))


def place_images(text: str, image_tokens: Sequence[str], fmt: str, *, exact: bool = False) -> str:
    """Put the image blocks into ``text`` where its ``<image>`` placeholders are (prefixing
    them when there are none), replacing the first occurrence once per image, in order.

    ``exact``: the number of placeholders must equal the number of images (VisualPRM
    asserts this); otherwise extra placeholders stay as text (MM-PRM's behaviour).
    """
    if not image_tokens:
        return text
    if IMAGE_PLACEHOLDER not in text:
        text = image_prefix(len(image_tokens)) + text
    return fill_placeholders(
        text, image_tokens, fmt, exact=exact,
        hint=f"put one {IMAGE_PLACEHOLDER!r} per image in the question, or none to have them placed in front of it",
    )


def fill_placeholders(text: str, image_tokens: Sequence[str], fmt: str, *, exact: bool, hint: str) -> str:
    """Replace the ``<image>`` placeholders of ``text`` by the image blocks, the first occurrence
    once per image, in order; fewer placeholders than images (or, ``exact``, any other number)
    is a FormatError that ends with ``hint`` (what to do about it)."""
    n = len(image_tokens)
    found = text.count(IMAGE_PLACEHOLDER)
    if found < n or (exact and found != n):
        raise FormatError(
            f"format {fmt!r}: got {n} image(s) but the question holds {found} {IMAGE_PLACEHOLDER!r} "
            f"placeholder(s); {hint}"
        )
    for block in image_tokens:
        text = text.replace(IMAGE_PLACEHOLDER, block, 1)
    return text


def as_image_list(image: Any) -> list:
    """None, one image (PIL image or path) or a list/tuple of them -> list."""
    if image is None:
        return []
    if isinstance(image, (Image.Image, str, os.PathLike)):
        return [image]
    if isinstance(image, (list, tuple)):
        return list(image)
    raise TypeError(
        f"image must be a PIL.Image, a file path, or a list of them; got {type(image).__name__}"
    )


def open_images(adapter, image, kind: str, family: str, fmt: str) -> list:
    """The image(s) a format's ``prepare_images`` was given, opened as RGB (a list, empty for None),
    once the model is known to be of ``kind`` (``family`` names it: "an InternVL")."""
    if getattr(adapter, "kind", None) != kind:
        raise FormatError(
            f"format {fmt!r} reads images only on {family} model, but the model was "
            f"loaded as {getattr(adapter, 'kind', type(adapter).__name__)!r}"
        )
    images = as_image_list(image)
    opened = []
    for i, im in enumerate(images):
        try:
            opened.append(open_rgb(im))
        except TypeError as exc:
            raise TypeError(f"image {i + 1} of {len(images)}: {exc}") from None
    return opened


class InternVLImages:
    """Mixin for formats that run on an InternVL model: ``prepare_images``.

    The using dataclass declares ``max_tiles`` (the dynamic-tiling budget per
    image; None = 6).  Everything else (tile size, tokens per tile, thumbnail)
    is read from the model's config.
    """

    max_tiles: int | None = None

    if TYPE_CHECKING:  # what the PRMFormat dataclass using this mixin provides
        name: str

    def image_config(self, adapter) -> InternVLImageConfig:
        overrides = {"max_tiles": self.max_tiles} if self.max_tiles is not None else {}
        return InternVLImageConfig.from_model_config(adapter.model.config, **overrides)

    def check_image_tokens(self, tokenizer) -> None:
        for token in (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN):
            single_token_id(tokenizer, token, "image token", self.name)

    def prepare_images(self, adapter, image) -> tuple[list[str], torch.Tensor]:
        """Image(s) -> (one placeholder block per image, features [image tokens, hidden]).

        All tiles of all images go through the vision tower in one call; the
        token budget is checked before any pixels are made.
        """
        opened = open_images(adapter, image, MODEL_INTERNVL, "an InternVL", self.name)
        if not opened:
            return [], None
        cfg = self.image_config(adapter)
        tiles = [num_tiles(im.width, im.height, cfg) for im in opened]
        block_tokens = [t * cfg.tokens_per_tile + 2 for t in tiles]
        limit = adapter.max_positions
        if limit is not None and sum(block_tokens) >= limit:
            raise FormatError(
                f"{len(opened)} image(s) take {sum(block_tokens)} tokens ({sum(tiles)} tiles x "
                f"{cfg.tokens_per_tile} + 2 per image), which leaves no room in the model's context of "
                f"{limit} tokens; pass fewer images or a smaller max_tiles (now {cfg.max_tiles})"
            )
        import torch  # torch: heavy, loaded where used

        pixels = torch.cat([tiles_to_tensor(dynamic_preprocess(im, cfg), cfg) for im in opened])
        features = adapter.image_features(pixels)
        if features.shape[0] != sum(tiles) * cfg.tokens_per_tile:
            raise ValueError(
                f"the vision tower gave {features.shape[0]} feature rows for {sum(tiles)} tiles, expected "
                f"{cfg.tokens_per_tile} per tile; the checkpoint's image_seq_length / downsample_ratio "
                "do not match its vision config"
            )
        return [image_token_block(t, cfg.tokens_per_tile) for t in tiles], features


def find_subsequence_positions(ids: Sequence[int], target: Sequence[int], offset: int) -> list[int]:
    """Start of every occurrence of ``target`` in ``ids``, plus ``offset``."""
    n = len(target)
    return [i + offset for i in range(len(ids) - n + 1) if list(ids[i:i + n]) == list(target)]


def detect_internvl_format(config: dict, tokenizer) -> str | None:
    """Which InternVL PRM a (converted, transformers-native) checkpoint is, where it says so.

    VisualPRM: the system message kept from its published config (it asks for
    "+"/"-" as a "process supervision model") or its name; MM-PRM: the
    ``<prm>`` token in the tokenizer.
    """
    archs = config.get("architectures") or []
    if config.get("model_type") != "internvl" and "InternVLForConditionalGeneration" not in archs:
        return None
    system = str(config.get("internvl_system_message") or "")
    name = str(config.get("_name_or_path", "")).lower()
    if "process supervision" in system or "visualprm" in name:
        return "visualprm"
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if "<prm>" in vocab:
        return "mm-prm"
    return None


__all__ = [
    "IMAGE_PLACEHOLDER", "INTERNVL25_CHAT_TEMPLATE", "INTERNVL25_SYSTEM_MESSAGE",
    "InternVLImages", "render_internvl25", "image_prefix",
    "place_images", "fill_placeholders", "as_image_list", "open_images", "find_subsequence_positions",
    "detect_internvl_format",
]
