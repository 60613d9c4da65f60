"""Tiny checkpoints shared by the tests: built once per session, offline."""

from __future__ import annotations

import os

import pytest
import torch

# Triton picks compiled vs interpreted at its first import (which transformers
# triggers): without CUDA, the kernels are tested on the CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mmprm_infer.testing.tiny import build_tiny_causal_lm, build_tiny_qwen_prm

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu are reported as skipped, with the reason, where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu): no CUDA device here")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture
def image_work(monkeypatch):
    """What image preprocessing does with pixels: ``resized`` (target sizes of every PIL resize) and
    ``arrays`` (sizes of every PIL image turned into an array).  Deterministic stand-ins for "it is
    fast": a huge image must be resized as uint8 to the tile grid first, never converted whole."""
    from types import SimpleNamespace

    from PIL import Image

    work = SimpleNamespace(resized=[], arrays=[])
    resize = Image.Image.resize
    array_interface = Image.Image.__array_interface__

    def spy_resize(self, size, *args, **kwargs):
        work.resized.append(tuple(size))
        return resize(self, size, *args, **kwargs)

    def spy_array(self):
        work.arrays.append(self.size)
        return array_interface.fget(self)

    monkeypatch.setattr(Image.Image, "resize", spy_resize)
    monkeypatch.setattr(Image.Image, "__array_interface__", property(spy_array))
    return work


@pytest.fixture(scope="session")
def shepherd_dir(tmp_path_factory):
    # Llama with a BOS token, like math-shepherd's Mistral tokenizer.
    return build_tiny_causal_lm(tmp_path_factory.mktemp("shepherd"), arch="llama", bos_token="<s>", seed=1)


@pytest.fixture(scope="session")
def qwen_prm_dir(tmp_path_factory):
    return build_tiny_qwen_prm(tmp_path_factory.mktemp("qwen_prm"), seed=2)


@pytest.fixture(scope="session")
def custom_dir(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("custom"), arch="qwen2", extra_tokens=("<step>", "+", "-"),
                                seed=3)


@pytest.fixture(scope="session")
def image_sensitive_mm_prm(tmp_path_factory):
    """A tiny mm-prm InternVL PRM whose rewards move visibly with the image (1 tile per image)."""
    from transformers import InternVLForConditionalGeneration

    from mmprm_infer import PRM
    from mmprm_infer.testing.tiny_internvl import build_tiny_internvl

    path = build_tiny_internvl(tmp_path_factory.mktemp("mm_prm_images"), extra_special_tokens=("<prm>",), seed=5)
    model = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():  # stronger layers, so the image moves the rewards
        for name, param in model.model.language_model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.mul_(12.0)
        model.model.multi_modal_projector.linear_2.weight.mul_(20.0)
    model.save_pretrained(path)
    return PRM.from_pretrained(path, format="mm-prm", max_tiles=1)
