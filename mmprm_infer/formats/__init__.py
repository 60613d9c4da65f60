"""PRM formats, registered by name."""

from __future__ import annotations

from collections.abc import Callable

from mmprm_infer.formats.base import (
    MODEL_CAUSAL_LM,
    MODEL_INTERNVL,
    MODEL_QWEN2_5_VL,
    MODEL_QWEN2_PRM,
    MODEL_TOKEN_CLASSIFICATION,
    MODEL_VALUE_HEAD,
    EncodedCandidate,
    FormatError,
    PRMFormat,
    RewardColumns,
)
from mmprm_infer.formats.custom import CustomFormat
from mmprm_infer.formats.math_shepherd import MathShepherdFormat
from mmprm_infer.formats.mm_prm import MMPRMFormat
from mmprm_infer.formats.qwen_math_prm import QwenMathPRMFormat
from mmprm_infer.formats.rlhflow import RLHFlowFormat
from mmprm_infer.formats.skywork import SkyworkFormat
from mmprm_infer.formats.token_classification import TokenClassificationFormat
from mmprm_infer.formats.visualprm import VisualPRMFormat
from mmprm_infer.formats.vl_prm import VLPRMFormat

FORMATS: dict[str, Callable[..., PRMFormat]] = {}


def register_format(name: str, factory: Callable[..., PRMFormat]) -> None:
    FORMATS[name] = factory


register_format("math-shepherd", MathShepherdFormat)
register_format("qwen2.5-math-prm", QwenMathPRMFormat)
register_format("custom", CustomFormat)
register_format("mm-prm", MMPRMFormat)
register_format("visualprm", VisualPRMFormat)
register_format("rlhflow", RLHFlowFormat)
register_format("skywork", SkyworkFormat)
register_format("token-classification", TokenClassificationFormat)
register_format("vl-prm", VLPRMFormat)


def get_format(fmt: str | PRMFormat, **options) -> PRMFormat:
    """A format instance from a name (with options) or an instance as is."""
    if isinstance(fmt, PRMFormat):
        if options:
            raise ValueError("format options are only accepted with a format name, not an instance")
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown PRM format {fmt!r}; choose one of {sorted(FORMATS)}")
    try:
        return FORMATS[fmt](**options)
    except TypeError as exc:
        raise ValueError(f"bad options for format {fmt!r}: {exc}") from None


__all__ = [
    "FORMATS", "get_format", "register_format", "PRMFormat", "EncodedCandidate", "RewardColumns",
    "FormatError", "MODEL_CAUSAL_LM", "MODEL_QWEN2_PRM", "MODEL_INTERNVL", "MODEL_TOKEN_CLASSIFICATION",
    "MODEL_VALUE_HEAD", "MODEL_QWEN2_5_VL", "CustomFormat", "MathShepherdFormat", "QwenMathPRMFormat", "MMPRMFormat",
    "VisualPRMFormat",
    "RLHFlowFormat", "SkyworkFormat", "TokenClassificationFormat", "VLPRMFormat",
]
