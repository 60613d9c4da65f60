"""Tiny Qwen2.5-VL checkpoints for tests and demos.

``build_tiny_qwen2_5_vl`` writes a transformers-native
``Qwen2_5_VLForConditionalGeneration`` (random weights) and an offline BPE
tokenizer with Qwen2.5-VL's special tokens and chat template, so the
library's loading code is the code under test, as with a real
``Qwen/Qwen2.5-VL-*`` or ``ob11/Qwen-VL-PRM-*`` checkpoint.

Geometry follows Qwen2.5-VL: 14 px patches, 2 frames per temporal patch,
2x2 patches merged into one LLM token (a 28 x 28 pixel cell per image
token), window attention in the vision tower, M-RoPE in the text model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mmprm_infer.testing import tiny

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
QWEN_VL_SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# Qwen2.5-VL-Instruct's chat template (its chat_template.json), without the video branch: a default
# system turn when none is given; list contents render images as <|vision_start|><|image_pad|><|vision_end|>
# (the processor then repeats <|image_pad|> once per merged patch) and text parts as they are.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SINGLE_TOKEN_WORDS = ("+", "-")


def build_tokenizer(vocab_size: int = 700):
    """An offline byte-level BPE tokenizer with Qwen2.5-VL's special tokens and chat template."""
    return tiny.build_vl_tokenizer(QWEN_VL_SPECIAL_TOKENS, vocab_size=vocab_size,
                                   chat_template=QWEN2_5_VL_CHAT_TEMPLATE, single_token_words=SINGLE_TOKEN_WORDS)


def build_tiny_qwen2_5_vl(
    save_dir: str | os.PathLike,
    *,
    text_hidden: int = 64,
    text_layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    mrope_section: tuple[int, int, int] = (2, 3, 3),
    name_or_path: str | None = None,
    seed: int = 0,
) -> Path:
    """Write a tiny Qwen2.5-VL checkpoint (model + tokenizer) to ``save_dir`` and return its path.

    ``mrope_section`` splits head_dim / 2 rotary frequencies into (temporal, height, width);
    it must sum to ``text_hidden // heads // 2``.  ``name_or_path`` is recorded as the
    config's ``_name_or_path`` (the hub name a real checkpoint carries).
    """
    # transformers: heavy, loaded where used
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim = text_hidden // heads
    if sum(mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim / 2 = {head_dim // 2}")
    tokenizer = build_tokenizer()
    text_config = dict(
        **tiny.text_config_kwargs(tokenizer, hidden=text_hidden, layers=text_layers, heads=heads, kv_heads=kv_heads,
                                  intermediate=intermediate, max_positions=32768),
        bos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope_section)},
    )
    vision_config = dict(
        depth=vision_layers,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_heads=vision_heads,
        out_hidden_size=text_hidden,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,  # 2 x 2 merged cells per window: window attention is exercised on small images
        fullatt_block_indexes=[vision_layers - 1],
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PAD),
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_PAD),
        vision_start_token_id=tokenizer.convert_tokens_to_ids(VISION_START),
        vision_end_token_id=tokenizer.convert_tokens_to_ids(VISION_END),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    path = Path(save_dir)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if name_or_path is not None:
        config_file = path / "config.json"
        saved = json.loads(config_file.read_text())
        saved["_name_or_path"] = name_or_path
        config_file.write_text(json.dumps(saved, indent=2))
    return path


__all__ = [
    "IM_START", "IM_END", "VISION_START", "VISION_END", "IMAGE_PAD", "VIDEO_PAD", "QWEN2_5_VL_CHAT_TEMPLATE",
    "build_tokenizer", "build_tiny_qwen2_5_vl",
]
