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

Where a checkpoint is: a local folder, or a hub id (``org/name``) resolved from the local Hugging Face cache
(``HF_HOME`` / ``HF_HUB_CACHE``, huggingface_hub's layout) with ``local_files_only``: nothing is ever
downloaded (``resolve_checkpoint``).  Loading options as transformers names them: ``dtype`` / ``torch_dtype``
(``"auto"``: the checkpoint's), ``device_map`` (a single device for every engine; a map that spreads the model
over devices for the engines in ``DEVICE_MAP_ENGINES``), ``attn_implementation``; ``trust_remote_code=True`` is
refused (``LoadOptions``).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants, snapshot_download
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
from mmprm_infer.models.qwen2_prm import Qwen2ForProcessRewardModel
from mmprm_infer.models.value_head import Qwen2ForPrmModel

FORMAT_KEY = "mmprm_format"
FORMAT_OPTIONS_KEY = "mmprm_format_options"

# (config dict, tokenizer) -> format name or None; format families append here.
FORMAT_DETECTORS: list[Callable[[dict, object], str | None]] = []

# model kind -> the class (or Auto class) that carries it
MODEL_CLASSES: dict[str, Any] = {  # transformers model classes (config_class, from_config)
    MODEL_CAUSAL_LM: AutoModelForCausalLM,
    MODEL_QWEN2_PRM: Qwen2ForProcessRewardModel,
    MODEL_INTERNVL: InternVLForConditionalGeneration,
    MODEL_TOKEN_CLASSIFICATION: AutoModelForTokenClassification,
    MODEL_VALUE_HEAD: Qwen2ForPrmModel,
    MODEL_QWEN2_5_VL: Qwen2_5_VLForConditionalGeneration,
}



def _complete_loader(cls) -> Callable[..., torch.nn.Module]:
    """``cls.from_pretrained`` that refuses a checkpoint whose weights do not match the model exactly."""
    def load(path: str, dtype: torch.dtype, **kwargs) -> torch.nn.Module:
        model, info = cls.from_pretrained(path, dtype=dtype, output_loading_info=True, **kwargs)
        check_loading_info(path, info)
        return model
    return load


# model kind -> (path, dtype, **transformers loading kwargs: device_map, attn_implementation) -> model
MODEL_LOADERS: dict[str, Callable[..., torch.nn.Module]] = {
    kind: _complete_loader(cls) for kind, cls in MODEL_CLASSES.items()
}

# model kind -> (what it runs on, config.json -> whether its architecture fits).  A config
# without ``architectures`` fits any kind; the weight check still applies.
ARCHITECTURE_FITS: dict[str, tuple[str, Callable[[list[str]], bool]]] = {
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


class CheckpointNotFound(FileNotFoundError):
    """Neither a checkpoint folder here nor a hub id in the local Hugging Face cache."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_checkpoint(path: str | os.PathLike, *, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of a checkpoint: ``path`` itself when it is a folder, else the snapshot of hub id ``path``
    (``org/name``, at ``revision``) in the local Hugging Face cache (``cache_dir``, else ``HF_HUB_CACHE`` /
    ``HF_HOME``/hub).  Never downloads: a model missing from the cache is a ``CheckpointNotFound`` that says
    how to fetch it."""
    local = Path(path)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise CheckpointNotFound(f"{path} is not a checkpoint folder (no config.json in it); give the folder "
                                     "that save_pretrained wrote")
        return local
    if local.exists():
        raise CheckpointNotFound(f"{path} is a file; give the checkpoint's folder (with config.json)")
    name = os.fspath(path)
    if not _HUB_ID.match(name) or name.startswith((".", "/")):
        raise CheckpointNotFound(f"{path} does not exist; give a checkpoint folder or a hub id (org/name) that is "
                                 "in the local Hugging Face cache")

    cache = os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    try:
        folder = Path(snapshot_download(name, revision=revision, cache_dir=cache, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - LocalEntryNotFoundError, a bad id or revision: the same advice
        raise CheckpointNotFound(
            f"{name} is not a folder here, and the hub model {name}{f' at {revision}' if revision else ''} is not "
            f"in the local Hugging Face cache ({cache}; {type(exc).__name__}); this library never downloads: fetch "
            f"it once where there is network (`hf download {name}`, or set HF_HOME to a cache that has it), or give "
            "its folder") from None
    if not (folder / "config.json").is_file():
        raise CheckpointNotFound(f"the cached snapshot of {name} ({folder}) has no config.json; fetch the whole "
                                 f"model (`hf download {name}`)")
    return folder


# engines that take a model spread over several devices by transformers' device_map (accelerate's hooks
# move activations between them); the others run a model that sits on one device.
DEVICE_MAP_ENGINES = ("reference",)

REMOTE_CODE_REFUSAL = (
    "trust_remote_code=True is refused: this library runs PRMs with transformers' own model classes and the "
    "ones it ships (each format's scores are tested against its release's computation on them), never a "
    "checkpoint's Python code; a checkpoint in InternVL's published layout (InternVLChatModel) converts once with "
    "`mmprm convert-internvl SRC DST`, and every other supported format loads without remote code")


@dataclass
class LoadOptions:
    """transformers' loading options, checked before anything is read (``PRM.from_pretrained`` takes them
    by their transformers names)."""

    device: Any = None  # None or "auto": cuda when torch sees a GPU, else cpu
    dtype: Any = None  # None: float32 on CPU, bfloat16 on CUDA; "auto": the checkpoint's
    device_map: Any = None  # a device (str, int, torch.device, {"": device}) or a map over several
    attn_implementation: str | None = None
    engine: str | None = None

    def __post_init__(self) -> None:
        single = self._single_device(self.device_map)
        if single is not None:
            if self.device not in (None, "auto") and torch.device(self.device) != torch.device(single):
                raise ValueError(f"device={self.device!r} and device_map={self.device_map!r} disagree; give one")
            self.device, self.device_map = single, None
        elif self.device_map is not None:
            engine = self.engine or "fast"
            if engine not in DEVICE_MAP_ENGINES:
                raise ValueError(
                    f"device_map={self.device_map!r} spreads the model over devices, which engine {engine!r} cannot "
                    f"run (it keeps one question's K/V on one device); engines that take it: "
                    f"{', '.join(DEVICE_MAP_ENGINES)} (engine='reference'), or give one device (device='cuda:0')")
        if self.device in (None, "auto"):
            self.device = "cuda" if torch.cuda.is_available() else "cpu"

    @staticmethod
    def _single_device(device_map) -> Any:
        if isinstance(device_map, dict) and set(device_map) == {""}:
            device_map = device_map[""]
        if isinstance(device_map, int) and not isinstance(device_map, bool):
            return f"cuda:{device_map}"
        if isinstance(device_map, torch.device):
            return str(device_map)
        if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            return device_map
        return None

    def model_kwargs(self) -> dict:
        out = {}
        if self.device_map is not None:
            out["device_map"] = self.device_map
        if self.attn_implementation is not None:
            out["attn_implementation"] = self.attn_implementation
        return out


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


def resolve_dtype(dtype, device: torch.device, config: dict | None = None) -> torch.dtype:
    """``dtype`` as a torch dtype: None -> float32 on CPU, bfloat16 on CUDA; "auto" -> the checkpoint's
    (``config.json``'s ``dtype`` / ``torch_dtype``; float32 when it names none)."""
    if dtype == "auto":
        stored = (config or {}).get("dtype") or (config or {}).get("torch_dtype")
        if stored is None and isinstance((config or {}).get("text_config"), dict):
            # config is a dict here: its text_config was checked
            stored = config["text_config"].get("dtype") or config["text_config"].get("torch_dtype")  # type: ignore[index]
        return getattr(torch, str(stored).replace("torch.", ""), torch.float32) if stored else torch.float32
    if dtype is None:
        # fp32 keeps CPU scores exact; bf16 is what PRMs are released and served in on GPUs.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto") from None
    return dtype


def load_checkpoint(path: str | os.PathLike, format: str | None, dtype, device, format_options: dict | None = None,
                    *, tokens_may_be_missing: bool = False, load_options: LoadOptions | None = None):
    """Load (model, tokenizer, format name, format options) from a local directory.

    ``format_options`` (the caller's) take part in choosing the model class, e.g.
    ``custom`` with ``model_kind="internvl"``.  ``tokens_may_be_missing``: a base about to be
    trained, whose caller adds the format's tokens (`mmprm train`); the checkpoint checks
    still apply.  ``load_options``: transformers' device_map / attn_implementation (``LoadOptions``)."""
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
    # a PRMFormat class here (the isinstance check)
    options = {**FORMATS[name].options_from_config(config), **saved} if isinstance(FORMATS[name], type) else saved  # type: ignore[attr-defined]
    try:
        fmt = FORMATS[name](**{**options, **(format_options or {})})
    except TypeError as exc:
        raise ValueError(f"bad options for format {name!r}: {exc}; PRM.from_pretrained takes device, dtype (or "
                         "torch_dtype), device_map, attn_implementation, revision, cache_dir, engine, "
                         "max_batch_tokens and the format's own options") from None
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
    extra = load_options.model_kwargs() if load_options is not None else {}
    model = MODEL_LOADERS[kind](path, resolve_dtype(dtype, device, config), **extra)
    if "device_map" not in extra:  # a spread model stays where accelerate placed it
        model.to(device)
    model.eval()
    return model, tokenizer, name, options
