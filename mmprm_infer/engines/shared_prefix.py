"""Shared-prefix attention plugged into transformers' attention interface.

The fast engine runs an unmodified transformers decoder; only the attention
function of every layer is swapped, by registering ``ATTN_IMPLEMENTATION``
with ``transformers.AttentionInterface`` and setting it as the decoder's
``config._attn_implementation`` for the duration of a call
(``shared_prefix_attention_enabled``).  The name is deliberately *not*
registered in ``ALL_MASK_ATTENTION_FUNCTIONS``: for unknown names
``create_causal_mask`` returns None early, so no dense T x T mask is built.

Per-call state travels as a keyword argument of the decoder's forward
(``LAYOUT_KWARG``): Qwen2Model/LlamaModel pass ``**kwargs`` through each
decoder layer and attention module into the attention function unchanged.

A call packs token ranges ("groups"), each belonging to one question: the
group's candidates (``cu_seqlens``) attend to that question's prefix K/V and
causally to their own tokens.  The prefix pass uses the same function with
``append=True``: its chunk attends to the prefix K/V written so far and then
writes its own K/V (after RoPE) into the question's ``PrefixKV``, which holds
it once per layer, never repeated per candidate.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface

from mmprm_infer.kernels.prefix_attention import AttentionPlan, plan_attention

ATTN_IMPLEMENTATION = "mmprm_shared_prefix"
LAYOUT_KWARG = "shared_prefix_layout"


class PrefixKV:
    """One question's prefix keys/values, per layer [P, Hkv, D], filled by the prefix pass."""

    def __init__(self, length: int):
        self.length = length
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def layer(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's buffers, allocated on first use with the model's kv heads, dim and dtype."""
        if layer_idx not in self.keys:
            # [Hkv, P, D] storage, handed out as [P, Hkv, D] views: the kernel
            # permutes to head-major anyway, so this layout avoids a copy per call.
            hkv, d = like.shape[1], like.shape[2]
            self.keys[layer_idx] = like.new_empty(hkv, self.length, d).transpose(0, 1)
            self.values[layer_idx] = like.new_empty(hkv, self.length, d).transpose(0, 1)
        return self.keys[layer_idx], self.values[layer_idx]


@dataclass
class Group:
    """Packed rows [start, end) of one question: segments cu_seqlens over its prefix[:prefix_len]."""

    start: int
    end: int
    prefix: PrefixKV
    prefix_len: int
    cu_seqlens: list[int]  # local to the group; a list avoids a device sync in the kernel
    append: bool = False  # prefix pass: store this chunk's K/V at prefix[prefix_len:]
    # Planned at the first layer of the forward (backend, checked offsets, this group's rows), then
    # run by every layer; engines build a fresh Group per forward.
    plan: AttentionPlan | None = field(default=None, repr=False)


@dataclass
class PackedLayout:
    groups: list[Group]
    # Packed rows whose outputs the caller reads (the reward markers), ascending within each group;
    # None = every row.  The last decoder layer computes only these (``last_layer``).
    rows: list[int] | None = None

    def plans(self, q: torch.Tensor) -> list[AttentionPlan]:
        """Each group's attention plan, made once per forward from the first layer's queries [T, H, D]."""
        if any(g.plan is None for g in self.groups):
            rows, taken = self.rows or [], 0
            for g in self.groups:
                local = []
                while taken < len(rows) and g.start <= rows[taken] < g.end:
                    local.append(rows[taken] - g.start)
                    taken += 1
                g.plan = plan_attention(g.cu_seqlens, g.end - g.start, device=q.device, dtype=q.dtype,
                                        head_dim=q.shape[-1], rows=local if self.rows is not None else None)
            if taken != len(rows):
                raise RuntimeError(f"layout.rows must be ascending packed rows inside the groups; "
                                   f"{len(rows) - taken} were not")
        # every group was planned above
        return [g.plan for g in self.groups]  # type: ignore[misc]


def _group_kv(layer: int, g: Group, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None):
    """(suffix k, suffix v, prefix K/V buffers) of group ``g``, [tokens, Hkv, D]; the prefix's
    ``layer`` is asked once per layer (the tree cache's paths require exactly that order)."""
    k_buf, v_buf = g.prefix.layer(layer, k)
    if (sliding_window is not None
            and g.prefix_len + max(b - a for a, b in zip(g.cu_seqlens, g.cu_seqlens[1:])) > sliding_window):
        raise NotImplementedError(
            f"layer {layer} uses sliding-window attention (window {sliding_window}) shorter than the input; "
            "the fast engine does not support it: use engine='reference'"
        )
    return k[g.start:g.end], v[g.start:g.end], k_buf, v_buf


def _store_prefix(g: Group, k_buf, v_buf, ks: torch.Tensor, vs: torch.Tensor) -> None:
    """Prefix pass: this chunk's K/V become prefix[prefix_len:] for the later chunks and the suffixes."""
    if g.append:
        n = g.end - g.start
        k_buf[g.prefix_len:g.prefix_len + n] = ks
        v_buf[g.prefix_len:g.prefix_len + n] = vs


def attend_packed(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout,
                  scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Every packed row's attention: q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]."""
    outs = []
    for g, plan in zip(layout.groups, layout.plans(q)):
        ks, vs, k_buf, v_buf = _group_kv(layer, g, k, v, sliding_window)
        outs.append(plan.run(q[g.start:g.end], ks, vs, k_buf[:g.prefix_len], v_buf[:g.prefix_len], scale))
        _store_prefix(g, k_buf, v_buf, ks, vs)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def attend_rows(layer: int, q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout,
                scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Attention of ``layout.rows`` only: q_rows [M, H, D] (their queries, in that order),
    k/v [T, Hkv, D] for every row -> [M, H, D].  Prefix K/V are still stored on append."""
    outs = []
    taken = 0
    for g, plan in zip(layout.groups, layout.plans(q_rows)):
        ks, vs, k_buf, v_buf = _group_kv(layer, g, k, v, sliding_window)
        if plan.rows:
            q_g = q_rows[taken:taken + len(plan.rows)]
            outs.append(plan.run_rows(q_g, ks, vs, k_buf[:g.prefix_len], v_buf[:g.prefix_len], scale))
            taken += len(plan.rows)
        _store_prefix(g, k_buf, v_buf, ks, vs)
    if not outs:
        return q_rows.new_empty(q_rows.shape)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def shared_prefix_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                    attention_mask, scaling: float | None = None, dropout: float = 0.0,
                                    sliding_window: int | None = None, **kwargs):
    """transformers attention function: q [1, H, T, D], k/v [1, Hkv, T, D] -> ([1, T, H, D], None)."""
    layout: PackedLayout | None = kwargs.get(LAYOUT_KWARG)
    if layout is None:
        raise RuntimeError(
            f"attention implementation {ATTN_IMPLEMENTATION!r} was called without {LAYOUT_KWARG}=...; "
            "it is only meant for the fast engine (this decoder may not forward **kwargs to attention)"
        )
    if attention_mask is not None or query.shape[0] != 1:
        raise RuntimeError("shared-prefix attention expects one packed sequence (batch 1) and no attention mask")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # [T, H, D] views, no copies
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
    out = attend_packed(module.layer_idx, q, k, v, layout, scale, sliding_window)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_IMPLEMENTATION, shared_prefix_attention_forward)


@contextmanager
def shared_prefix_attention_enabled(decoder: nn.Module):
    """Point every config inside ``decoder`` at the shared-prefix attention; restore on exit."""
    configs = {id(m.config): m.config for m in decoder.modules()
               if hasattr(getattr(m, "config", None), "_attn_implementation")}
    saved = {key: cfg._attn_implementation for key, cfg in configs.items()}
    try:
        for cfg in configs.values():
            cfg._attn_implementation = ATTN_IMPLEMENTATION
        yield
    finally:
        for key, cfg in configs.items():
            cfg._attn_implementation = saved[key]
