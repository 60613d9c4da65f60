"""Known decoder layers (Llama, Qwen2, Mistral) as a few fused steps over the packed rows.

transformers' modules run a layer as a dozen separate ops on [1, T, E]
tensors: three projections, RoPE through ``rotate_half`` (two copies per
call), an MLP with two more projections, residual adds, casts.  While
``FusedDecoder.active()`` is on, every prunable layer (``last_layer.prunable``)
runs this instead, on x [T, E]:

    h = rms_norm(x)
    q, k, v = h @ W_qkv + b          one GEMM for the three projections
    RoPE on q and k, in place        their columns are adjacent in that output
    a = shared-prefix attention      the forward's plan (``shared_prefix``)
    x = x + a @ W_o                  the residual add inside the GEMM
    h = rms_norm(x)
    g, u = h @ W_gate_up             one GEMM
    x = x + (act(g) * u) @ W_down    the residual add inside the GEMM

on the CPU's fastest GEMM path (``linear_paths``: torch's, or oneDNN with the
fused weights packed once) and in the engine's compute dtype (a bf16 model
runs in fp32 where the CPU has no bf16 units).  The last layer computes its
queries, attention, MLP and output for the layout's ``rows`` alone (see
``last_layer``).  Layers are still called as modules, so hooks and the
decoder's own forward (embeddings, RoPE tables, final norm) stay as they are.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import nn

from mmprm_infer.engines.last_layer import prunable
from mmprm_infer.engines.linear_paths import pack_weight, packed_linear, packed_linear_add
from mmprm_infer.engines.shared_prefix import LAYOUT_KWARG, PackedLayout, attend_packed, attend_rows


@overload
def _cat(tensors: list[torch.Tensor], dtype) -> torch.Tensor: ...
@overload
def _cat(tensors: list[torch.Tensor | None], dtype) -> torch.Tensor | None: ...
def _cat(tensors, dtype):
    return None if any(t is None for t in tensors) else torch.cat([t.detach() for t in tensors]).to(dtype)


class FusedLinear:
    """y = x @ W^T + b for x [T, in], W the rows of ``weights`` one after the other, computed in ``dtype``.

    copy=True: one GEMM on a concatenated copy (packed once for oneDNN on path "onednn").  copy=False
    (memory is short): the model's own weights, one GEMM per part into one output, cast per call where
    ``dtype`` differs; no second copy of the weights is kept."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], dtype: torch.dtype,
                 path: str, rows: int, copy: bool = True):
        self.dtype = dtype
        self.bias = _cat(biases, dtype)
        self.out_features = sum(w.shape[0] for w in weights)
        self.packed: Any = None  # pack_weight's handle, on path "onednn"
        self.weight_t: torch.Tensor | None = None
        self.parts: list[torch.Tensor] | None = None
        if copy and path == "onednn":
            self.packed = pack_weight(_cat(weights, dtype), rows)
        elif copy:
            self.weight_t = _cat(weights, dtype).t()
        elif len(weights) == 1 and weights[0].dtype == dtype:
            self.weight_t = weights[0].detach().t()  # a view: one part needs no concatenation
        else:
            self.parts = [w.detach() for w in weights]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:  # oneDNN rejects empty inputs
            return x.new_empty(0, self.out_features)
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias)
        if self.parts is not None:
            out, start = x.new_empty(x.shape[0], self.out_features), 0
            for w in self.parts:
                torch.mm(x, w.to(self.dtype).t(), out=out[:, start:start + w.shape[0]])
                start += w.shape[0]
            return out if self.bias is None else out.add_(self.bias)
        return torch.mm(x, self.weight_t) if self.bias is None else torch.addmm(self.bias, x, self.weight_t)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual + (x @ W^T + b), the add done by the GEMM itself where it can (a new tensor)."""
        if x.shape[0] == 0:
            return residual.clone()
        if self.packed is not None:
            return packed_linear_add(x, residual, self.packed, self.bias)
        if self.parts is not None:
            return self(x).add_(residual)
        out = torch.addmm(residual, x, self.weight_t)
        return out if self.bias is None else out.add_(self.bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm (Llama/Qwen2/Mistral): normalized in fp32, rounded to x's dtype, then scaled."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True).add_(eps))
    return h.to(x.dtype).mul_(weight)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x [T, heads, D] in place by cos/sin [T, D] (half-split RoPE, cos/sin repeated across halves)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :half], sin[:, None, :half]
    x1_sin = x1 * s
    x1.mul_(c).addcmul_(x2, s, value=-1)  # x1 cos - x2 sin
    x2.mul_(c).add_(x1_sin)  # x2 cos + x1 sin


@dataclass
class _Layer:
    """One decoder layer's weights, fused and in the compute dtype."""

    layer_idx: int
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    in_eps: float
    post_eps: float
    qkv: FusedLinear
    q: FusedLinear | None  # the last layer's rows-only path: queries at the rows, K/V for every row
    kv: FusedLinear | None
    o: FusedLinear
    gate_up: FusedLinear
    down: FusedLinear
    act: nn.Module
    intermediate: int


def _prepare(layer: nn.Module, last: bool, dtype: torch.dtype, path: str, rows: int, copy: bool) -> _Layer:
    attn, mlp = layer.self_attn, layer.mlp
    d = attn.head_dim
    heads = attn.q_proj.out_features // d
    kv_heads = attn.k_proj.out_features // d
    lin = [attn.q_proj, attn.k_proj, attn.v_proj]

    def fused(mods):
        return FusedLinear([m.weight for m in mods], [m.bias for m in mods], dtype, path, rows, copy)

    return _Layer(
        layer_idx=attn.layer_idx, heads=heads, kv_heads=kv_heads, head_dim=d, scale=attn.scaling,
        sliding_window=getattr(attn, "sliding_window", None),
        in_norm=layer.input_layernorm.weight.detach().to(dtype),
        post_norm=layer.post_attention_layernorm.weight.detach().to(dtype),
        in_eps=layer.input_layernorm.variance_epsilon, post_eps=layer.post_attention_layernorm.variance_epsilon,
        qkv=fused(lin), q=fused(lin[:1]) if last else None, kv=fused(lin[1:]) if last else None,
        o=fused([attn.o_proj]), gate_up=fused([mlp.gate_proj, mlp.up_proj]), down=fused([mlp.down_proj]),
        act=mlp.act_fn, intermediate=mlp.gate_proj.out_features,
    )


def _mlp_add(w: _Layer, x: torch.Tensor) -> torch.Tensor:
    """x + mlp(post_norm(x))."""
    gu = w.gate_up(rms_norm(x, w.post_norm, w.post_eps))
    g, u = gu[:, :w.intermediate], gu[:, w.intermediate:]
    g = F.silu(g, inplace=True) if type(w.act) is nn.SiLU else w.act(g)
    return w.down.add_to(x, torch.mul(g, u))


def layer_forward(w: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  layout: PackedLayout) -> torch.Tensor:
    """Every row: x [T, E] -> [T, E] (new tensor; x is not written)."""
    t = x.shape[0]
    qkv = w.qkv(rms_norm(x, w.in_norm, w.in_eps)).view(t, w.heads + 2 * w.kv_heads, w.head_dim)
    rope_(qkv[:, :w.heads + w.kv_heads], cos, sin)  # q and k heads are adjacent: one rotation
    q, k, v = qkv[:, :w.heads], qkv[:, w.heads:w.heads + w.kv_heads], qkv[:, w.heads + w.kv_heads:]
    a = attend_packed(w.layer_idx, q, k, v, layout, w.scale, w.sliding_window)
    return _mlp_add(w, w.o.add_to(x, a.reshape(t, w.heads * w.head_dim)))


def rows_layer_forward(w: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       layout: PackedLayout) -> torch.Tensor:
    """The last layer for ``layout.rows`` only: x [T, E] -> [M, E]; K/V still cover every row."""
    t = x.shape[0]
    rows = torch.tensor(layout.rows, dtype=torch.long, device=x.device)
    h = rms_norm(x, w.in_norm, w.in_eps)
    # the last layer's: q and kv are set
    kv = w.kv(h).view(t, 2 * w.kv_heads, w.head_dim)  # type: ignore[misc]
    rope_(kv[:, :w.kv_heads], cos, sin)
    q = w.q(h.index_select(0, rows)).view(len(rows), w.heads, w.head_dim)  # type: ignore[misc]
    rope_(q, cos.index_select(0, rows), sin.index_select(0, rows))
    a = attend_rows(w.layer_idx, q, kv[:, :w.kv_heads], kv[:, w.kv_heads:], layout, w.scale, w.sliding_window)
    y = w.o.add_to(x.index_select(0, rows), a.reshape(len(rows), w.heads * w.head_dim))
    return _mlp_add(w, y)


def available_bytes(device: torch.device) -> int:
    """Memory free for new tensors on ``device`` (CUDA: the driver's count; CPU: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class FusedDecoder:
    """A decoder whose layers are all prunable, prepared for the fused path once (re-prepared when a
    weight tensor is replaced or written in place).  Where a second copy of the layers' weights fits in
    half the free memory, they are fused, cast to ``dtype`` and (path "onednn") packed for ``rows`` tokens
    per call; otherwise the layers compute on the model's own weights, projection by projection, on
    torch's GEMMs (a 7B model in bf16 on a 24 GiB machine: no room for a copy)."""

    COPY_SHARE = 0.5  # of the free memory a fused copy of the weights may take

    def __init__(self, decoder: nn.Module, dtype: torch.dtype, path: str, rows: int):
        self.decoder = decoder
        self.dtype = dtype
        self.rows = rows
        self.layers = list(decoder.layers[: decoder.config.num_hidden_layers])
        weights = [m.weight for layer in self.layers for m in layer.modules() if isinstance(m, nn.Linear)]
        copy_bytes = sum(w.numel() for w in weights) * torch.finfo(dtype).bits // 8
        self.copies = copy_bytes <= self.COPY_SHARE * available_bytes(weights[0].device)
        self.path = path if self.copies else "torch"
        self._stamp: tuple | None = None
        self._prepared: list[_Layer] = []

    @staticmethod
    def supports(decoder: nn.Module) -> bool:
        layers = getattr(decoder, "layers", None)
        # bool(layers) first: not None here
        return bool(layers) and all(prunable(layer) for layer in layers[: decoder.config.num_hidden_layers])  # type: ignore[index]

    def _weights_stamp(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for layer in self.layers for p in layer.parameters())

    def prepared(self) -> list[_Layer]:
        stamp = self._weights_stamp()
        if stamp != self._stamp:
            last = len(self.layers) - 1
            with torch.inference_mode():
                self._prepared = [_prepare(layer, i == last, self.dtype, self.path, self.rows, self.copies)
                                  for i, layer in enumerate(self.layers)]
            self._stamp = stamp
        return self._prepared

    def _forward_of(self, w: _Layer, original, last: bool):
        model_dtype = self.layers[0].input_layernorm.weight.dtype

        def forward(hidden_states, *args, **kwargs):
            layout: PackedLayout | None = kwargs.get(LAYOUT_KWARG)
            embeddings = kwargs.get("position_embeddings")
            if layout is None or embeddings is None or embeddings[0].dim() != 3 or embeddings[0].shape[0] != 1:
                return original(hidden_states, *args, **kwargs)  # not the engine's call: the module's own path
            x = hidden_states[0].to(self.dtype)
            cos, sin = (e[0].to(self.dtype) for e in embeddings)  # [T, D]
            if not last:
                return layer_forward(w, x, cos, sin, layout)[None]
            if layout.rows is not None:
                return rows_layer_forward(w, x, cos, sin, layout).to(model_dtype)[None]
            return layer_forward(w, x, cos, sin, layout).to(model_dtype)[None]

        return forward

    @contextmanager
    def active(self):
        """Within: the decoder's layers run fused for calls that carry a shared-prefix layout."""
        prepared = self.prepared()
        last = len(self.layers) - 1
        for i, (layer, w) in enumerate(zip(self.layers, prepared)):
            layer.forward = self._forward_of(w, layer.forward, i == last)
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.forward
