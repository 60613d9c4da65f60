"""Step rewards -> candidate score (mmprm_infer.aggregation), on hand-computed values."""

from __future__ import annotations

import math

import pytest

from mmprm_infer.aggregation import AGGREGATIONS, ALIASES, LOG_EPS, aggregate, get_aggregation

# rewards 0.9, 0.5, 0.8: odds 9, 1, 4; logits log 9, 0, log 4
REWARDS = [0.9, 0.5, 0.8]
EXPECTED = {
    "min": 0.5,
    "last": 0.8,
    "mean": (0.9 + 0.5 + 0.8) / 3,  # 0.7333...
    "max": 0.9,
    "prod": 0.36,  # 0.9 * 0.5 * 0.8
    "sum_logprob": math.log(0.36),
    "sum_logit": math.log(36.0),  # log 9 + log 1 + log 4
    "mean_odd": 14.0 / 3.0,  # (9 + 1 + 4) / 3
}


def test_every_registered_aggregation_is_checked():
    assert set(EXPECTED) == set(AGGREGATIONS)


@pytest.mark.parametrize("name, expected", sorted(EXPECTED.items()))
def test_known_values(name, expected):
    assert aggregate(REWARDS, name) == pytest.approx(expected, rel=1e-12)
    assert get_aggregation(name)(REWARDS) == pytest.approx(expected, rel=1e-12)


def test_single_step():
    assert aggregate([0.25], "min") == 0.25
    assert aggregate([0.25], "prod") == pytest.approx(0.25)
    assert aggregate([0.25], "sum_logit") == pytest.approx(math.log(1 / 3))
    assert aggregate([0.25], "mean_odd") == pytest.approx(1 / 3)


def test_order_matters_only_for_last():
    rev = list(reversed(REWARDS))
    for name in EXPECTED:
        if name == "last":
            assert aggregate(rev, name) == 0.9
        else:
            assert aggregate(rev, name) == pytest.approx(EXPECTED[name], rel=1e-12)


@pytest.mark.parametrize("alias, target", sorted(ALIASES.items()))
def test_aliases(alias, target):
    assert get_aggregation(alias) is AGGREGATIONS[target]
    assert aggregate(REWARDS, alias) == pytest.approx(EXPECTED[target], rel=1e-12)


def test_alias_names():
    assert {"average", "avg", "product", "sum_logodds"} <= set(ALIASES)


@pytest.mark.parametrize("name", sorted(AGGREGATIONS))
def test_empty_list_is_an_error(name):
    with pytest.raises(ValueError, match=rf"zero step rewards with '{name}'"):
        aggregate([], name)


@pytest.mark.parametrize("name", sorted(AGGREGATIONS))
@pytest.mark.parametrize("rewards", [[0.0], [1.0], [0.0, 1.0], [1.0, 1.0, 0.0]])
def test_extreme_rewards_stay_finite(name, rewards):
    assert math.isfinite(aggregate(rewards, name))


def test_extreme_values_by_hand():
    assert aggregate([0.0], "sum_logprob") == pytest.approx(math.log(LOG_EPS))
    assert aggregate([0.0], "prod") == 0.0  # a plain product: no clamping
    assert aggregate([1.0], "prod") == 1.0
    assert aggregate([1.0], "sum_logprob") == 0.0
    big = math.log((1 - LOG_EPS) / LOG_EPS)
    assert aggregate([1.0], "sum_logit") == pytest.approx(big)
    assert aggregate([0.0], "sum_logit") == pytest.approx(-big)
    # 1 - (1 - 1e-12) loses digits in float64, hence the loose tolerance
    assert aggregate([1.0], "mean_odd") == pytest.approx((1 - LOG_EPS) / LOG_EPS, rel=1e-4)
    # all-bad candidates still rank by how bad: two zeros < one zero
    assert aggregate([0.0, 0.0], "sum_logprob") < aggregate([0.0, 0.5], "sum_logprob")


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        aggregate(REWARDS, "median")
    msg = str(err.value)
    assert "'median'" in msg
    for name in AGGREGATIONS:
        assert name in msg


def test_callable_passes_through():
    def second(xs):
        return xs[1]

    assert get_aggregation(second) is second
    assert aggregate(REWARDS, second) == 0.5
    assert aggregate(REWARDS, lambda xs: sum(xs)) == pytest.approx(2.2)


def test_returns_python_float_for_int_rewards():
    out = aggregate([1, 0], "mean")
    assert isinstance(out, float) and out == 0.5


def test_aggregations_on_edge_rewards():
    # exact 0 and 1 exercise the clamps: p >= eps for log, eps <= p <= 1 - eps for logit and odds
    rewards = [1.0, 0.0, 0.5, 0.25, 0.75, 0.9]
    cu = [0, 1, 3, 6]
    eps = 1e-12
    clamp = lambda p: min(max(p, eps), 1 - eps)  # noqa: E731
    lg = lambda p: math.log(max(p, eps))  # noqa: E731
    logit = lambda p: math.log(clamp(p) / (1 - clamp(p)))  # noqa: E731
    odd = lambda p: clamp(p) / (1 - clamp(p))  # noqa: E731
    want = {
        "min": [1.0, 0.0, 0.25],
        "max": [1.0, 0.5, 0.9],
        "mean": [1.0, 0.25, (0.25 + 0.75 + 0.9) / 3],
        "last": [1.0, 0.5, 0.9],
        "prod": [1.0, 0.0, 0.25 * 0.75 * 0.9],
        "sum_logprob": [lg(1.0), lg(0.0) + lg(0.5), lg(0.25) + lg(0.75) + lg(0.9)],
        "sum_logit": [logit(1.0), logit(0.0) + logit(0.5), logit(0.25) + logit(0.75) + logit(0.9)],
        "mean_odd": [odd(1.0), (odd(0.0) + odd(0.5)) / 2, (odd(0.25) + odd(0.75) + odd(0.9)) / 3],
    }
    assert set(want) == set(AGGREGATIONS)
    for name, expected in want.items():
        got = [aggregate(rewards[a:b], name) for a, b in zip(cu, cu[1:])]
        assert got == pytest.approx(expected, rel=1e-6, abs=0)
