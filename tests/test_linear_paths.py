"""CPU linear paths: oneDNN with prepacked weights equals F.linear, and the choice is measured."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmprm_infer.engines import linear_paths as lp

pytestmark = pytest.mark.skipif(not lp.onednn_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("shape", [(1, 7), (5, 64), (2, 33, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_f_linear(shape, bias):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen)
    w = torch.randn(48, shape[-1], generator=gen)
    b = torch.randn(48, generator=gen) if bias else None
    got = lp.packed_linear(x, lp.pack_weight(w, 16), b)
    assert got.shape == (*shape[:-1], 48)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5 * shape[-1] ** 0.5)


@pytest.mark.skipif(not lp.onednn_available(torch.bfloat16), reason="this CPU has no oneDNN bf16 packing")
def test_packed_linear_bf16_within_bf16_rounding():
    x = torch.randn(9, 128).bfloat16()
    w = torch.randn(32, 128).bfloat16()
    exact = F.linear(x.float(), w.float())
    got = lp.packed_linear(x, lp.pack_weight(w, 9), None).float()
    assert (got - exact).abs().max() <= 2e-2 * exact.abs().max()


def _decoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8, bias=False))


def test_active_routes_every_linear_and_restores_it():
    model = _decoder()
    x = torch.randn(4, 16)
    plain = model(x)
    packs = lp.PackedLinears(model, rows=4)
    calls = []
    original = lp.packed_linear
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lp, "packed_linear", lambda *a: calls.append(1) or original(*a))
        with torch.inference_mode(), packs.active():
            packed = model(x)
    assert len(calls) == 2
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(m) for m in model.modules())  # the class forward is back


def test_a_changed_weight_is_repacked():
    model = _decoder()
    packs = lp.PackedLinears(model, rows=4)
    x = torch.randn(4, 16)
    with torch.inference_mode(), packs.active():
        model(x)
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # in place: same storage, new version
    with torch.inference_mode():
        plain = model(x)
        with packs.active():
            packed = model(x)
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)


def test_inputs_in_another_dtype_behave_as_nn_linear():
    model = _decoder()
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.inference_mode():
        plain = F.linear(x, model[0].weight.bfloat16(), model[0].bias.bfloat16())
        with lp.PackedLinears(model, rows=3).active():
            with pytest.raises(RuntimeError):  # F.linear itself refuses mixed dtypes: no silent cast
                model[0](x)
    assert plain.dtype == torch.bfloat16


def test_choose_path_explicit_env_and_fallbacks(monkeypatch):
    model = _decoder()
    assert lp.choose_path(model, 64, "torch") == "torch"
    assert lp.choose_path(model, 64, "onednn") == "onednn"
    monkeypatch.setenv(lp.ENV_VAR, "onednn")
    assert lp.choose_path(model, 64) == "onednn"  # the variable overrides "auto"
    assert lp.choose_path(model, 64, "torch") == "torch"  # an explicit argument overrides the variable
    monkeypatch.setenv(lp.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=r"\$MMPRM_CPU_LINEAR='fastest' is not a linear path"):
        lp.choose_path(model, 64)
    monkeypatch.delenv(lp.ENV_VAR)
    with pytest.raises(ValueError, match="unknown linear path 'mkl'"):
        lp.choose_path(model, 64, "mkl")
    assert lp.choose_path(model, 64) in ("torch", "onednn")  # measured
    monkeypatch.setattr(lp, "onednn_available", lambda dtype=None: False)
    assert lp.choose_path(model, 64) == "torch"
    with pytest.raises(RuntimeError, match="needs torch built with oneDNN"):
        lp.choose_path(model, 64, "onednn")


def test_auto_measures_once_and_keeps_torch_without_a_clear_win(monkeypatch):
    model = _decoder()
    lp._choices.clear()
    # oneDNN 3 % faster: not a clear win
    monkeypatch.setattr(lp, "time_interleaved", lambda calls, reps: {"torch": 1.0, "onednn": 0.97})
    assert lp.choose_path(model, 32) == "torch"
    monkeypatch.setattr(lp, "time_interleaved", lambda calls, reps: pytest.fail("measured twice"))
    assert lp.choose_path(model, 32) == "torch"  # cached for this shape set
    lp._choices.clear()
    monkeypatch.setattr(lp, "time_interleaved", lambda calls, reps: {"torch": 1.0, "onednn": 0.5})
    assert lp.choose_path(model, 32) == "onednn"
    lp._choices.clear()


def test_measuring_leaves_the_global_rng_alone():
    lp._choices.clear()
    torch.manual_seed(3)
    expected = torch.rand(4)
    model = _decoder()  # draws from the global RNG itself: reseed after building it
    torch.manual_seed(3)
    lp.choose_path(model, 48)
    assert torch.equal(torch.rand(4), expected)
    lp._choices.clear()
