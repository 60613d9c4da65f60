"""Model adapters, registered by model kind (``PRMFormat.model_kind``), and their reward heads."""

from __future__ import annotations

from torch import nn

from mmprm_infer.formats.base import (
    MODEL_CAUSAL_LM,
    MODEL_INTERNVL,
    MODEL_QWEN2_5_VL,
    MODEL_QWEN2_PRM,
    MODEL_TOKEN_CLASSIFICATION,
    MODEL_VALUE_HEAD,
)
from mmprm_infer.models.adapters import ModelAdapter, Qwen2PRMAdapter, TokenClassificationAdapter, ValueHeadAdapter
from mmprm_infer.models.heads import RewardHead
from mmprm_infer.models.internvl import InternVLAdapter
from mmprm_infer.models.qwen_vl import Qwen2_5_VLAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register_adapter(kind: str, adapter: type[ModelAdapter]) -> None:
    ADAPTERS[kind] = adapter


def adapter_for(model: nn.Module, kind: str) -> ModelAdapter:
    if kind not in ADAPTERS:
        raise ValueError(f"no model adapter for kind {kind!r}; known: {sorted(ADAPTERS)}")
    return ADAPTERS[kind](model)


register_adapter(MODEL_CAUSAL_LM, ModelAdapter)
register_adapter(MODEL_QWEN2_PRM, Qwen2PRMAdapter)
register_adapter(MODEL_TOKEN_CLASSIFICATION, TokenClassificationAdapter)
register_adapter(MODEL_VALUE_HEAD, ValueHeadAdapter)
register_adapter(MODEL_INTERNVL, InternVLAdapter)
register_adapter(MODEL_QWEN2_5_VL, Qwen2_5_VLAdapter)


__all__ = ["ADAPTERS", "ModelAdapter", "RewardHead", "adapter_for", "register_adapter"]
