"""``mmprm convert-internvl SRC DST``: InternVL's published layout -> transformers-native.

MM-PRM-8B and VisualPRM-8B (InternVL2.5-8B) are published as InternVL's own
``InternVLChatModel`` (remote code): ``vision_model.*`` (InternViT),
``mlp1.{0,1,3}`` (LayerNorm, Linear, GELU, Linear) and ``language_model.*``
(InternLM2 for the 8B, Qwen2 or Llama for other sizes).  This writes the
same weights as ``InternVLForConditionalGeneration`` (Llama text model for
InternLM2), so ``PRM.from_pretrained(DST)`` loads them with no remote code.

Weights are streamed: one source shard is read, converted and written
before the next, so memory holds one shard, never two copies of the model.

The renames follow transformers' own ``convert_internvl_weights_to_hf.py``;
InternLM2 specifics follow InternLM2's modeling code: ``wqkv`` rows are laid
out per KV head as [q x groups, k, v] (``'b q (h gs d) -> b q h gs d'``,
gs = groups + 2), ``w1``/``w3``/``w2`` are gate/up/down, ``attention_norm``/
``ffn_norm`` the two RMSNorms, ``output`` the LM head.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from mmprm_infer.formats import FORMATS
from mmprm_infer.formats.internvl_base import INTERNVL25_CHAT_TEMPLATE, INTERNVL25_SYSTEM_MESSAGE
from mmprm_infer.formats.visualprm import VISUALPRM_SYSTEM_PROMPT
from mmprm_infer.io.files import remove_stale_temps, temp_name
from mmprm_infer.vision import IMAGENET_MEAN, IMAGENET_STD

LM_KINDS = {"InternLM2ForCausalLM": "internlm2", "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
# Strings the converted tokenizer must encode exactly as the source one (with --trust-remote-code).
TOKENIZER_PROBES = (
    "<|im_start|>system\n你是书生·万象，英文名是InternVL。<|im_end|>\n<|im_start|>user\n<|im_start|>assistant\n",
    "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nQuestion: What is 3 + 4?\nProcess: 3 + 4 = 7.<prm>So x = 7.<prm>",
    "### Question:\nFind the area of the triangle.\n\n### Solution Process:\nArea = 1/2 * 6 * 4 = 12.<|im_end|>\n"
    "<|im_start|>assistant\n+<|im_end|>\n",
    "  leading spaces, tabs\tand\n\nblank lines; \\boxed{12} Yes No + -",
)


class ConversionError(ValueError):
    """The source checkpoint cannot be converted; the message says why and what to do."""


@dataclass
class ConversionReport:
    dst: Path
    lm_kind: str
    tensors: int
    shards: int
    format: str | None
    tokenizer_verified: bool


# --------------------------------------------------------------------------- config


def read_source_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(f"{src} has no config.json; give the folder of the published InternVL checkpoint")
    config = json.loads(path.read_text())
    archs = config.get("architectures") or []
    if "InternVLChatModel" not in archs:
        raise ConversionError(
            f"{src}/config.json names architectures {archs}, not ['InternVLChatModel']: this is not InternVL's "
            "published layout (a transformers-native InternVL checkpoint needs no conversion)"
        )
    for key in ("llm_config", "vision_config"):
        if not isinstance(config.get(key), dict):
            raise ConversionError(f"{src}/config.json has no {key!r} section; is the checkpoint complete?")
    lm_arch = (config["llm_config"].get("architectures") or ["?"])[0]
    if lm_arch not in LM_KINDS:
        raise ConversionError(
            f"language model {lm_arch!r} is not supported; supported: {sorted(LM_KINDS)} (InternVL2.5 sizes use "
            "InternLM2 or Qwen2)"
        )
    if config.get("ps_version", "v2") != "v2":
        raise ConversionError(
            f"ps_version {config.get('ps_version')!r}: only InternVL's 'v2' pixel shuffle exists in transformers"
        )
    return config


def _rope_parameters(llm: dict) -> dict:
    params = {"rope_type": "default", "rope_theta": float(llm.get("rope_theta", 10000.0))}
    scaling = llm.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("linear", "dynamic"):
            raise ConversionError(f"rope_scaling type {kind!r} is not supported (InternLM2 has linear and dynamic)")
        params.update(rope_type=kind, factor=float(scaling["factor"]))
    return params


def text_config(llm: dict, lm_kind: str):
    from transformers import LlamaConfig, Qwen2Config  # transformers: heavy, loaded where used

    heads = llm["num_attention_heads"]
    common = dict(
        vocab_size=llm["vocab_size"],
        hidden_size=llm["hidden_size"],
        intermediate_size=llm["intermediate_size"],
        num_hidden_layers=llm["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=llm.get("num_key_value_heads") or heads,
        hidden_act=llm.get("hidden_act", "silu"),
        max_position_embeddings=llm.get("max_position_embeddings", 32768),
        rms_norm_eps=llm.get("rms_norm_eps", 1e-6),
        rope_parameters=_rope_parameters(llm),
        tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
        bos_token_id=llm.get("bos_token_id"),
        eos_token_id=llm.get("eos_token_id"),
        pad_token_id=llm.get("pad_token_id"),
        attention_dropout=0.0,
    )
    if lm_kind == "internlm2":
        if llm.get("hidden_act", "silu") != "silu":
            raise ConversionError(f"InternLM2 with hidden_act {llm.get('hidden_act')!r} is not supported")
        return LlamaConfig(**common, attention_bias=bool(llm.get("bias", False)), mlp_bias=False,
                           head_dim=llm["hidden_size"] // heads)
    if lm_kind == "llama":
        return LlamaConfig(**common, attention_bias=bool(llm.get("attention_bias", False)),
                           mlp_bias=bool(llm.get("mlp_bias", False)),
                           head_dim=llm.get("head_dim") or llm["hidden_size"] // heads)
    return Qwen2Config(
        **common,
        use_sliding_window=bool(llm.get("use_sliding_window", False)),
        sliding_window=llm.get("sliding_window"),
        max_window_layers=llm.get("max_window_layers", llm["num_hidden_layers"]),
    )


def vision_config(config: dict):
    from transformers import InternVLVisionConfig  # transformers: heavy, loaded where used

    vis = config["vision_config"]
    eps = vis.get("layer_norm_eps", 1e-6)
    qk_norm = bool(vis.get("qk_normalization", False))
    if qk_norm and abs(eps - 1e-6) > 1e-12:
        raise ConversionError(
            f"vision qk_normalization with layer_norm_eps={eps}: transformers' InternVL q/k norms use eps 1e-6"
        )
    if vis.get("norm_type", "layer_norm") not in ("layer_norm", "rms_norm"):
        raise ConversionError(f"vision norm_type {vis.get('norm_type')!r} is not supported")
    image_size = config.get("force_image_size") or vis.get("image_size", 448)
    return InternVLVisionConfig(
        hidden_size=vis["hidden_size"],
        intermediate_size=vis["intermediate_size"],
        num_attention_heads=vis["num_attention_heads"],
        num_hidden_layers=vis["num_hidden_layers"],
        hidden_act=vis.get("hidden_act", "gelu"),
        norm_type=vis.get("norm_type", "layer_norm"),
        layer_norm_eps=eps,
        attention_bias=bool(vis.get("qkv_bias", True)),
        use_qk_norm=qk_norm,
        image_size=image_size,
        patch_size=vis.get("patch_size", 14),
        num_channels=vis.get("num_channels", 3),
        use_absolute_position_embeddings=True,
        use_mean_pooling=True,  # InternViT has no final LayerNorm
        attention_dropout=0.0,
        projection_dropout=0.0,
        hidden_dropout_prob=0.0,
    )


def native_config(config: dict, image_token_id: int):
    from transformers import InternVLConfig  # transformers: heavy, loaded where used

    llm = config["llm_config"]
    lm_kind = LM_KINDS[llm["architectures"][0]]
    vis = vision_config(config)
    image_size = vis.image_size[0] if isinstance(vis.image_size, (list, tuple)) else vis.image_size
    patch = vis.patch_size[0] if isinstance(vis.patch_size, (list, tuple)) else vis.patch_size
    ratio = config.get("downsample_ratio", 0.5)
    tied = bool(llm.get("tie_word_embeddings", False))
    native = InternVLConfig(
        vision_config=vis,
        text_config=text_config(llm, lm_kind),
        image_token_id=image_token_id,
        image_seq_length=int((image_size // patch) ** 2 * ratio ** 2),
        downsample_ratio=ratio,
        projector_hidden_act="gelu",  # mlp1.2 is nn.GELU()
        vision_feature_layer=config.get("select_layer", -1),
        vision_feature_select_strategy="default",  # InternVL drops the CLS token
        tie_word_embeddings=tied,
    )
    native.architectures = ["InternVLForConditionalGeneration"]
    return native, lm_kind


# --------------------------------------------------------------------------- weights


def _vision_name(name: str) -> str:
    """vision_model.* / mlp1.* -> the saved names of InternVLForConditionalGeneration."""
    if name.startswith("mlp1."):
        index, rest = name[len("mlp1."):].split(".", 1)
        parts = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}
        if index not in parts:
            raise ConversionError(f"unexpected projector weight {name!r} (mlp1 has modules 0, 1, 3)")
        return f"multi_modal_projector.{parts[index]}.{rest}"
    rest = name[len("vision_model."):]
    rest = rest.replace("embeddings.class_embedding", "embeddings.cls_token")
    rest = rest.replace("embeddings.patch_embedding.", "embeddings.patch_embeddings.projection.")
    rest = rest.replace("embeddings.position_embedding", "embeddings.position_embeddings")
    rest = rest.replace("encoder.layers.", "encoder.layer.")
    for old, new in ((".ls1", ".lambda_1"), (".ls2", ".lambda_2"), (".norm1.", ".layernorm_before."),
                     (".norm2.", ".layernorm_after."), (".attn.proj.", ".attention.projection_layer."),
                     (".attn.", ".attention.")):
        rest = rest.replace(old, new)
    return "vision_tower." + rest


_INTERNLM2_RENAMES = (
    ("model.tok_embeddings.", "model.embed_tokens."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
)


def split_wqkv(tensor: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """InternLM2's fused, grouped wqkv (weight [rows, hidden] or bias [rows]) -> (q, k, v).

    Rows are [kv head][q_1 .. q_groups, k, v][head_dim]; query head j of the
    result is kv head j // groups's j % groups-th query, matching repeat_kv.
    """
    groups = num_heads // num_kv_heads
    rows = num_kv_heads * (groups + 2) * head_dim
    if tensor.shape[0] != rows:
        raise ConversionError(
            f"wqkv has {tensor.shape[0]} rows, expected {rows} = {num_kv_heads} kv heads x ({groups} + 2) x "
            f"{head_dim}; the llm_config does not match the weights"
        )
    grouped = tensor.reshape(num_kv_heads, groups + 2, head_dim, *tensor.shape[1:])
    q = grouped[:, :groups].reshape(num_heads * head_dim, *tensor.shape[1:])
    k = grouped[:, -2].reshape(num_kv_heads * head_dim, *tensor.shape[1:])
    v = grouped[:, -1].reshape(num_kv_heads * head_dim, *tensor.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def convert_tensor(name: str, tensor: torch.Tensor, lm_kind: str, llm: dict) -> list[tuple[str, torch.Tensor]]:
    """One published tensor -> its native name(s) and tensor(s) (saved-checkpoint names)."""
    if name.startswith("vision_model."):
        if ".attn.qkv." in name:
            dim = tensor.shape[0] // 3
            base = _vision_name(name)
            return [(base.replace(".attention.qkv.", f".attention.{p}_proj."),
                     tensor[i * dim:(i + 1) * dim].contiguous())
                    for i, p in enumerate("qkv")]
        return [(_vision_name(name), tensor)]
    if name.startswith("mlp1."):
        return [(_vision_name(name), tensor)]
    if not name.startswith("language_model."):
        raise ConversionError(f"unexpected weight {name!r} (expected vision_model.*, mlp1.* or language_model.*)")
    if lm_kind != "internlm2":
        return [(name, tensor)]  # Qwen2/Llama: already language_model.model.* / language_model.lm_head.*
    if name == "language_model.output.weight":
        return [("language_model.lm_head.weight", tensor)]
    if ".attention.wqkv." in name:
        heads = llm["num_attention_heads"]
        q, k, v = split_wqkv(tensor, heads, llm.get("num_key_value_heads") or heads, llm["hidden_size"] // heads)
        base = name.replace(".attention.wqkv.", ".self_attn.{}_proj.")
        return [(base.format("q"), q), (base.format("k"), k), (base.format("v"), v)]
    for old, new in _INTERNLM2_RENAMES:
        name = name.replace(old, new)
    return [(name, tensor)]


def source_shards(src: Path) -> list[Path]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = src / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [f for f in files if not (src / f).is_file()]
            if missing:
                raise ConversionError(f"{src} lacks weight shard(s) {missing} named in {index_name}")
            return [src / f for f in files]
        if (src / single).is_file():
            return [src / single]
    raise ConversionError(f"{src} holds no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")


def iter_tensors(shard: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one shard; a truncated or damaged shard is a ConversionError naming it."""
    def damaged(exc: Exception) -> ConversionError:
        cause = (str(exc).strip().splitlines() or [""])[0][:200]
        return ConversionError(f"weight shard {shard} cannot be read ({type(exc).__name__}: {cause}); it is "
                               "truncated or damaged: download it again")

    if shard.suffix == ".safetensors":
        try:
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except ConversionError:
            raise
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, MemoryError of a damaged header
            raise damaged(exc) from None
    else:
        try:
            state = torch.load(shard, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError
            raise damaged(exc) from None
        for key in list(state):
            yield key, state.pop(key)


def _saved_name(runtime_name: str) -> str:
    """Runtime parameter name of InternVLForConditionalGeneration -> the name save_pretrained writes."""
    for old, new in (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                     ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("lm_head.", "language_model.lm_head.")):
        if runtime_name.startswith(old):
            return new + runtime_name[len(old):]
    return runtime_name


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    from transformers import InternVLForConditionalGeneration  # transformers: heavy, loaded where used

    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    shapes = {_saved_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("language_model.lm_head.weight", None)
    return shapes


# --------------------------------------------------------------------------- tokenizer


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


def convert_tokenizer(src: Path, dst: Path, trust_remote_code: bool, log: Callable[[str], None],
                      tokenizer_json: Path | None = None):
    """A tokenizers-backed tokenizer in DST that needs no remote code; verified against the
    source's own slow tokenizer when ``trust_remote_code`` allows loading it.

    The vocabulary comes from ``tokenizer_json``, else SRC/tokenizer.json, else the
    source tokenizer loaded as a fast one (sentencepiece checkpoints need
    sentencepiece + protobuf, and for InternLM2 its remote tokenizer code)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # transformers: heavy, loaded where used

    config_file = src / "tokenizer_config.json"
    tcfg = json.loads(config_file.read_text()) if config_file.is_file() else {}
    kwargs = {k: _token_text(tcfg[k]) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if tcfg.get(k)}
    kwargs["add_bos_token"] = bool(tcfg.get("add_bos_token", False))
    kwargs["add_eos_token"] = bool(tcfg.get("add_eos_token", False))
    if tcfg.get("model_max_length"):
        kwargs["model_max_length"] = tcfg["model_max_length"]
    kwargs["chat_template"] = tcfg.get("chat_template") or INTERNVL25_CHAT_TEMPLATE
    kwargs.update(start_image_token="<img>", end_image_token="</img>", context_image_token=IMG_CONTEXT_TOKEN)
    json_file = Path(tokenizer_json) if tokenizer_json is not None else src / "tokenizer.json"
    if tokenizer_json is not None and not json_file.is_file():
        raise ConversionError(f"tokenizer file {json_file} does not exist")
    if json_file.is_file():
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(json_file), **kwargs)
    else:
        try:
            loaded = AutoTokenizer.from_pretrained(str(src), trust_remote_code=trust_remote_code, use_fast=True)
            backend = loaded.backend_tokenizer
        except Exception as exc:
            raise ConversionError(
                f"{src} has no tokenizer.json, and its tokenizer could not be loaded as a fast tokenizer ({exc}); "
                "install sentencepiece and protobuf and pass --trust-remote-code so the checkpoint's own "
                "tokenizer (e.g. InternLM2TokenizerFast) can be converted"
            ) from exc
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    if tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN) in (None, tokenizer.unk_token_id):
        raise ConversionError(
            f"the tokenizer in {src} has no {IMG_CONTEXT_TOKEN} token; is this an InternVL checkpoint?"
        )
    verified = False
    if trust_remote_code:
        reference = AutoTokenizer.from_pretrained(str(src), trust_remote_code=True, use_fast=False)
        for probe in TOKENIZER_PROBES:
            want, got = reference(probe).input_ids, tokenizer(probe).input_ids
            if want != got:
                raise ConversionError(
                    f"the converted tokenizer encodes {probe!r} as {got[:40]}..., the checkpoint's own tokenizer as "
                    f"{want[:40]}...; give --tokenizer-json with a matching tokenizer.json"
                )
        verified = True
        log(f"tokenizer: matches the checkpoint's own slow tokenizer on {len(TOKENIZER_PROBES)} probes")
    else:
        log(f"tokenizer: built from {json_file.name if json_file.is_file() else 'the source tokenizer'}, not "
            "compared with the checkpoint's own tokenizer (pass --trust-remote-code to compare)")
    tokenizer.save_pretrained(str(dst))
    return tokenizer, verified


# --------------------------------------------------------------------------- format


def _detect_format(config: dict, tokenizer, src: Path) -> str | None:
    names = (str(config.get("_name_or_path", "")) + " " + src.resolve().name).lower()
    if "process supervision" in str(config.get("system_message", "")) or "visualprm" in names:
        return "visualprm"
    if "<prm>" in tokenizer.get_vocab():
        return "mm-prm"
    return None


def _format_options(name: str | None, config: dict, log) -> dict:
    """Options that make the format read the checkpoint as its release code does."""

    if name != "visualprm":
        return {}  # MM-PRM's batch_prm always uses the template's default system message
    # VisualPRM's InternVLChatModel.__init__: self.system_message = config.system_message if set (truthy),
    # else the template's default; generate_steps_with_soft_score_v2 renders with self.system_message.
    system = config.get("system_message") or INTERNVL25_SYSTEM_MESSAGE
    if system == VISUALPRM_SYSTEM_PROMPT:
        return {}
    log("visualprm: the checkpoint's system message (config.system_message, or the internvl2_5 default when "
        "unset) differs from VisualPRM's training PRM_SYSTEM_PROMPT; scoring uses it, as the release code does")
    return {"system_prompt": system}


# --------------------------------------------------------------------------- main


def convert_internvl(src, dst, *, dtype: str | torch.dtype | None = None, format: str | None = None,
                     trust_remote_code: bool = False, tokenizer_json=None, overwrite: bool = False,
                     log: Callable[[str], None] = print) -> ConversionReport:
    """Convert a published InternVLChatModel checkpoint in ``src`` to a native one in ``dst``."""
    from mmprm_infer.loading import resolve_dtype  # lazy: it imports transformers, sympy, accelerate

    src, final = Path(src), Path(dst)
    check_apart(src, final, "SRC", "DST")
    config = read_source_config(src)
    if final.exists() and not final.is_dir():
        raise ConversionError(f"DST {final} is a file; give a folder")
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise ConversionError(f"{final} exists and is not empty; pass --overwrite or pick a new folder")
    if format is not None and format not in FORMATS:
        raise ConversionError(f"unknown PRM format {format!r}; choose one of {sorted(FORMATS)}")
    out_dtype = resolve_dtype(dtype, torch.device("cpu")) if dtype is not None else None
    # Written into a temp sibling, swapped in only when complete: a failure (a truncated shard, a full disk,
    # Ctrl-C) leaves DST as it was; --overwrite replaces it only then.
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final.resolve(), remove=shutil.rmtree)
    dst = temp_name(final.resolve())
    dst.mkdir()
    try:
        report = _convert_into(src, dst, config, out_dtype, format, trust_remote_code, tokenizer_json, log)
        _swap_in(dst, final)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise
    log(f"converted {src} ({report.lm_kind} language model) -> {final}; format: "
        f"{report.format or 'not detected (pass format=)'}")
    report.dst = final
    return report


def check_apart(src: Path, dst: Path, src_name: str, dst_name: str) -> None:
    """ConversionError when ``dst`` is ``src``, contains it or lies inside it (after links): replacing DST
    would delete the source, or the source's folder would hold the output."""
    a, b = src.resolve(), dst.resolve()
    if a == b or a in b.parents or b in a.parents:
        how = "is" if a == b else "lies inside" if a in b.parents else "contains"
        raise ConversionError(f"{dst_name} {dst} {how} {src_name} {src}; writing (or --overwrite replacing) it "
                              f"would destroy the source: choose a {dst_name} folder outside {src_name} and not "
                              "around it")


def _swap_in(new: Path, final: Path) -> None:
    """``new`` renamed onto ``final``; a previous ``final`` is moved aside first and removed after."""
    if not final.exists():
        new.rename(final)
        return
    old = temp_name(final.resolve(), "old")
    final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _convert_into(src: Path, dst: Path, config: dict, out_dtype, format: str | None, trust_remote_code: bool,
                  tokenizer_json, log: Callable[[str], None]) -> ConversionReport:
    """The conversion proper, into the empty folder ``dst``."""
    # looked up when called, as before: tests spy on safetensors.torch.save_file
    from safetensors.torch import save_file

    from mmprm_infer.loading import FORMAT_KEY, FORMAT_OPTIONS_KEY  # lazy: it imports transformers, sympy, accelerate

    tokenizer, verified = convert_tokenizer(src, dst, trust_remote_code, log, tokenizer_json)
    image_token_id = int(tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN))
    native, lm_kind = native_config(config, image_token_id)
    llm = config["llm_config"]

    expected = expected_shapes(native)
    shards = source_shards(src)
    weight_map: dict[str, str] = {}
    total_size = 0
    source_dtype = None
    for i, shard in enumerate(shards, 1):
        out_name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        converted: dict[str, torch.Tensor] = {}
        for name, tensor in iter_tensors(shard):
            if source_dtype is None and tensor.is_floating_point():
                source_dtype = tensor.dtype
            for new_name, new_tensor in convert_tensor(name, tensor, lm_kind, llm):
                if new_name not in expected:
                    raise ConversionError(
                        f"{shard.name}: {name!r} -> {new_name!r}, which the native model does not have"
                    )
                if tuple(new_tensor.shape) != expected[new_name]:
                    raise ConversionError(f"{shard.name}: {name!r} has shape {tuple(new_tensor.shape)}, the native "
                                          f"{new_name!r} needs {expected[new_name]}")
                if new_name in weight_map or new_name in converted:
                    raise ConversionError(f"{new_name!r} appears twice in the source weights")
                if out_dtype is not None and new_tensor.is_floating_point():
                    new_tensor = new_tensor.to(out_dtype)
                converted[new_name] = new_tensor.contiguous()
        save_file(converted, str(dst / out_name), metadata={"format": "pt"})
        for key, tensor in converted.items():
            weight_map[key] = out_name
            total_size += tensor.numel() * tensor.element_size()
        log(f"weights: {shard.name} -> {out_name} ({len(converted)} tensors)")
        del converted
    missing = sorted(set(expected) - set(weight_map))
    if missing:
        raise ConversionError(f"the source lacks {len(missing)} weight(s) the native model needs, e.g. {missing[:5]}")
    if len(shards) > 1:
        (dst / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))

    format_name = format or _detect_format(config, tokenizer, src)
    saved = native.to_dict()
    saved["dtype"] = str(out_dtype or source_dtype or torch.float32).replace("torch.", "")
    saved.update(
        internvl_template=config.get("template"),
        use_thumbnail=bool(config.get("use_thumbnail", True)),
        max_dynamic_patch=config.get("max_dynamic_patch"),
        mmprm_converted_from="InternVLChatModel",
    )
    if "system_message" in config:
        saved["internvl_system_message"] = config["system_message"]
    if config.get("template") not in (None, "internvl2_5"):
        log(f"warning: conversation template {config.get('template')!r}; the mm-prm/visualprm formats render "
            "'internvl2_5'")
    if format_name is not None:
        saved[FORMAT_KEY] = format_name
        saved[FORMAT_OPTIONS_KEY] = _format_options(format_name, config, log)
    (dst / "config.json").write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n")
    _write_image_processor(dst, native, config)
    return ConversionReport(dst, lm_kind, len(weight_map), len(shards), format_name, verified)


def _write_image_processor(dst: Path, native, config: dict) -> None:
    from transformers import GotOcr2ImageProcessorPil  # transformers: heavy, loaded where used

    size = native.vision_config.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    GotOcr2ImageProcessorPil(
        size={"height": size, "width": size},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        crop_to_patches=bool(config.get("dynamic_image_size", True)),
        min_patches=config.get("min_dynamic_patch", 1),
        max_patches=config.get("max_dynamic_patch", 12),
    ).save_pretrained(str(dst))


__all__ = ["convert_internvl", "ConversionError", "ConversionReport", "split_wqkv", "convert_tensor"]
