"""Step rewards -> one candidate score.

Each aggregation is data: a per-step transform of the reward p and a
reduction over the steps, registered by name (``register_aggregation``), so a
new aggregation is one new row.  This module is the only place step rewards
become a candidate score.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# p is clamped to >= LOG_EPS for log, and into [LOG_EPS, 1 - LOG_EPS] for
# logit and odds, so a reward of exactly 0 or 1 gives a large finite score
# instead of -inf/inf (which would make ties of all bad, or all perfect,
# candidates).
LOG_EPS = 1e-12

TRANSFORMS: dict[str, Callable[[float], float]] = {
    "p": lambda p: p,
    "log": lambda p: math.log(max(p, LOG_EPS)),
    "logit": lambda p: math.log(_clamp(p) / (1.0 - _clamp(p))),
    "odds": lambda p: _clamp(p) / (1.0 - _clamp(p)),
}

REDUCTIONS: dict[str, Callable[[Sequence[float]], float]] = {
    "min": min,
    "max": max,
    "sum": math.fsum,
    "mean": lambda xs: math.fsum(xs) / len(xs),
    "last": lambda xs: xs[-1],
    "prod": math.prod,
}


def _clamp(p: float) -> float:
    return min(max(p, LOG_EPS), 1.0 - LOG_EPS)


@dataclass(frozen=True)
class Aggregation:
    name: str
    transform: str  # key of TRANSFORMS
    reduce: str  # key of REDUCTIONS
    doc: str = ""

    def __call__(self, step_rewards: Sequence[float]) -> float:
        if len(step_rewards) == 0:
            raise ValueError(
                f"cannot aggregate zero step rewards with {self.name!r}: "
                "every candidate needs at least one step"
            )
        values = [TRANSFORMS[self.transform](float(p)) for p in step_rewards]
        return REDUCTIONS[self.reduce](values)


AGGREGATIONS: dict[str, Aggregation] = {}
ALIASES = {"average": "mean", "avg": "mean", "product": "prod", "sum_logodds": "sum_logit"}


def register_aggregation(agg: Aggregation) -> Aggregation:
    if agg.transform not in TRANSFORMS or agg.reduce not in REDUCTIONS:
        raise ValueError(f"aggregation {agg.name!r}: unknown transform/reduce {agg.transform}/{agg.reduce}")
    AGGREGATIONS[agg.name] = agg
    return agg


for _agg in (
    Aggregation("min", "p", "min", doc="weakest step (MM-PRM's default comparison)"),
    Aggregation("last", "p", "last", doc="reward of the final step"),
    Aggregation("mean", "p", "mean", doc="average step reward"),
    Aggregation("max", "p", "max", doc="strongest step"),
    Aggregation("prod", "p", "prod", doc="product of step rewards"),
    Aggregation("sum_logprob", "log", "sum", doc="sum of log p"),
    Aggregation("sum_logit", "logit", "sum", doc="sum of log(p / (1 - p))"),
    Aggregation("mean_odd", "odds", "mean", doc="mean of the odds p / (1 - p)"),
):
    register_aggregation(_agg)


# Aggregations of probabilities into a probability-like score (>= 0, no logs): what a weighted vote
# can sum per answer (``selection.weighted_vote``); `mmprm eval`'s default list.
PROBABILITY_AGGREGATIONS = ("min", "last", "mean", "prod", "max")


def get_aggregation(name: str | Aggregation | Callable) -> Callable[[Sequence[float]], float]:
    """Look an aggregation up by name; a callable is returned as is."""
    if isinstance(name, Aggregation) or callable(name) and not isinstance(name, str):
        return name
    key = ALIASES.get(name, name)
    if key not in AGGREGATIONS:
        raise ValueError(
            f"unknown aggregation {name!r}; choose one of {sorted(AGGREGATIONS)} "
            "or pass a callable list[float] -> float"
        )
    return AGGREGATIONS[key]


def aggregate(step_rewards: Sequence[float], how: str | Callable = "min") -> float:
    return float(get_aggregation(how)(step_rewards))
