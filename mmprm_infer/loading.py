"""From a checkpoint directory to (model, tokenizer, format name).

The format is read from the checkpoint where it says so: our own
``mmprm_format`` key (written by ``PRM.save_pretrained`` and the trainer),
the architecture (``Qwen2ForProcessRewardModel``, ``Qwen2ForPrmModel``, a
2-label ``*ForTokenClassification``), the head's weights (``v_head.summary``),
or a detector registered by a format family.  Otherwise the user must name it.

Before any weights are built, the format's model class is checked against
the checkpoint: a format that does not fit the checkpoint's architecture, or
whose model would leave head weights the checkpoint lacks at their random
initialisation, is an error naming both (``CheckpointMismatchError``).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    AutoTokenizer,
    InternVLForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
)

from mmprm_infer.formats import (
    FORMATS,
    MODEL_CAUSAL_LM,
    MODEL_INTERNVL,
    MODEL_QWEN2_5_VL,
    MODEL_QWEN2_PRM,
    MODEL_TOKEN_CLASSIFICATION,
    MODEL_VALUE_HEAD,
    FormatError,
)
from mmprm_infer.formats.internvl_base import detect_internvl_format
from mmprm_infer.formats.vl_prm import QWEN_VL_ARCHITECTURE, detect_vl_prm_format
from mmprm_infer.models import internvl as _internvl  # noqa: F401  (registers the InternVL adapter)
from mmprm_infer.models import qwen_vl as _qwen_vl  # noqa: F401  (registers the Qwen2.5-VL adapter)
from mmprm_infer.models.qwen2_prm import Qwen2ForProcessRewardModel
from mmprm_infer.models.value_head import Qwen2ForPrmModel

FORMAT_KEY = "mmprm_format"
FORMAT_OPTIONS_KEY = "mmprm_format_options"

# (config dict, tokenizer) -> format name or None; format families append here.
FORMAT_DETECTORS: list[Callable[[dict, object], str | None]] = []

# model kind -> the class (or Auto class) that carries it
MODEL_CLASSES: dict[str, type] = {
    MODEL_CAUSAL_LM: AutoModelForCausalLM,
    MODEL_QWEN2_PRM: Qwen2ForProcessRewardModel,
    MODEL_INTERNVL: InternVLForConditionalGeneration,
    MODEL_TOKEN_CLASSIFICATION: AutoModelForTokenClassification,
    MODEL_VALUE_HEAD: Qwen2ForPrmModel,
    MODEL_QWEN2_5_VL: Qwen2_5_VLForConditionalGeneration,
}



def _complete_loader(cls) -> Callable[[str, torch.dtype], torch.nn.Module]:
    """``cls.from_pretrained`` that refuses a checkpoint whose weights do not match the model exactly."""
    def load(path: str, dtype: torch.dtype) -> torch.nn.Module:
        model, info = cls.from_pretrained(path, dtype=dtype, output_loading_info=True)
        check_loading_info(path, info)
        return model
    return load


# model kind -> (path, dtype) -> model
MODEL_LOADERS: dict[str, Callable[[str, torch.dtype], torch.nn.Module]] = {
    kind: _complete_loader(cls) for kind, cls in MODEL_CLASSES.items()
}

# model kind -> (what it runs on, config.json -> whether its architecture fits).  A config
# without ``architectures`` fits any kind; the weight check still applies.
ARCHITECTURE_FITS: dict[str, tuple[str, Callable[[dict], bool]]] = {
    MODEL_CAUSAL_LM: ("a causal LM (*ForCausalLM)", lambda archs: any(a.endswith(("ForCausalLM", "LMHeadModel"))
                                                                       for a in archs)),
    MODEL_QWEN2_PRM: ("Qwen2ForProcessRewardModel", lambda archs: "Qwen2ForProcessRewardModel" in archs),
    MODEL_INTERNVL: ("InternVLForConditionalGeneration",
                     lambda archs: "InternVLForConditionalGeneration" in archs),
    MODEL_TOKEN_CLASSIFICATION: ("a token classifier (*ForTokenClassification)",
                                 lambda archs: any(a.endswith("ForTokenClassification") for a in archs)),
    # Skywork's checkpoints hold the causal LM beside the value head; the weight check finds the head.
    MODEL_VALUE_HEAD: ("a Qwen2 value-head PRM (Qwen2ForPrmModel)",
                       lambda archs: bool({"Qwen2ForPrmModel", "Qwen2ForCausalLM"} & set(archs))),
    MODEL_QWEN2_5_VL: (QWEN_VL_ARCHITECTURE, lambda archs: QWEN_VL_ARCHITECTURE in archs),
}


class CheckpointMismatchError(FormatError):
    """The format's model class does not fit the checkpoint (raised before weights are built)."""


class IncompleteCheckpointError(CheckpointMismatchError):
    """The checkpoint's weights are not exactly the model's: some are missing (they would stay random) or
    some are extra (weights of another architecture, or a damaged save)."""


def _names(keys: list[str], shown: int = 5) -> str:
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def check_loading_info(path: str | os.PathLike, info: dict) -> None:
    """IncompleteCheckpointError naming the tensors when ``from_pretrained``'s loading info lists any missing,
    unexpected or wrongly shaped weight (transformers only warns: a missing weight keeps its random init)."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys") or ())
    problems = [f"{len(keys)} {what}: {_names(keys)}" for keys, what in (
        (missing, "weight(s) the model needs are missing from it"), (unexpected, "weight(s) the model does not have"),
        (mismatched, "weight(s) of the wrong shape")) if keys]
    if problems:
        raise IncompleteCheckpointError(
            f"checkpoint {path} does not match its model: {'; '.join(problems)}. A missing weight would stay "
            "randomly initialised and the scores would mean nothing; re-save or re-download the checkpoint, or "
            "pass the format it was trained with")


def read_config(path: str | os.PathLike) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a checkpoint directory (no config.json); give the folder that "
            "save_pretrained wrote (models are never downloaded by this library)"
        )
    return json.loads(config_file.read_text())


def _num_labels(config: dict) -> int:
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    return int(config.get("num_labels") or 2)  # transformers' default, which it does not write out


def _detect_from_config(config: dict, tokenizer) -> str | None:
    if config.get(FORMAT_KEY):
        return config[FORMAT_KEY]
    archs = config.get("architectures") or []
    if "Qwen2ForProcessRewardModel" in archs:
        return "qwen2.5-math-prm"
    if "Qwen2ForPrmModel" in archs:
        return "skywork"
    if any(a.endswith("ForTokenClassification") for a in archs) and _num_labels(config) == 2:
        return "token-classification"
    name = str(config.get("_name_or_path", "")).lower()
    if "shepherd" in name:
        return "math-shepherd"
    if "rlhflow" in name and "prm" in name:  # RLHFlow/Llama3.1-8B-PRM-*-Data: a plain Llama otherwise
        return "rlhflow"
    return None


FORMAT_DETECTORS.append(_detect_from_config)
FORMAT_DETECTORS.append(detect_internvl_format)
FORMAT_DETECTORS.append(detect_vl_prm_format)


def detect_format(config: dict, tokenizer, path: str | os.PathLike | None = None) -> str | None:
    for detector in FORMAT_DETECTORS:
        name = detector(config, tokenizer)
        if name:
            return name
    # Skywork's published configs may name the plain causal LM; its value head's weights say it.
    if path is not None and "v_head.summary.weight" in (checkpoint_keys(path) or ()):
        return "skywork"
    return None


# --------------------------------------------------------------------------- checkpoint checks


def checkpoint_keys(path: str | os.PathLike) -> set[str] | None:
    """The weight names a checkpoint holds, read from safetensors headers or index (no tensors); None if unknown."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text()).get("weight_map", {}))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    keys: set[str] = set()
    for file in files:
        keys |= set(_safetensors_header(file)) - {"__metadata__"}
    return keys


SAFETENSORS_MAX_HEADER = 100 * 2 ** 20  # the safetensors library's own limit


def _safetensors_header(file: Path) -> dict:
    """A safetensors file's JSON header, its claimed size checked against the file before it is read."""
    def damaged(why: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(f"{file} is not a valid safetensors file: {why}; re-save or re-download it")

    file_size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise damaged(f"it holds {file_size} bytes, fewer than the 8 of a header length")
        (size,) = struct.unpack("<Q", head)
        if size > min(file_size - 8, SAFETENSORS_MAX_HEADER):
            raise damaged(f"its header claims {size} bytes, the file holds {file_size}")
        try:
            header = json.loads(f.read(size))
        except (ValueError, UnicodeDecodeError) as exc:
            raise damaged(f"its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object")
    return header


def _architecture(config: dict) -> str:
    archs = config.get("architectures") or []
    return "/".join(archs) if archs else f"model_type {config.get('model_type')!r}"


def head_weight_names(kind: str, path: str | os.PathLike) -> list[str]:
    """Parameters of the format's model class outside its base model (the reward/LM head), tied ones dropped.

    The model is built on the meta device: no memory, no weights."""
    cls = MODEL_CLASSES[kind]
    config = (AutoConfig if cls.__name__.startswith("Auto") else cls.config_class).from_pretrained(str(path))
    with torch.device("meta"):
        model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
    prefix = model.base_model_prefix + "."
    return [name for name, _ in model.named_parameters() if not name.startswith(prefix)]


def check_format_fits_checkpoint(name: str, kind: str, config: dict, path: str | os.PathLike,
                                 tokenizer_problem: FormatError | None = None) -> None:
    """Raise CheckpointMismatchError when format ``name`` (model kind ``kind``) cannot run ``path`` as published."""
    archs = config.get("architectures") or []
    published = {k: v for k, v in config.items() if k != FORMAT_KEY}
    detected = (_detect_from_config(published, None) or detect_vl_prm_format(published, None)) if archs else None
    also = f"; also: {tokenizer_problem}" if tokenizer_problem else ""
    hint = (f"its format is {detected!r} (detected from the checkpoint): drop the format argument or pass that one"
            if detected and detected != name else "pass the format this checkpoint was trained with")
    wants, fits = ARCHITECTURE_FITS[kind]
    if archs and not fits(archs):
        raise CheckpointMismatchError(
            f"format {name!r} runs on {wants}, but {path} holds a {_architecture(config)} checkpoint "
            f"(config.json architectures); {hint}{also}"
        )
    if kind == MODEL_TOKEN_CLASSIFICATION and _num_labels(config) != 2:
        raise CheckpointMismatchError(
            f"format {name!r} reads a 2-label token classifier, but {path} ({_architecture(config)}) has "
            f"{_num_labels(config)} labels{also}"
        )
    keys = checkpoint_keys(path)
    if keys is None:
        return
    missing = [w for w in head_weight_names(kind, path)
               if w not in keys and not any(k.endswith("." + w) for k in keys)]
    if missing:
        raise CheckpointMismatchError(
            f"format {name!r} builds {MODEL_CLASSES[kind].__name__} on {path} ({_architecture(config)}), but the "
            f"checkpoint has no weights for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}: they "
            f"would stay randomly initialised and the scores would mean nothing; {hint}{also}"
        )


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


def load_checkpoint(path: str | os.PathLike, format: str | None, dtype, device, format_options: dict | None = None,
                    *, tokens_may_be_missing: bool = False):
    """Load (model, tokenizer, format name, format options) from a local directory.

    ``format_options`` (the caller's) take part in choosing the model class, e.g.
    ``custom`` with ``model_kind="internvl"``.  ``tokens_may_be_missing``: a base about to be
    trained, whose caller adds the format's tokens (`mmprm train`); the checkpoint checks
    still apply."""
    path = str(path)
    config = read_config(path)
    if "InternVLChatModel" in (config.get("architectures") or []):
        raise ValueError(
            f"{path} is in InternVL's own published layout (InternVLChatModel, remote code); convert it "
            f"once with `mmprm convert-internvl {path} DST` and load DST"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    name = format or detect_format(config, tokenizer, path)
    if name is None:
        raise ValueError(
            f"cannot tell which PRM format {path} uses (its config.json names none); pass "
            f"format= one of {sorted(FORMATS)}"
        )
    if name not in FORMATS:
        raise ValueError(f"unknown PRM format {name!r}; choose one of {sorted(FORMATS)}")
    saved = (config.get(FORMAT_OPTIONS_KEY) or {}) if config.get(FORMAT_KEY) == name else {}
    options = {**FORMATS[name].options_from_config(config), **saved} if isinstance(FORMATS[name], type) else saved
    try:
        fmt = FORMATS[name](**{**options, **(format_options or {})})
    except TypeError as exc:
        raise ValueError(f"bad options for format {name!r}: {exc}") from None
    try:
        fmt.check_tokenizer(tokenizer)
        tokenizer_problem = None
    except FormatError as exc:
        tokenizer_problem = None if tokens_may_be_missing else exc
    check_format_fits_checkpoint(name, fmt.model_kind, config, path, tokenizer_problem)
    if tokenizer_problem is not None:
        raise tokenizer_problem
    kind = fmt.model_kind
    device = torch.device(device)
    model = MODEL_LOADERS[kind](path, resolve_dtype(dtype, device))
    model.to(device).eval()
    return model, tokenizer, name, options
