"""Helpers the format-family tests share (tests/test_formats_families.py,
tests/test_multimodal_formats.py, tests/test_vl_prm.py): a noise image,
reward comparison, the guard fixture that fails any weight loading, a
vision-language model loaded as its release runs it, a shortened context,
and the bad-input errors every format must raise alike."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from mmprm_infer.formats import FormatError
from mmprm_infer.loading import MODEL_LOADERS
from mmprm_infer.vision import ImageLoadError


def noise_image(width, height, seed=0, mode="RGB"):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8")).convert(mode)


def close(got, want, tol, rtol=0):
    assert [len(r) for r in got] == [len(r) for r in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(w), rtol=rtol, atol=tol)


def load_release_model(model_cls, path):
    """(model in fp32, eval mode; its tokenizer): the release's own side of a comparison."""
    from transformers import AutoTokenizer

    return model_cls.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@contextlib.contextmanager
def context_limit(prm, positions):
    """The model's context cut to ``positions`` tokens inside the block, restored after."""
    config = prm.model.config.text_config
    saved = config.max_position_embeddings
    config.max_position_embeddings = positions
    try:
        yield
    finally:
        config.max_position_embeddings = saved


@pytest.fixture
def no_weights_built(monkeypatch):
    """Any model construction from weights fails the test: the guard must act before."""

    def refuse(path, dtype):
        raise AssertionError("weights were built before the format was checked against the checkpoint")

    for kind in list(MODEL_LOADERS):
        monkeypatch.setitem(MODEL_LOADERS, kind, refuse)


def check_bad_input_errors(prm, question, engine):
    """The errors of bad candidates every format gives alike, and a batch of good ones scored."""
    with pytest.raises(ValueError, match="candidates is empty"):
        prm.score(question, [], engine=engine)
    with pytest.raises(TypeError, match=r"wrap a single one as \[solution\]"):
        prm.score(question, "2 + 3 = 5", engine=engine)
    for bad in ("", "  \n\n  ", [], ["ok", "  "]):
        with pytest.raises(FormatError, match="candidate 1 has"):
            prm.score(question, [["2 + 3 = 5"], bad], engine=engine)
    with pytest.raises(TypeError, match="candidate 0 is a int"):
        prm.score(question, [5], engine=engine)
    rewards = prm.score(question, [["a"], ["b", "c"], ["a"]], engine=engine)
    assert [len(r) for r in rewards] == [1, 2, 1] and rewards[0] == pytest.approx(rewards[2], abs=1e-5)


def check_bad_image_files(prm, question, steps, tmp_path):
    """A missing or unreadable image file is named; a bad item of an image list is counted."""
    with pytest.raises(ImageLoadError, match="nowhere.png"):
        prm.score(question, [steps], image=tmp_path / "nowhere.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(ImageLoadError, match="broken.png"):
        prm.score(question, [steps], image=broken)
    with pytest.raises(TypeError, match="image 2 of 2"):
        prm.score(question, [steps], image=[noise_image(50, 50), 42])
