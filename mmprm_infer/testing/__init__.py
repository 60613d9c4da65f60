"""Test fixtures, not the library's API: tiny offline checkpoints built from real transformers classes
(random or briefly trained weights, saved with ``save_pretrained`` and loaded back through the code a real
checkpoint takes), a tiny step-writing policy, a local server launcher, and the example files the docs'
commands run on.

    from mmprm_infer.testing import build_tiny_qwen_prm, build_tiny_internvl
    prm = PRM.from_pretrained(build_tiny_qwen_prm("runs/tiny-qwen-prm"))

Nothing here downloads anything.  The library's own modules never import this package; tests, the docs'
examples, the benchmark and the synthetic recipe (which trains a tiny InternVL) do.
"""

from mmprm_infer.testing.tiny import (
    build_tiny_causal_lm,
    build_tiny_qwen_prm,
    build_tiny_rlhflow_prm,
    build_tiny_skywork_prm,
    build_tiny_token_classification_prm,
    build_tokenizer,
)
from mmprm_infer.testing.tiny_internvl import build_tiny_internvl
from mmprm_infer.testing.tiny_policy import build_tiny_step_policy
from mmprm_infer.testing.tiny_qwen_vl import build_tiny_qwen2_5_vl

__all__ = ["build_tiny_causal_lm", "build_tiny_qwen_prm", "build_tiny_rlhflow_prm", "build_tiny_skywork_prm",
           "build_tiny_token_classification_prm", "build_tokenizer", "build_tiny_internvl", "build_tiny_qwen2_5_vl",
           "build_tiny_step_policy"]
