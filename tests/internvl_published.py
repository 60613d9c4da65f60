"""Tiny checkpoints in InternVL's PUBLISHED layout, and their forward in plain torch.

``write_published_internvl`` writes what MM-PRM-8B / VisualPRM-8B look like on
disk (``InternVLChatModel``: config.json with llm_config / vision_config,
``vision_model.*`` InternViT, ``mlp1.{0,1,3}``, ``language_model.*`` as
InternLM2 or Qwen2), with random weights, split into two safetensors shards.

``published_logits`` is the independent oracle for the converter: InternVL's
forward restated from its own modeling code (``modeling_intern_vit.py``,
``InternVLChatModel.extract_feature`` / ``pixel_shuffle`` (ps_version v2),
``modeling_internlm2.py``) on the raw published tensors.  It shares no code
with transformers' InternVL or the converter.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast

from mmprm_infer.testing.tiny_internvl import INTERNVL25_CHAT_TEMPLATE, build_tokenizer

VISUALPRM_SYSTEM = "You are an advanced AI assistant, designed to serve as a process supervision model."


def _tokenizer(lm: str):
    """The published tokenizer stand-in: InternLM2's adds a BOS ``<s>`` (add_bos_token), Qwen2's none."""
    extras = ("<prm>", "<s>", "</s>", "<unk>") if lm == "internlm2" else ("<prm>",)
    return build_tokenizer(extras)


def source_tokenizer(path: Path):
    """What the release's ``AutoTokenizer(..., trust_remote_code=True)`` gives, for these tiny files."""
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    kwargs = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if cfg.get(k)}
    return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"),
                                   add_bos_token=cfg.get("add_bos_token", False), **kwargs)


def write_published_internvl(path: Path, lm: str = "internlm2", *, seed: int = 0, vision_layers: int = 2,
                             qk_norm: bool = False, system_message: str | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(lm)
    vocab = len(tok) + 6  # padded rows, as real checkpoints have
    C, Ci, vh = 32, 64, 2  # vision hidden, intermediate, heads
    H, I, nh, nkv = 64, 128, 4, 2  # text hidden, intermediate, heads, kv heads
    d = H // nh
    layers = 2
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=None):
        fan_in = shape[-1] if len(shape) > 1 else 1
        return torch.randn(*shape, generator=g) * (std if std is not None else 1 / math.sqrt(fan_in))

    def norm_w(n):
        return 1 + 0.1 * torch.randn(n, generator=g)

    w: dict[str, torch.Tensor] = {}
    v = "vision_model."
    w[v + "embeddings.class_embedding"] = rnd(1, 1, C, std=0.5)
    w[v + "embeddings.patch_embedding.weight"] = rnd(C, 3, 14, 14, std=0.02)
    w[v + "embeddings.patch_embedding.bias"] = rnd(C, std=0.1)
    w[v + "embeddings.position_embedding"] = rnd(1, 32 * 32 + 1, C, std=0.5)
    for i in range(vision_layers):
        p = f"{v}encoder.layers.{i}."
        w[p + "attn.qkv.weight"] = rnd(3 * C, C)
        w[p + "attn.qkv.bias"] = rnd(3 * C, std=0.1)
        if qk_norm:
            w[p + "attn.q_norm.weight"] = norm_w(C)
            w[p + "attn.k_norm.weight"] = norm_w(C)
        w[p + "attn.proj.weight"] = rnd(C, C)
        w[p + "attn.proj.bias"] = rnd(C, std=0.1)
        w[p + "ls1"] = 0.5 + 0.1 * torch.randn(C, generator=g)
        w[p + "ls2"] = 0.5 + 0.1 * torch.randn(C, generator=g)
        for n in ("norm1", "norm2"):
            w[p + n + ".weight"] = norm_w(C)
            w[p + n + ".bias"] = rnd(C, std=0.1)
        w[p + "mlp.fc1.weight"] = rnd(Ci, C)
        w[p + "mlp.fc1.bias"] = rnd(Ci, std=0.1)
        w[p + "mlp.fc2.weight"] = rnd(C, Ci)
        w[p + "mlp.fc2.bias"] = rnd(C, std=0.1)
    w["mlp1.0.weight"] = norm_w(4 * C)
    w["mlp1.0.bias"] = rnd(4 * C, std=0.1)
    w["mlp1.1.weight"] = rnd(H, 4 * C)
    w["mlp1.1.bias"] = rnd(H, std=0.1)
    w["mlp1.3.weight"] = rnd(H, H)
    w["mlp1.3.bias"] = rnd(H, std=0.1)

    lmw = "language_model."
    if lm == "internlm2":
        w[lmw + "model.tok_embeddings.weight"] = rnd(vocab, H, std=1.0)
        for i in range(layers):
            p = f"{lmw}model.layers.{i}."
            w[p + "attention.wqkv.weight"] = rnd((nh + 2 * nkv) * d, H)
            w[p + "attention.wo.weight"] = rnd(H, nh * d)
            w[p + "feed_forward.w1.weight"] = rnd(I, H)
            w[p + "feed_forward.w3.weight"] = rnd(I, H)
            w[p + "feed_forward.w2.weight"] = rnd(H, I)
            w[p + "attention_norm.weight"] = norm_w(H)
            w[p + "ffn_norm.weight"] = norm_w(H)
        w[lmw + "model.norm.weight"] = norm_w(H)
        w[lmw + "output.weight"] = rnd(vocab, H, std=0.5)
        llm_config = {
            "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
            "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                         "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
            "bias": False, "rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_theta": 1000000,
            "bos_token_id": tok.convert_tokens_to_ids("<s>"), "eos_token_id": tok.convert_tokens_to_ids("</s>"),
            "pad_token_id": tok.convert_tokens_to_ids("</s>"),
        }
    else:
        w[lmw + "model.embed_tokens.weight"] = rnd(vocab, H, std=1.0)
        for i in range(layers):
            p = f"{lmw}model.layers.{i}."
            for name, rows in (("q", nh * d), ("k", nkv * d), ("v", nkv * d)):
                w[p + f"self_attn.{name}_proj.weight"] = rnd(rows, H)
                w[p + f"self_attn.{name}_proj.bias"] = rnd(rows, std=0.1)
            w[p + "self_attn.o_proj.weight"] = rnd(H, nh * d)
            w[p + "mlp.gate_proj.weight"] = rnd(I, H)
            w[p + "mlp.up_proj.weight"] = rnd(I, H)
            w[p + "mlp.down_proj.weight"] = rnd(H, I)
            w[p + "input_layernorm.weight"] = norm_w(H)
            w[p + "post_attention_layernorm.weight"] = norm_w(H)
        w[lmw + "model.norm.weight"] = norm_w(H)
        w[lmw + "lm_head.weight"] = rnd(vocab, H, std=0.5)
        llm_config = {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": 1000000.0,
            "rope_scaling": None, "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 70,
            "bos_token_id": None, "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
        }
    llm_config.update({
        "hidden_size": H, "intermediate_size": I, "num_attention_heads": nh, "num_key_value_heads": nkv,
        "num_hidden_layers": layers, "rms_norm_eps": 1e-5, "max_position_embeddings": 32768,
        "vocab_size": vocab, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
        "attn_implementation": "eager",
    })
    config = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "downsample_ratio": 0.5, "dynamic_image_size": True, "force_image_size": 448, "max_dynamic_patch": 12,
        "min_dynamic_patch": 1, "ps_version": "v2", "select_layer": -1, "template": "internvl2_5",
        "use_thumbnail": True, "use_backbone_lora": 0, "use_llm_lora": 0, "torch_dtype": "float32",
        "llm_config": llm_config,
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": C,
            "intermediate_size": Ci, "num_attention_heads": vh, "num_hidden_layers": vision_layers,
            "image_size": 448, "patch_size": 14, "num_channels": 3, "qkv_bias": True,
            "qk_normalization": qk_norm, "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu",
            "use_flash_attn": False, "drop_path_rate": 0.0, "dropout": 0.0, "attention_dropout": 0.0,
            "initializer_factor": 0.1, "torch_dtype": "float32",
        },
    }
    if system_message is not None:
        config["system_message"] = system_message
    (path / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    # Two shards, split so that one shard holds vision and LM weights alike.
    keys = sorted(w)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, part in halves.items():
        save_file({k: w[k].contiguous() for k in part}, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    tok.backend_tokenizer.save(str(path / "tokenizer.json"))
    if lm == "internlm2":
        tcfg = {"tokenizer_class": "InternLM2Tokenizer", "bos_token": "<s>", "eos_token": "</s>",
                "unk_token": "<unk>", "pad_token": "</s>", "add_bos_token": True, "add_eos_token": False,
                "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                               "tokenization_internlm2_fast.InternLM2TokenizerFast"]}}
    else:
        tcfg = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                "add_bos_token": False}
    tcfg.update(model_max_length=16384, chat_template=INTERNVL25_CHAT_TEMPLATE)
    (path / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False))
    return path


# ------------------------------------------------------------------ the oracle


class _Weights:
    def __init__(self, path: Path):
        index = json.loads((path / "model.safetensors.index.json").read_text())
        self.t: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            self.t.update(load_file(str(path / shard)))
        self.config = json.loads((path / "config.json").read_text())

    def __getitem__(self, key):
        return self.t[key]


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _gelu(x):  # nn.GELU(), exact erf form
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _intern_vit(W: _Weights, pixel_values: torch.Tensor) -> torch.Tensor:
    vc = W.config["vision_config"]
    C, heads, eps = vc["hidden_size"], vc["num_attention_heads"], vc["layer_norm_eps"]
    p = "vision_model."
    x = F.conv2d(pixel_values, W[p + "embeddings.patch_embedding.weight"], W[p + "embeddings.patch_embedding.bias"],
                 stride=vc["patch_size"])
    n, _, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([W[p + "embeddings.class_embedding"].expand(n, 1, C), x], dim=1)
    pos = W[p + "embeddings.position_embedding"]
    side = vc["image_size"] // vc["patch_size"]
    grid = pos[:, 1:].reshape(1, side, side, C).permute(0, 3, 1, 2)
    grid = (F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
            .reshape(1, C, gh * gw).permute(0, 2, 1))
    x = x + torch.cat([pos[:, :1], grid], dim=1)
    hd = C // heads
    for i in range(vc["num_hidden_layers"]):
        q_ = f"{p}encoder.layers.{i}."
        h = _layer_norm(x, W[q_ + "norm1.weight"], W[q_ + "norm1.bias"], eps)
        qkv = ((h @ W[q_ + "attn.qkv.weight"].T + W[q_ + "attn.qkv.bias"])
               .reshape(n, -1, 3, heads, hd).permute(2, 0, 3, 1, 4))
        q, k, v = qkv[0], qkv[1], qkv[2]
        if vc.get("qk_normalization"):
            q = (_rms_norm(q.transpose(1, 2).flatten(-2), W[q_ + "attn.q_norm.weight"], eps)
                 .view(n, -1, heads, hd).transpose(1, 2))
            k = (_rms_norm(k.transpose(1, 2).flatten(-2), W[q_ + "attn.k_norm.weight"], eps)
                 .view(n, -1, heads, hd).transpose(1, 2))
        attn = ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(n, -1, C)
        x = x + (out @ W[q_ + "attn.proj.weight"].T + W[q_ + "attn.proj.bias"]) * W[q_ + "ls1"]
        h = _layer_norm(x, W[q_ + "norm2.weight"], W[q_ + "norm2.bias"], eps)
        h = (_gelu(h @ W[q_ + "mlp.fc1.weight"].T + W[q_ + "mlp.fc1.bias"]) @ W[q_ + "mlp.fc2.weight"].T
             + W[q_ + "mlp.fc2.bias"])
        x = x + h * W[q_ + "ls2"]
    return x


def image_features(W: _Weights, pixel_values: torch.Tensor) -> torch.Tensor:
    """extract_feature: ViT last layer, drop CLS, pixel shuffle v2 (0.5), mlp1."""
    x = _intern_vit(W, pixel_values)[:, 1:]
    n, tokens, c = x.shape
    s = int(tokens ** 0.5)
    x = x.reshape(n, s, s, c)
    r = W.config["downsample_ratio"]
    x = x.view(n, s, int(s * r), int(c / r)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(s * r), int(s * r), int(c / (r * r))).permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, -1, x.shape[-1])
    x = _layer_norm(x, W["mlp1.0.weight"], W["mlp1.0.bias"], 1e-5)  # nn.LayerNorm default eps
    x = _gelu(x @ W["mlp1.1.weight"].T + W["mlp1.1.bias"])
    return x @ W["mlp1.3.weight"].T + W["mlp1.3.bias"]


def _rope(q, k, theta, d):
    t = torch.arange(q.shape[-2], dtype=torch.float32)
    inv = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat([torch.outer(t, inv)] * 2, dim=-1)
    cos, sin = emb.cos(), emb.sin()

    def rot(x):
        return torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def _decoder(W: _Weights, embeds: torch.Tensor) -> torch.Tensor:
    lc = W.config["llm_config"]
    H, nh, nkv, eps = lc["hidden_size"], lc["num_attention_heads"], lc["num_key_value_heads"], lc["rms_norm_eps"]
    d, g, T = H // nh, nh // nkv, embeds.shape[0]
    internlm2 = lc["architectures"][0] == "InternLM2ForCausalLM"
    mask = torch.full((T, T), float("-inf")).triu(1)
    h = embeds
    for i in range(lc["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        if internlm2:
            x = _rms_norm(h, W[p + "attention_norm.weight"], eps)
            qkv = (x @ W[p + "attention.wqkv.weight"].T).view(T, nkv, g + 2, d)
            q = qkv[:, :, :g].reshape(T, nh, d)
            k, v = qkv[:, :, -2], qkv[:, :, -1]
        else:
            x = _rms_norm(h, W[p + "input_layernorm.weight"], eps)
            q = (x @ W[p + "self_attn.q_proj.weight"].T + W[p + "self_attn.q_proj.bias"]).view(T, nh, d)
            k = (x @ W[p + "self_attn.k_proj.weight"].T + W[p + "self_attn.k_proj.bias"]).view(T, nkv, d)
            v = (x @ W[p + "self_attn.v_proj.weight"].T + W[p + "self_attn.v_proj.bias"]).view(T, nkv, d)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        q, k = _rope(q, k, float(lc["rope_theta"]), d)
        k, v = k.repeat_interleave(g, dim=0), v.repeat_interleave(g, dim=0)  # repeat_kv
        attn = ((q @ k.transpose(-2, -1)) / math.sqrt(d) + mask).softmax(-1)
        out = (attn @ v).transpose(0, 1).reshape(T, nh * d)
        h = h + out @ W[p + ("attention.wo.weight" if internlm2 else "self_attn.o_proj.weight")].T
        if internlm2:
            x = _rms_norm(h, W[p + "ffn_norm.weight"], eps)
            mlp = ((F.silu(x @ W[p + "feed_forward.w1.weight"].T) * (x @ W[p + "feed_forward.w3.weight"].T))
                   @ W[p + "feed_forward.w2.weight"].T)
        else:
            x = _rms_norm(h, W[p + "post_attention_layernorm.weight"], eps)
            mlp = ((F.silu(x @ W[p + "mlp.gate_proj.weight"].T) * (x @ W[p + "mlp.up_proj.weight"].T))
                   @ W[p + "mlp.down_proj.weight"].T)
        h = h + mlp
    h = _rms_norm(h, W["language_model.model.norm.weight"], eps)
    return h @ W["language_model.output.weight" if internlm2 else "language_model.lm_head.weight"].T


@torch.no_grad()
def published_logits(
    path: Path, input_ids: list[int], pixel_values: torch.Tensor | None, img_context_id: int
) -> torch.Tensor:
    """InternVLChatModel.forward(pixel_values, input_ids).logits[0] from the raw published tensors."""
    W = _Weights(Path(path))
    internlm2 = W.config["llm_config"]["architectures"][0] == "InternLM2ForCausalLM"
    table = W["language_model.model.tok_embeddings.weight" if internlm2 else "language_model.model.embed_tokens.weight"]
    ids = torch.tensor(input_ids)
    embeds = table[ids].clone()
    if pixel_values is not None:
        feats = image_features(W, pixel_values).reshape(-1, table.shape[1])
        selected = ids == img_context_id
        assert int(selected.sum()) == feats.shape[0], (int(selected.sum()), feats.shape)
        embeds[selected] = embeds[selected] * 0.0 + feats
    return _decoder(W, embeds)
