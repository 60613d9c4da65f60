"""The last decoder layer, computed only for the rows whose output is read.

A PRM reads the final hidden state at its step markers alone.  Every layer
but the last must run on all rows (later rows attend to their K/V), but the
last layer's output at other rows is discarded: there only the K/V
projections need every row.  While ``last_layer_rows_only`` is active and the
call's layout names ``rows``, the last layer computes its queries, attention,
output projection and MLP for those rows and returns [1, M, hidden] in their
order; the decoder's final norm then runs on M rows.  A prefix pass names no
rows (``rows=[]``): its last layer only stores K/V.

Layers whose structure we know (``PRUNABLE``: pre-norm attention + MLP with
q/k/v/o projections and standard RoPE) take the pruned path; any other layer
runs whole and its output is cut to the rows, so the contract holds for every
decoder.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from mmprm_infer.engines.shared_prefix import LAYOUT_KWARG, PackedLayout, attend_rows

PRUNABLE = ("Qwen2DecoderLayer", "LlamaDecoderLayer", "MistralDecoderLayer")


def prunable(layer: nn.Module) -> bool:
    attn = getattr(layer, "self_attn", None)
    return (
        type(layer).__name__ in PRUNABLE
        and all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "layer_idx"))
        and all(hasattr(layer, name) for name in ("input_layernorm", "post_attention_layernorm", "mlp"))
    )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by cos/sin [T, D] (the half-split RoPE of Llama/Qwen2)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def rows_forward(layer: nn.Module, hidden: torch.Tensor, position_embeddings, layout: PackedLayout) -> torch.Tensor:
    """One prunable decoder layer for ``layout.rows`` only: hidden [1, T, E] -> [1, M, E]."""
    attn = layer.self_attn
    x = hidden[0]
    rows = torch.tensor(layout.rows, dtype=torch.long, device=x.device)
    d = attn.head_dim
    h = layer.input_layernorm(x)
    k = attn.k_proj(h).view(x.shape[0], -1, d)
    v = attn.v_proj(h).view(x.shape[0], -1, d)
    q = attn.q_proj(h.index_select(0, rows))
    q = q.view(len(rows), q.shape[-1] // d, d)  # explicit heads: M may be 0
    cos, sin = (t[0] for t in position_embeddings)  # [T, D]
    q = _rope(q, cos.index_select(0, rows), sin.index_select(0, rows))
    k = _rope(k, cos, sin)
    out = attend_rows(attn.layer_idx, q, k, v, layout, attn.scaling, getattr(attn, "sliding_window", None))
    y = x.index_select(0, rows) + attn.o_proj(out.reshape(len(rows), q.shape[1] * d))
    y = y + layer.mlp(layer.post_attention_layernorm(y))
    return y[None]


@contextmanager
def last_layer_rows_only(decoder: nn.Module):
    """Within: calls whose layout names ``rows`` get the last layer's output at those rows only."""
    layers = decoder.layers[: decoder.config.num_hidden_layers]
    layer = layers[-1]
    original = layer.forward
    pruned = prunable(layer)

    def forward(hidden_states, *args, **kwargs):
        layout: PackedLayout | None = kwargs.get(LAYOUT_KWARG)
        if layout is None or layout.rows is None:
            return original(hidden_states, *args, **kwargs)
        embeddings = kwargs.get("position_embeddings")
        if pruned and embeddings is not None and embeddings[0].dim() == 3 and embeddings[0].shape[0] == 1:
            return rows_forward(layer, hidden_states, embeddings, layout)
        out = original(hidden_states, *args, **kwargs)  # unknown layer: run whole, keep the rows
        index = torch.tensor(layout.rows, dtype=torch.long, device=hidden_states.device)
        if isinstance(out, tuple):
            return (out[0].index_select(1, index),) + out[1:]
        return out.index_select(1, index)

    layer.forward = forward
    try:
        yield
    finally:
        del layer.forward
