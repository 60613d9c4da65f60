"""From a checkpoint directory to (model, tokenizer, format name).

The format is read from the checkpoint where it says so: our own
``mmprm_format`` key (written by ``PRM.save_pretrained`` and the trainer),
the ``Qwen2ForProcessRewardModel`` architecture, or a detector registered by
a format family.  Otherwise the user must name it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, InternVLForConditionalGeneration

from .formats import FORMATS, MODEL_CAUSAL_LM, MODEL_INTERNVL, MODEL_QWEN2_PRM
from .formats.internvl_base import detect_internvl_format
from .models import internvl as _internvl  # noqa: F401  (registers the InternVL adapter)
from .models.qwen2_prm import Qwen2ForProcessRewardModel

FORMAT_KEY = "mmprm_format"
FORMAT_OPTIONS_KEY = "mmprm_format_options"

# (config dict, tokenizer) -> format name or None; format families append here.
FORMAT_DETECTORS: list[Callable[[dict, object], str | None]] = []

# model kind -> (path, dtype) -> model
MODEL_LOADERS: dict[str, Callable[[str, torch.dtype], torch.nn.Module]] = {
    MODEL_CAUSAL_LM: lambda path, dtype: AutoModelForCausalLM.from_pretrained(path, dtype=dtype),
    MODEL_QWEN2_PRM: lambda path, dtype: Qwen2ForProcessRewardModel.from_pretrained(path, dtype=dtype),
    MODEL_INTERNVL: lambda path, dtype: InternVLForConditionalGeneration.from_pretrained(path, dtype=dtype),
}


def read_config(path: str | os.PathLike) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a checkpoint directory (no config.json); give the folder that "
            "save_pretrained wrote (models are never downloaded by this library)"
        )
    return json.loads(config_file.read_text())


def _detect_from_config(config: dict, tokenizer) -> str | None:
    if config.get(FORMAT_KEY):
        return config[FORMAT_KEY]
    if "Qwen2ForProcessRewardModel" in (config.get("architectures") or []):
        return "qwen2.5-math-prm"
    if "shepherd" in str(config.get("_name_or_path", "")).lower():
        return "math-shepherd"
    return None


FORMAT_DETECTORS.append(_detect_from_config)
FORMAT_DETECTORS.append(detect_internvl_format)


def detect_format(config: dict, tokenizer) -> str | None:
    for detector in FORMAT_DETECTORS:
        name = detector(config, tokenizer)
        if name:
            return name
    return None


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        # fp32 keeps CPU scores exact; bf16 is what PRMs are released and served in on GPUs.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None
    return dtype


def load_checkpoint(path: str | os.PathLike, format: str | None, dtype, device, format_options: dict | None = None):
    """Load (model, tokenizer, format name, format options) from a local directory.

    ``format_options`` (the caller's) take part in choosing the model class, e.g.
    ``custom`` with ``model_kind="internvl"``."""
    path = str(path)
    config = read_config(path)
    if "InternVLChatModel" in (config.get("architectures") or []):
        raise ValueError(
            f"{path} is in InternVL's own published layout (InternVLChatModel, remote code); convert it "
            f"once with `mmprm convert-internvl {path} DST` and load DST"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    name = format or detect_format(config, tokenizer)
    if name is None:
        raise ValueError(
            f"cannot tell which PRM format {path} uses (its config.json names none); pass "
            f"format= one of {sorted(FORMATS)}"
        )
    if name not in FORMATS:
        raise ValueError(f"unknown PRM format {name!r}; choose one of {sorted(FORMATS)}")
    options = (config.get(FORMAT_OPTIONS_KEY) or {}) if config.get(FORMAT_KEY) == name else {}
    try:
        kind = FORMATS[name](**{**options, **(format_options or {})}).model_kind
    except TypeError as exc:
        raise ValueError(f"bad options for format {name!r}: {exc}") from None
    device = torch.device(device)
    model = MODEL_LOADERS[kind](path, resolve_dtype(dtype, device))
    model.to(device).eval()
    return model, tokenizer, name, options
