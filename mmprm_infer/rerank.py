"""rerank(): score N candidates of one question and pick the best."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from mmprm_infer.aggregation import aggregate as aggregate_steps
from mmprm_infer.aggregation import get_aggregation
from mmprm_infer.answers import extract_answer
from mmprm_infer.engines import Engine
from mmprm_infer.prm import PRM, Candidate, ScoringItem
from mmprm_infer.selection import get_strategy, select

NEEDS_NO_PRM = {"majority_vote"}
UNSCORED = float("-inf")  # the score of a candidate the PRM could not read (unreadable="last")


@dataclass
class RerankResult:
    best_index: int
    best: Candidate
    scores: list[float] | None  # aggregated per candidate; None for majority_vote without a PRM
    step_rewards: list[list[float]] | None
    answers: list[str | None]
    ranking: list[int]  # candidate indices, best first
    strategy: str
    aggregate: str | None  # None when no PRM ran (majority vote without a PRM)
    errors: dict[int, str] = field(default_factory=dict)  # unreadable="last": candidate index -> why it has no score

    def to_dict(self) -> dict:
        out = asdict(self)
        if not self.errors:  # only candidates left unscored have one
            del out["errors"]
        return out


def resolve_aggregate(aggregate: str | Callable | None, prm: PRM | None) -> str | Callable:
    """``aggregate``, or when None the one the PRM's release uses (``PRMFormat.default_aggregate``:
    mean for VisualPRM, last for RLHFlow, min otherwise)."""
    if aggregate is not None:
        return aggregate
    return prm.format.default_aggregate if prm is not None else "min"


def candidate_text(candidate: Candidate) -> str:
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
    engine: str | Engine | None = None,
    *,
    unreadable: str = "raise",
) -> list[RerankResult]:
    """rerank() over many questions, scoring them in one engine call.

    unreadable="last": a candidate the PRM cannot read (no steps, a step tag inside its text, longer than the
    model's context: sampled text hits these) does not fail the batch; it gets no step rewards and the score
    ``-inf``, is ranked after every scored candidate, and ``RerankResult.errors`` says why.
    """
    if unreadable not in ("raise", "last"):
        raise ValueError(f"unreadable must be 'raise' or 'last', got {unreadable!r}")
    get_strategy(strategy)
    aggregate = resolve_aggregate(aggregate, prm)
    get_aggregation(aggregate)
    if prm is None and strategy not in NEEDS_NO_PRM:
        raise ValueError(f"strategy {strategy!r} needs a PRM: pass prm=PRM.from_pretrained(...), or use majority_vote")
    for i, item in enumerate(items):
        if len(item.candidates) == 0:
            raise ValueError(f"question {i}: candidates is empty; give at least one candidate to rerank")
    errors = None
    rewards: Sequence[list[list[float]] | list[list[float] | None] | None]
    if prm is None:
        rewards = [None] * len(items)
    elif unreadable == "last":
        rewards, errors = prm.score_readable(items, engine=engine)
    else:
        rewards = prm.score_batch(items, engine=engine)
    return rank_scored(items, rewards, errors, aggregate, strategy)


def rank_scored(
    items: Sequence[ScoringItem],
    rewards: Sequence[Sequence[list[float] | None] | None],
    errors: Sequence[dict[int, str]] | None = None,
    aggregate: str | Callable = "min",
    strategy: str = "best_of_n",
) -> list[RerankResult]:
    """Aggregate and select, given step rewards per item and candidate (``PRM.score_batch`` or
    ``PRM.score_readable``): ``rewards[i]`` None means no PRM (majority vote); a candidate's None means the PRM
    could not read it (``errors[i]`` says why), and it is ranked last with the score ``-inf``."""
    get_strategy(strategy)
    aggregation = get_aggregation(aggregate)
    agg_name = aggregate if isinstance(aggregate, str) else getattr(aggregate, "__name__", "custom")
    results = []
    for k, (item, step_rewards) in enumerate(zip(items, rewards)):
        answers = [extract_answer(candidate_text(c)) for c in item.candidates]
        if step_rewards is None:  # majority vote without a PRM
            valid, scores = list(range(len(item.candidates))), None
        else:
            valid = [i for i, r in enumerate(step_rewards) if r is not None]
            scores = [aggregate_steps(r, aggregation) if r is not None else UNSCORED for r in step_rewards]
            if len(valid) < len(step_rewards):
                step_rewards = [r if r is not None else [] for r in step_rewards]
        ranking, best = list(range(len(item.candidates))), 0  # nothing readable: input order
        if valid:
            chosen = select(strategy, [scores[i] for i in valid] if scores is not None else None,
                            [answers[i] for i in valid])
            unread = sorted(set(ranking) - set(valid))
            ranking, best = [valid[j] for j in chosen.ranking] + unread, valid[chosen.best_index]
        results.append(RerankResult(
            best_index=best,
            best=item.candidates[best],
            scores=scores,
            # no None left: a candidate the PRM could not read got [] above
            step_rewards=step_rewards,  # type: ignore[arg-type]
            answers=answers,
            ranking=ranking,
            strategy=strategy,
            aggregate=agg_name if step_rewards is not None else None,
            errors=dict(errors[k]) if errors is not None else {},
        ))
    return results
