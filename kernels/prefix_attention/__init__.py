"""Shared-prefix attention: N candidates attend to one prefix plus their own suffix.

PRM scoring runs N candidate solutions after one shared prompt.  The prompt's
keys/values (``k_prefix``, ``v_prefix``, P tokens) are computed once; the
candidates' suffix tokens are packed without padding into T = sum(S_i) rows
delimited by ``cu_seqlens``.  Query t of segment n attends to every prefix key
plus the suffix keys of its own segment up to and including itself.

The work splits into two exact partial attentions merged by their
log-sum-exp (the flash-decoding / cascade-attention identity):

    prefix partial: all T queries against the P prefix keys (no mask)
    suffix partial: block-diagonal causal attention within each segment
    merge:          out = (e^lse1 out1 + e^lse2 out2) / (e^lse1 + e^lse2)

so the prefix is never copied N times.

Layouts: q [T, H, D]; k/v suffix [T, Hkv, D]; k/v prefix [P, Hkv, D];
query head h reads kv head h // (H // Hkv) (GQA).  Partials are fp32:
out [T, H, D] and lse [T, H] (natural log; -inf where there are no keys).

One module per backend, beside the oracle they are tested against:

    reference.py       float64 definitions (the test oracle)
    torch_ops.py       the CPU path: ATen's flash kernel or Hydragen's batched GEMMs
    triton_ops.py      CUDA kernels (and the CPU interpreter in tests)
    flash_attn_ops.py  flash-attn's varlen kernels (CUDA, half precision)
    plan.py            plan once per forward (backend, offsets, rows), run per layer
    dispatch.py        the one-shot public functions
"""

from mmprm_infer.kernels.prefix_attention.dispatch import (
    BACKENDS,
    merge_partials,
    prefix_partial,
    shared_prefix_attention,
    shared_prefix_attention_rows,
    suffix_partial,
    suffix_rows_partial,
)
from mmprm_infer.kernels.prefix_attention.plan import AttentionPlan, plan_attention
from mmprm_infer.kernels.prefix_attention.torch_ops import prefix_attention_paths

__all__ = ["BACKENDS", "AttentionPlan", "merge_partials", "plan_attention", "prefix_attention_paths", "prefix_partial",
           "shared_prefix_attention", "shared_prefix_attention_rows", "suffix_partial", "suffix_rows_partial"]
