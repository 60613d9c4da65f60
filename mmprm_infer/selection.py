"""Candidate scores + final answers -> the chosen candidate.

Strategies, registered by name in ``STRATEGIES``:

- ``best_of_n``: the highest score.
- ``weighted_vote``: scores summed per answer group (candidates whose final
  answers are equivalent); the best candidate of the heaviest group.
- ``majority_vote``: self-consistency; the largest answer group, no PRM
  needed (scores, when given, only break ties).

A candidate without a final answer (None or empty) never wins a vote over a
candidate with one: such candidates sit in singleton groups that are not
eligible to win while any candidate has an answer, and they rank after every
candidate with an answer.  Ties always go to the lower candidate index (for
groups: the group whose first candidate comes first).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mmprm_infer.answers import group_answers, has_answer

__all__ = ["Selection", "select", "STRATEGIES", "get_strategy", "register_strategy"]


@dataclass(frozen=True)
class Selection:
    best_index: int
    ranking: list[int]  # every candidate index, best first
    group_ids: list[int]  # answer group per candidate (see answers.group_answers)
    group_scores: dict[int, float] = field(default_factory=dict)
    # weighted_vote: summed score per group; majority_vote: member count per
    # group; best_of_n: empty.


StrategyFn = Callable[[list[float] | None, list[str | None], list[int]], Selection]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _groups(group_ids: list[int]) -> dict[int, list[int]]:
    """Group id -> its candidate indices, in first-seen order of the groups."""
    out: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        out.setdefault(g, []).append(i)
    return out


def _by_score(indices: list[int], scores: list[float] | None) -> list[int]:
    if scores is None:
        return sorted(indices)
    return sorted(indices, key=lambda i: (-scores[i], i))


def _answered_groups(groups: dict[int, list[int]], answers: list[str | None]) -> set[int]:
    return {g for g, members in groups.items() if any(has_answer(answers[i]) for i in members)}


def _vote(
    group_value: dict[int, float],
    tie_break: dict[int, float],
    scores: list[float] | None,
    answers: list[str | None],
    group_ids: list[int],
) -> Selection:
    """Shared by both votes: the eligible group with the largest
    (value, tie_break), then its first candidate; earliest group on ties."""
    groups = _groups(group_ids)
    answered = _answered_groups(groups, answers)
    first = {g: members[0] for g, members in groups.items()}

    def group_key(g: int):
        return (g not in answered, -group_value[g], -tie_break.get(g, 0.0), first[g])

    order = sorted(groups, key=group_key)
    if not answered:  # nobody answered: fall back to best score / first candidate
        by_score = _by_score(list(range(len(answers))), scores)
        return Selection(by_score[0], by_score, group_ids, dict(group_value))
    ranking: list[int] = []
    for g in order:
        ranking.extend(_by_score(groups[g], scores))
    return Selection(ranking[0], ranking, group_ids, dict(group_value))


# --------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------


def best_of_n(scores: list[float] | None, answers: list[str | None], group_ids: list[int]) -> Selection:
    """The highest score (first on ties); ranking by score, descending."""
    if scores is None:
        raise ValueError(
            "best_of_n needs scores, got scores=None: score the candidates with a PRM, "
            "or use strategy='majority_vote' which needs none"
        )
    ranking = _by_score(list(range(len(scores))), scores)
    return Selection(ranking[0], ranking, group_ids, {})


def weighted_vote(scores: list[float] | None, answers: list[str | None], group_ids: list[int]) -> Selection:
    """Sum of scores per answer group; the heaviest group's best candidate.

    Ranking: the winning group's candidates (by score), then the other groups
    by summed score (then by their first candidate), each group by score;
    groups without an answer last.
    """
    if scores is None:
        raise ValueError(
            "weighted_vote needs scores, got scores=None: score the candidates with a PRM, "
            "or use strategy='majority_vote' which needs none"
        )
    negative = [i for i, s in enumerate(scores) if s < 0]
    if negative:
        raise ValueError(
            f"weighted_vote needs non-negative scores, but candidate {negative[0]} has score "
            f"{scores[negative[0]]!r} ({len(negative)} negative in all): summing log-probabilities or "
            "logits per answer makes larger groups lose. Aggregate step rewards with a "
            "probability-like aggregation (min, mean, prod, last or max), or use best_of_n"
        )
    sums: dict[int, float] = {}
    for g, members in _groups(group_ids).items():
        sums[g] = math.fsum(scores[i] for i in members)
    return _vote(sums, {}, scores, answers, group_ids)


def majority_vote(scores: list[float] | None, answers: list[str | None], group_ids: list[int]) -> Selection:
    """Self-consistency: the answer group with the most members.

    Without scores: ties go to the group seen first and its first candidate
    represents it.  With scores: groups of equal size are ordered by their
    summed score (equivalently their mean) before first-seen order, and the
    highest-scoring member represents the group.  ``group_scores`` holds the
    member counts.
    """
    groups = _groups(group_ids)
    counts = {g: float(len(members)) for g, members in groups.items()}
    tie = {}
    if scores is not None:
        tie = {g: math.fsum(scores[i] for i in members) for g, members in groups.items()}
    return _vote(counts, tie, scores, answers, group_ids)


STRATEGIES: dict[str, StrategyFn] = {}


def register_strategy(name: str, fn: StrategyFn) -> StrategyFn:
    """Add a strategy ``fn(scores | None, answers, group_ids) -> Selection``."""
    STRATEGIES[name] = fn
    return fn


register_strategy("best_of_n", best_of_n)
register_strategy("weighted_vote", weighted_vote)
register_strategy("majority_vote", majority_vote)


def get_strategy(name: str) -> StrategyFn:
    if name not in STRATEGIES:
        raise ValueError(f"unknown selection strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name]


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------


def _check_scores(scores: Sequence[float], n: int) -> list[float]:
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError) as e:
        raise ValueError(f"scores must be numbers, one per candidate: {e}") from None
    if len(values) != n:
        raise ValueError(
            f"got {len(values)} scores for {n} candidates (answers); pass exactly one aggregated "
            "score per candidate, in the same order as the answers"
        )
    nan = [i for i, s in enumerate(values) if math.isnan(s)]
    if nan:
        raise ValueError(
            f"score of candidate {nan[0]} is NaN ({len(nan)} NaN in all): check the PRM's step rewards "
            "for that candidate (a NaN reward or an invalid custom aggregation), or drop the candidate"
        )
    return values


def select(
    strategy: str,
    scores: Sequence[float] | None,
    answers: Sequence[str | None],
    group_ids: Sequence[int] | None = None,
) -> Selection:
    """Pick one of N candidates.

    strategy: a name in ``STRATEGIES``; scores: one aggregated PRM score per
    candidate (may be None for majority_vote); answers: the final answer of
    each candidate (None when it has none); group_ids: precomputed answer
    groups (default: ``answers.group_answers(answers)``).
    """
    fn = get_strategy(strategy)
    answers = list(answers)
    n = len(answers)
    if n == 0:
        raise ValueError("no candidates to select from: answers is empty; give at least one candidate")
    values = _check_scores(scores, n) if scores is not None else None
    if group_ids is None:
        gids = group_answers(answers)
    else:
        gids = [int(g) for g in group_ids]
        if len(gids) != n:
            raise ValueError(f"got {len(gids)} group ids for {n} candidates; pass one group id per answer")
    return fn(values, answers, gids)
