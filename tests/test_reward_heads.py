"""Reward heads (mmprm_infer.models.heads): one per adapter kind, read by every engine.

For each kind, the fast readout (``rewards`` from hidden rows, through the head rows or the classifier)
equals the reference readout (``output_columns`` and ``rewards_from_columns`` of what the model's own head
module computes) and
the sigmoid of the trainer's ``logit_diff``; a head that reads the wrong rows is caught by the reference
engine, which does not read the head rows.
"""

from __future__ import annotations

import pytest
import torch
from spread_models import FP32_TOL, candidates, max_difference, spread

from mmprm_infer import PRM
from mmprm_infer.formats import RewardColumns
from mmprm_infer.models import ADAPTERS
from mmprm_infer.models.heads import ClassifierHead, TwoRowHead, ValueHead
from mmprm_infer.testing.tiny import (
    build_tiny_causal_lm,
    build_tiny_qwen_prm,
    build_tiny_skywork_prm,
    build_tiny_token_classification_prm,
)

QUESTION = "Janet's ducks lay 16 eggs per day. She eats three and bakes with four. How many are left?"
BUILDERS = {
    "math-shepherd": lambda path: build_tiny_causal_lm(path, seed=31),
    "qwen2.5-math-prm": lambda path: build_tiny_qwen_prm(path, seed=32),
    "token-classification": lambda path: build_tiny_token_classification_prm(path, seed=33),
    "skywork": lambda path: build_tiny_skywork_prm(path, seed=34),
}
HEADS = {"math-shepherd": TwoRowHead, "qwen2.5-math-prm": ClassifierHead, "token-classification": TwoRowHead,
         "skywork": ValueHead}


def _own_head(prm) -> torch.nn.Module:
    """The model's own output module, as its forward applies it to the final-normed hidden states."""
    model = prm.model
    return {"math-shepherd": lambda: model.get_output_embeddings(), "qwen2.5-math-prm": lambda: model.score,
            "token-classification": lambda: model.score, "skywork": lambda: model.v_head}[prm.format.name]()


@pytest.fixture(scope="module")
def prms(tmp_path_factory):
    out = {}
    for name, build in BUILDERS.items():
        prm = PRM.from_pretrained(build(tmp_path_factory.mktemp(name.replace(".", "_"))),
                                  format=name, dtype=torch.float32)
        spread(prm.model)
        if name in ("token-classification", "skywork"):  # a bias the head rows must carry
            linear = prm.model.v_head.summary if name == "skywork" else prm.model.score
            with torch.no_grad():
                linear.bias.copy_(torch.linspace(0.7, -0.4, linear.bias.numel()))
        out[name] = prm
    return out


@pytest.mark.parametrize("name", list(BUILDERS))
def test_each_kind_has_its_head_and_the_readouts_agree(prms, name):
    prm = prms[name]
    head = prm.reward_head
    assert type(head) is HEADS[name]
    rows = torch.randn(9, prm.model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        rewards = head.rewards(rows)
        from_outputs = head.rewards_from_columns(head.output_columns(_own_head(prm)(rows)))
        from_logit = torch.sigmoid(head.logit_diff(rows))
    assert rewards.dtype == from_outputs.dtype == from_logit.dtype == torch.float32
    assert rewards.shape == (9,)
    assert 0.2 < float(rewards.max() - rewards.min())  # informative rewards, not a band around 0.5
    torch.testing.assert_close(rewards, from_outputs, rtol=0, atol=1e-6)
    torch.testing.assert_close(rewards, from_logit, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_logit_diff_is_differentiable(prms, name):
    prm = prms[name]
    rows = torch.randn(4, prm.model.config.hidden_size, requires_grad=True)
    prm.reward_head.logit_diff(rows).sum().backward()
    assert rows.grad is not None and rows.grad.abs().sum() > 0
    weight = next(p for p in _own_head(prm).parameters() if p.dim() == 2)
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    prm.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_engine_reads_through_the_head(prms, name, monkeypatch):
    """Fast and tree-cache engines read their rewards through ``reward_head(...).rewards``; the reference
    reads ``output_columns`` / ``rewards_from_columns``."""
    prm = prms[name]
    cands = [[s.replace("\n", " ") for s in c] for c in candidates(3, seed=2)]
    head_cls = HEADS[name]
    calls = []
    for method in ("rewards", "output_columns", "rewards_from_columns"):
        original = getattr(head_cls, method)
        monkeypatch.setattr(head_cls, method,
                            lambda self, x, _m=method, _o=original: calls.append(_m) or _o(self, x))
    for engine, wanted in (("fast", "rewards"), ("tree_cache", "rewards"), ("reference", "rewards_from_columns")):
        calls.clear()
        prm.score(QUESTION, cands, engine=engine)
        assert wanted in calls, (engine, calls)
    calls.clear()
    prm.score(QUESTION, cands, engine="reference")
    assert "rewards" not in calls  # the oracle never reads the head rows


@pytest.mark.parametrize("name", ["token-classification", "skywork", "math-shepherd"])
def test_a_head_that_drops_its_bias_or_swaps_its_rows_is_caught_by_the_reference(prms, name, monkeypatch):
    prm = prms[name]
    cands = [[s.replace("\n", " ") for s in c] for c in candidates(3, seed=4)]
    reference = prm.score(QUESTION, cands, engine="reference")
    assert max_difference(prm.score(QUESTION, cands, engine="fast"), reference) <= FP32_TOL
    head_cls = HEADS[name]
    original = head_cls.weights
    if name == "math-shepherd":  # no bias: swap the rows instead
        def broken(self):
            w, b = original(self)
            return -w, b
    else:
        def broken(self):
            return original(self)[0], 0.0
    monkeypatch.setattr(head_cls, "weights", broken)
    assert max_difference(prm.score(QUESTION, cands, engine="reference"), reference) == 0.0
    assert max_difference(prm.score(QUESTION, cands, engine="fast"), reference) > 100 * FP32_TOL


def test_heads_refuse_columns_of_the_wrong_shape():
    linear = torch.nn.Linear(8, 1)
    with pytest.raises(ValueError, match=r"a value head has one output column"):
        ValueHead(linear, RewardColumns(good=0, bad=1))
    with pytest.raises(ValueError, match=r"a two-row head reads two output columns"):
        TwoRowHead(torch.nn.Linear(8, 4), RewardColumns(good=0))
    with pytest.raises(ValueError, match=r"a classifier head reads two output columns"):
        ClassifierHead(torch.nn.Linear(8, 4), RewardColumns(good=0))


def test_a_token_classifier_without_a_linear_head_is_refused():
    class NoHead(torch.nn.Module):
        score = torch.nn.Sequential(torch.nn.Linear(4, 2))

    adapter = ADAPTERS["token_classification"](NoHead())
    with pytest.raises(ValueError, match="has no Linear token-classification head"):
        adapter.reward_head(RewardColumns(good=1, bad=0))
