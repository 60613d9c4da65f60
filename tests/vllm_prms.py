"""Tiny spread-reward PRM checkpoints that vLLM's CPU build can run (tests/test_vllm_plugin.py, the bench smoke).

vLLM's CPU attention takes head_dim 32 and up, so these have hidden 128 over 4 heads (conftest's are 64 / 4 = 16).
Weights are scaled as tests/spread_models.py does, then saved, so vLLM and the library load the same rewards
spread over (0, 1).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmprm_infer import PRM
from mmprm_infer.testing.tiny import build_tiny_causal_lm, build_tiny_qwen_prm

VLLM_SIZES = dict(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, max_positions=2048)


def _spread_and_save(raw: Path, out: Path, fmt: str) -> Path:
    from spread_models import spread

    prm = PRM.from_pretrained(raw, format=fmt, dtype=torch.float32)
    spread(prm.model)
    prm.save_pretrained(out)
    return out


def shepherd_prm_dir(root: Path) -> Path:
    """math-shepherd on a Llama with a BOS token (as the release's Mistral tokenizer)."""
    raw = build_tiny_causal_lm(root / "raw_shepherd", arch="llama", bos_token="<s>", seed=1, **VLLM_SIZES)
    return _spread_and_save(raw, root / "shepherd", "math-shepherd")


def qwen_prm_dir(root: Path) -> Path:
    """qwen2.5-math-prm: Qwen2ForProcessRewardModel laid out as the release."""
    raw = build_tiny_qwen_prm(root / "raw_qwen", seed=2, **VLLM_SIZES)
    return _spread_and_save(raw, root / "qwen", "qwen2.5-math-prm")
