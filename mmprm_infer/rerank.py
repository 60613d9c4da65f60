"""rerank(): score N candidates of one question and pick the best."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from .aggregation import aggregate as aggregate_steps
from .aggregation import get_aggregation
from .answers import extract_answer
from .prm import PRM, Candidate, ScoringItem
from .selection import get_strategy, select

NEEDS_NO_PRM = {"majority_vote"}


@dataclass
class RerankResult:
    best_index: int
    best: Candidate
    scores: list[float] | None  # aggregated per candidate; None for majority_vote without a PRM
    step_rewards: list[list[float]] | None
    answers: list[str | None]
    ranking: list[int]  # candidate indices, best first
    strategy: str
    aggregate: str

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_aggregate(aggregate: str | Callable | None, prm: PRM | None) -> str | Callable:
    """``aggregate``, or when None the one the PRM's release uses (``PRMFormat.default_aggregate``:
    mean for VisualPRM, last for RLHFlow, min otherwise)."""
    if aggregate is not None:
        return aggregate
    return prm.format.default_aggregate if prm is not None else "min"


def _candidate_text(candidate: Candidate) -> str:
    return candidate if isinstance(candidate, str) else "\n\n".join(candidate)


def rerank(
    question: str,
    candidates: Sequence[Candidate],
    prm: PRM | None = None,
    image=None,
    aggregate: str | Callable | None = None,
    strategy: str = "best_of_n",
    engine: str | None = None,
) -> RerankResult:
    """Pick the best of ``candidates`` (solution strings or lists of steps).

    strategy: best_of_n (highest aggregated PRM score), weighted_vote (sum of
    scores per distinct final answer) or majority_vote (self-consistency; no
    PRM needed).  aggregate: how step rewards become a candidate's score
    (default: the PRM format's release default, ``resolve_aggregate``).
    """
    return rerank_batch([ScoringItem(question, candidates, image)], prm, aggregate, strategy, engine)[0]


def rerank_batch(
    items: Sequence[ScoringItem],
    prm: PRM | None,
    aggregate: str | Callable | None = None,
    strategy: str = "best_of_n",
    engine: str | None = None,
) -> list[RerankResult]:
    """rerank() over many questions, scoring them in one engine call."""
    get_strategy(strategy)
    aggregate = resolve_aggregate(aggregate, prm)
    aggregation = get_aggregation(aggregate)
    agg_name = aggregate if isinstance(aggregate, str) else getattr(aggregate, "__name__", "custom")
    if prm is None and strategy not in NEEDS_NO_PRM:
        raise ValueError(f"strategy {strategy!r} needs a PRM: pass prm=PRM.from_pretrained(...), or use majority_vote")
    for i, item in enumerate(items):
        if len(item.candidates) == 0:
            raise ValueError(f"question {i}: candidates is empty; give at least one candidate to rerank")
    rewards = prm.score_batch(items, engine=engine) if prm is not None else [None] * len(items)
    results = []
    for item, step_rewards in zip(items, rewards):
        answers = [extract_answer(_candidate_text(c)) for c in item.candidates]
        scores = [aggregate_steps(r, aggregation) for r in step_rewards] if step_rewards is not None else None
        chosen = select(strategy, scores, answers)
        results.append(RerankResult(
            best_index=chosen.best_index,
            best=item.candidates[chosen.best_index],
            scores=scores,
            step_rewards=step_rewards,
            answers=answers,
            ranking=list(chosen.ranking),
            strategy=strategy,
            aggregate=agg_name,
        ))
    return results
