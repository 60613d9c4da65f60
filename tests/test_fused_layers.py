"""The fused decoder layer's pieces against transformers' own modules (the engine-level comparison with the
reference engine is in tests/test_fast_engine.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb

from mmprm_infer.engines import fused_layers as fl
from mmprm_infer.engines.linear_paths import onednn_available

# bf16: one rounding of each op's output apart at most (2^-8 relative), scaled by the values' size
TOLERANCE = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_rms_norm_equals_transformers(dtype):
    gen = torch.Generator().manual_seed(0)
    norm = Qwen2RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48, generator=gen) + 0.5)
    norm = norm.to(dtype)
    x = (torch.randn(7, 48, generator=gen) * 3).to(dtype)
    got = fl.rms_norm(x, norm.weight.detach(), norm.variance_epsilon)
    assert got.dtype == dtype
    torch.testing.assert_close(got, norm(x).detach(), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_rope_in_place_equals_transformers(dtype):
    gen = torch.Generator().manual_seed(1)
    t, heads, d = 9, 5, 16
    freqs = torch.outer(torch.arange(t, dtype=torch.float32), torch.rand(d // 2, generator=gen))
    cos, sin = torch.cat([freqs, freqs], -1).cos().to(dtype), torch.cat([freqs, freqs], -1).sin().to(dtype)
    qkv = torch.randn(t, heads + 2, d, generator=gen).to(dtype)  # rotated heads followed by two untouched ones
    want, _ = apply_rotary_pos_emb(qkv[:, :heads].transpose(0, 1)[None], qkv[:, :1].transpose(0, 1)[None],
                                   cos[None], sin[None])
    untouched = qkv[:, heads:].clone()
    fl.rope_(qkv[:, :heads], cos, sin)
    torch.testing.assert_close(qkv[:, :heads], want[0].transpose(0, 1), **TOLERANCE[dtype])
    assert torch.equal(qkv[:, heads:], untouched)


PATHS = ["torch"] + (["onednn"] if onednn_available() else [])


@pytest.mark.parametrize("path, copy", [(p, True) for p in PATHS] + [("torch", False)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [0, 1, 13])
@pytest.mark.parametrize("parts", [1, 3])
def test_fused_linear_and_its_residual_add(path, copy, bias, rows, parts):
    """One GEMM on a fused (or packed) copy of the parts' weights, or, without a copy, one per part."""
    gen = torch.Generator().manual_seed(rows)
    ws = [torch.randn(8 * (i + 1), 40, generator=gen) for i in range(parts)]
    bs = [torch.randn(8 * (i + 1), generator=gen) if bias else None for i in range(parts)]
    x = torch.randn(rows, 40, generator=gen)
    lin = fl.FusedLinear(ws, bs, torch.float32, path, rows=16, copy=copy)
    want = F.linear(x, torch.cat(ws), torch.cat(bs) if bias else None)
    residual = torch.randn(want.shape, generator=gen)
    torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.add_to(residual, x), residual + want, rtol=1e-5, atol=1e-5)
    if not copy:  # the model's own weights, not copies
        assert all(a.data_ptr() == b.data_ptr() for a, b in zip(lin.parts or [lin.weight_t], ws))


def test_fused_linear_without_a_copy_casts_per_call():
    """A bf16 model computed in fp32 without room for an fp32 copy: the parts are cast per call."""
    gen = torch.Generator().manual_seed(5)
    ws = [torch.randn(16, 32, generator=gen).bfloat16() for _ in range(2)]
    x = torch.randn(6, 32, generator=gen)
    lin = fl.FusedLinear(ws, [None, None], torch.float32, "torch", rows=8, copy=False)
    assert lin.parts is not None and all(p.dtype == torch.bfloat16 for p in lin.parts)
    torch.testing.assert_close(lin(x), x @ torch.cat(ws).float().t(), rtol=1e-5, atol=1e-5)


def test_fused_decoder_only_takes_prunable_decoders_and_restores_forwards(tmp_path):
    from transformers import AutoModelForCausalLM

    from mmprm_infer.testing import build_tiny_causal_lm

    model = AutoModelForCausalLM.from_pretrained(build_tiny_causal_lm(tmp_path, arch="qwen2", seed=0))
    decoder = model.model
    assert fl.FusedDecoder.supports(decoder)
    fused = fl.FusedDecoder(decoder, torch.float32, "torch", rows=32)
    with fused.active():
        assert all("forward" in vars(layer) for layer in decoder.layers)
        ids = torch.arange(1, 9)[None]
        plain = decoder(input_ids=ids).last_hidden_state  # no shared-prefix layout: the modules' own path
    assert all("forward" not in vars(layer) for layer in decoder.layers)
    torch.testing.assert_close(plain, decoder(input_ids=ids).last_hidden_state)
    prepared = fused.prepared()
    assert fused.prepared() is prepared  # prepared once ...
    with torch.no_grad():
        decoder.layers[0].mlp.down_proj.weight.mul_(2)
    assert fused.prepared() is not prepared  # ... and again when a weight changes in place
    assert not fl.FusedDecoder.supports(torch.nn.Module())
