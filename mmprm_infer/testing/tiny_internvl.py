"""Tiny InternVL checkpoints for tests, demos and benchmarks.

``build_tiny_internvl`` writes a transformers-native
``InternVLForConditionalGeneration`` (Qwen2 text model, random weights) and an
offline BPE tokenizer with InternVL's special tokens and the InternVL2.5 chat
template.  Everything loads back through ``from_pretrained`` exactly as a
real ``*-hf`` InternVL checkpoint does, so the library's loading code is the
code under test.

Geometry matches InternVL2.5: 448 px tiles, 14 px patches -> 32x32 patch
grid, pixel shuffle with downsample ratio 0.5 -> 16x16 = 256 tokens per tile,
then the LayerNorm -> Linear -> GELU -> Linear projector into the text model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from mmprm_infer.formats.internvl_base import INTERNVL25_CHAT_TEMPLATE, INTERNVL25_SYSTEM_MESSAGE
from mmprm_infer.testing import tiny
from mmprm_infer.vision import IMAGENET_MEAN, IMAGENET_STD, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
VIDEO_TOKEN = "<video>"  # transformers' InternVLProcessor requires one

# Words that must each be one token: reward tokens of the PRM formats.
SINGLE_TOKEN_WORDS = ("Yes", "No", "+", "-")


def _training_corpus() -> list[str]:
    """A few hundred words of math solutions and chat markup, deterministic."""
    subjects = ["triangle", "circle", "square", "angle", "line", "area", "perimeter", "radius", "sum", "product"]
    verbs = ["equals", "is", "gives", "becomes", "has", "makes"]
    lines = []
    for i, s in enumerate(subjects):
        a, b = 3 + i, 7 + 2 * i
        v = verbs[i % len(verbs)]
        lines += [
            f"Step {i + 1}: The {s} of the figure {v} {a} + {b} = {a + b}.",
            f"Step {i + 2}: So the {s} is {a} * {b} - {a} = {a * b - a}, and x = {a}/{b}.",
            f"Question: What is the {s} in the image? Process: We compute the {s} first.",
            f"### Question:\n What is the {s}?\n\n### Solution Process:\nThe {s} is {a}.",
            f"Therefore, the final answer is \\boxed{{{a + b}}}.",
            "Is this step correct? Yes. Is that step correct? No. Yes No Yes No + - + -",
            "Answer Yes if the step is correct and No otherwise. Answer + or -.",
            "Please reason step by step, and put your final answer within \\boxed{}.",
        ]
    return lines * 4


def build_tokenizer(
    extra_special_tokens: Sequence[str] = ("<prm>",),
    *,
    vocab_size: int = 1000,
):
    """An offline byte-level BPE tokenizer carrying InternVL's special tokens,
    ``extra_special_tokens`` and the InternVL2.5 chat template."""
    specials = [PAD_TOKEN, IM_START, IM_END, IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN, VIDEO_TOKEN]
    return tiny.build_vl_tokenizer(
        specials + [t for t in extra_special_tokens if t not in specials],
        vocab_size=vocab_size,
        chat_template=INTERNVL25_CHAT_TEMPLATE,
        single_token_words=SINGLE_TOKEN_WORDS,
        corpus=_training_corpus(),
        # Named image tokens: transformers' InternVLProcessor reads these.
        start_image_token=IMG_START_TOKEN,
        end_image_token=IMG_END_TOKEN,
        context_image_token=IMG_CONTEXT_TOKEN,
        video_token=VIDEO_TOKEN,
    )


def build_tiny_internvl(
    save_dir: str | os.PathLike,
    *,
    text_hidden: int = 64,
    text_layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab_size: int | None = None,
    vision_hidden: int = 32,
    vision_layers: int = 1,
    vision_heads: int = 2,
    vision_intermediate: int | None = None,
    image_size: int = 448,
    patch_size: int = 14,
    extra_special_tokens: Sequence[str] = ("<prm>",),
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> Path:
    """Write a tiny InternVL checkpoint (model, tokenizer, image-processor config) to
    ``save_dir`` and return its path.

    ``vocab_size`` defaults to the tokenizer's size; a larger value pads the
    embedding (rows no token uses, as real Qwen checkpoints have), e.g. to
    match a benchmark text model.  Tokens per tile =
    ((image_size // patch_size) * 0.5) ** 2, i.e. 256 for 448 / 14.
    """
    from transformers import (  # transformers: heavy, loaded where used
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
        Qwen2Config,
    )

    side = image_size // patch_size
    if image_size % patch_size or side % 2:
        raise ValueError(
            f"image_size ({image_size}) must be a multiple of patch_size ({patch_size}) with an even "
            "patch grid, so the 0.5 pixel shuffle divides it (InternVL2.5: 448 / 14 = 32)"
        )
    tokens_per_tile = (side // 2) ** 2
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(extra_special_tokens)
    n_tokens = len(tokenizer)
    if vocab_size is None:
        vocab_size = n_tokens
    elif vocab_size < n_tokens:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({n_tokens} tokens)")

    text_config = Qwen2Config(
        **tiny.text_config_kwargs(tokenizer, hidden=text_hidden, layers=text_layers, heads=heads, kv_heads=kv_heads,
                                  intermediate=intermediate, max_positions=32768, vocab_size=vocab_size,
                                  tie_word_embeddings=tie_word_embeddings),
        bos_token_id=None,
    )
    vision_config = InternVLVisionConfig(
        hidden_size=vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        intermediate_size=vision_intermediate or 4 * vision_hidden,
        image_size=image_size,
        patch_size=patch_size,
    )
    config = InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN),
        image_seq_length=tokens_per_tile,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    model.save_pretrained(save_dir)

    # preprocessor_config.json records the tile geometry and normalization
    # (mmprm_infer.vision does the preprocessing).  No InternVLProcessor is
    # saved: constructing one needs torchvision (its video processor), and
    # the model itself needs only input_ids + pixel_values.
    GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        crop_to_patches=True,
        min_patches=1,
        max_patches=6,
    ).save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    return save_dir


__all__ = [
    "IM_START",
    "IM_END",
    "INTERNVL25_SYSTEM_MESSAGE",
    "INTERNVL25_CHAT_TEMPLATE",
    "SINGLE_TOKEN_WORDS",
    "build_tokenizer",
    "build_tiny_internvl",
]
