"""W2 (multimodal) route: the library's ``mm-prm`` format when registered, else ``custom`` on InternVL.

``"mm-prm" in mmprm_infer.formats.FORMATS``: the checkpoint loads with
``PRM.from_pretrained(path, format="mm-prm", max_tiles=...)`` -- MM-PRM's
evaluation layout, including InternVL2.5's default (Chinese) system message,
which the tiny byte-level tokenizer spends ~190 tokens on.

Otherwise: the library's ``custom`` format with ``model_kind="internvl"``
(step tag ``<prm>``, reward tokens ``Yes`` / ``No``, the image block in the
user turn and ``Question: ...\\nProcess: step<prm>step<prm>`` in the
assistant turn).  The report records which route ran.
"""

from __future__ import annotations

import dataclasses

SYSTEM = "You are a careful math grader."
MM_TEMPLATE = (
    "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n"
    "<|im_start|>user\n{images}\n<|im_end|>\n"
    "<|im_start|>assistant\nQuestion: {question}\nProcess: "
)


def library_has_mm_prm() -> bool:
    from mmprm_infer.formats import FORMATS

    return "mm-prm" in FORMATS


def load_mm_prm(path, max_tiles: int):
    """(prm, route description) for the W2 checkpoint at ``path``."""
    import torch
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    from mmprm_infer import PRM
    from mmprm_infer.formats import CustomFormat

    if library_has_mm_prm():
        prm = PRM.from_pretrained(path, format="mm-prm", dtype="float32", max_tiles=max_tiles)
        return prm, f"library format 'mm-prm' (max_tiles={max_tiles}) on InternVLForConditionalGeneration"
    if "model_kind" not in {f.name for f in dataclasses.fields(CustomFormat)}:
        raise RuntimeError(
            "W2 needs an image-capable format: this mmprm_infer has neither the 'mm-prm' format nor "
            "custom(model_kind='internvl'); run --workload W1, or update the library"
        )
    model = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    options = dict(step_tag="<prm>", good_token="Yes", bad_token="No", prompt_template=MM_TEMPLATE,
                   step_separator="", add_special_tokens=False, model_kind="internvl", max_tiles=max_tiles)
    prm = PRM(model, tokenizer, "custom", **options)
    return prm, ("library format 'custom' (model_kind='internvl', tag <prm>, Yes/No, MM-PRM-like layout) on "
                 "InternVLForConditionalGeneration: 'mm-prm' is not registered")
