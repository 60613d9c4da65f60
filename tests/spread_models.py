"""Equivalence checks that bite: tiny PRMs with spread rewards, a tight comparison, broken engines.

Tiny random checkpoints (tests/conftest.py) give rewards in a band of a few
hundredths around 0.5 (math-shepherd 0.459-0.491, qwen 0.489-0.493), because
their 0.02-scale weights barely move the hidden state or the head's logit.
On such a band a wrong engine (attention scale off by 2 %, positions off by
one) moves rewards by less than a loose tolerance, and a ranking check finds
almost no pairs to compare.  ``spread`` scales the weights, in place, so the
rewards cover most of (0, 1) and depend strongly on context;
``assert_matches`` compares at a tolerance a few times above what fp32
achieves and checks the ranking of every pair of candidates the reference
separates; ``BROKEN`` holds engines with one deliberate bug each, which the
tests use to show that the check fails on them.

Used by tests/test_fast_engine.py, tests/test_integration_search.py and
bench/test_hot_paths.py (as ``tests.spread_models``).
"""

from __future__ import annotations

import contextlib
import random

import torch

from mmprm_infer.engines import fast as fast_module
from mmprm_infer.engines import shared_prefix as sp
from mmprm_infer.kernels.prefix_attention import AttentionPlan

# Weight scales: every 2-D weight of the text decoder except the embeddings
# is multiplied by BODY (context matters), the reward head by HEAD (logits
# spread; both Linear layers of the Qwen2.5-Math-PRM head).  Chosen so the
# rewards of the conftest models span most of (0, 1) -- math-shepherd
# 0.20-0.996, qwen 0.03-0.72, custom 0.07-0.93 on tests/test_fast_engine.py's
# candidates -- without piling up at 0 or 1, where p(1 - p) -> 0 hides errors.
BODY = 8.0
HEAD = 8.0

# fp32 fast and tree-cache engines against the reference on the spread
# models: measured max |difference| 5.4e-7 (three formats, N = 1, 3, 16).
# The broken engines below are off by at least 4.5e-4 (qwen, prefix one too
# long), mostly 1e-2 to 3e-1; on the unscaled models several of them stayed
# under the old 1e-4 tolerance.
FP32_TOL = 2e-6
# A pair of candidates the reference separates by more than this (mean step
# reward) must be ordered the same way.
RANK_MARGIN = 2e-5

WORDS = ("the area is 12 5 = 60 half of so we compute x + y and eggs per day sells remainder market "
         "triangle angle 30 degrees sum two largest bars apples then multiply divide add count rows").split()


def spread(model: torch.nn.Module, body: float = BODY, head: float = HEAD) -> torch.nn.Module:
    """Scale ``model``'s weights in place so its rewards spread over (0, 1); returns the model."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() != 2 or "embed" in name:
                continue
            if name.split(".")[0] in ("lm_head", "score"):  # the LM head; Qwen2ForProcessRewardModel's score.0/2
                param.mul_(head)
            else:
                param.mul_(body)
    return model


def spread_prm(prm):
    """``spread`` the PRM's model (in place); returns the PRM."""
    spread(prm.model)
    return prm


def candidates(n: int, seed: int = 0) -> list[list[str]]:
    """Ragged candidates of 1-5 steps; n >= 3 adds a one-step one and a duplicate, n > 3 a long-ish one."""
    rng = random.Random(seed)

    def step(n_words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n_words))

    # Distinct first words: candidates share nothing but the question (and the format's wrapping).
    cands = [[f"{WORDS[i % len(WORDS)]} " + step(rng.randint(1, 12))]
             + [step(rng.randint(1, 15)) for _ in range(rng.randint(0, 4))] for i in range(n)]
    if n >= 3:
        cands[1] = [step(4)]
        cands[2] = list(cands[0])
    if n > 3:
        cands[-1] = [step(30) for _ in range(8)]
    return cands


def max_difference(got: list[list[float]], want: list[list[float]]) -> float:
    assert [len(r) for r in got] == [len(r) for r in want], "different numbers of steps"
    return max((abs(a - b) for x, y in zip(got, want) for a, b in zip(x, y)), default=0.0)


def separated_pairs(want: list[list[float]], margin: float = RANK_MARGIN) -> list[tuple[int, int]]:
    """(i, j) with candidate i's mean step reward above j's by more than ``margin`` in ``want``."""
    mean = [sum(r) / len(r) for r in want]
    return [(i, j) for i in range(len(mean)) for j in range(len(mean)) if mean[i] - mean[j] > margin]


def assert_matches(got: list[list[float]], want: list[list[float]], tol: float = FP32_TOL,
                   margin: float = RANK_MARGIN) -> None:
    """Every step reward within ``tol`` of ``want``, and every pair ``want`` separates ordered the same."""
    diff = max_difference(got, want)
    assert diff <= tol, f"step rewards differ by {diff:.3g} > {tol:.3g}"
    mean = [sum(r) / len(r) for r in got]
    wrong = [(i, j) for i, j in separated_pairs(want, margin) if not mean[i] > mean[j]]
    assert not wrong, f"candidate pairs ranked differently: {wrong[:5]}"


def assert_spread(rewards: list[list[float]], width: float = 0.5) -> None:
    """The rewards really are spread: max - min above ``width`` (the unscaled models: 0.004-0.036)."""
    flat = [x for r in rewards for x in r]
    assert max(flat) - min(flat) > width, f"rewards only span {min(flat):.3f}-{max(flat):.3f}"


# --------------------------------------------------------------------------
# deliberately broken engines (each a context manager patching one thing)
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _patched(obj, name, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def attention_scale_off():
    """The shared-prefix attention runs with its softmax scale 2 % too large (fast and tree-cache engines)."""
    run = AttentionPlan.run

    def wrong(plan, q, ks, vs, kp, vp, scale):
        return run(plan, q, ks, vs, kp, vp, scale * 1.02)

    return _patched(AttentionPlan, "run", wrong)


def prefix_keys_short():
    """Tokens after a cached prefix attend to its first P - 1 keys only: the prefix length off by one
    inside the attention (fast and tree-cache engines)."""
    run = AttentionPlan.run

    def wrong(plan, q, ks, vs, kp, vp, scale):
        return run(plan, q, ks, vs, kp[:-1], vp[:-1], scale)

    return _patched(AttentionPlan, "run", wrong)


def prefix_one_too_long():
    """The fast engine's shared prefix is one token longer than the candidates' common prefix (as long as
    the result still ends before the first reward and leaves every candidate a token): from that token on,
    every candidate is computed with candidate 0's token."""
    length = fast_module.shared_prefix_length

    def wrong(question):
        p = length(question)
        first_reward = min((c.reward_positions[0] for c in question.candidates if c.reward_positions), default=p)
        return min(p + 1, first_reward, min(len(c.input_ids) for c in question.candidates) - 1)

    return _patched(fast_module, "shared_prefix_length", wrong)


@contextlib.contextmanager
def suffix_positions_off():
    """Tokens that continue a cached prefix get position ids one too high (fast and tree-cache engines):
    relative positions inside a suffix stay right, those to the prefix are off by one."""
    original = torch.nn.Module.__call__

    def call(module, *args, **kwargs):
        layout = kwargs.get(sp.LAYOUT_KWARG)
        # the decoder's own call (it holds the layers); the layers inside get RoPE already computed
        if (layout is not None and hasattr(module, "layers") and "position_ids" in kwargs
                and any(g.prefix_len > 0 for g in layout.groups)):
            kwargs["position_ids"] = kwargs["position_ids"] + 1
        return original(module, *args, **kwargs)

    with _patched(torch.nn.Module, "__call__", call):
        yield


# name -> context manager factory; "fast_only" ones do not touch the tree-cache engine
BROKEN = {
    "attention_scale_off": attention_scale_off,
    "suffix_positions_off": suffix_positions_off,
    "prefix_keys_short": prefix_keys_short,
    "prefix_one_too_long": prefix_one_too_long,
}
FAST_ONLY = {"prefix_one_too_long"}
