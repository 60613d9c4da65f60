"""Rank sampled candidates with a PRM, tolerating candidates the PRM cannot read.

``mmprm_infer.rerank.rerank_batch`` rejects a whole batch when one candidate
cannot be encoded (no steps, a step tag inside the text, longer than the
model's context).  Sampled text from a policy hits these cases, and one bad
sample must not fail a request: here such a candidate gets no step rewards
and the score ``-inf``, is ranked after every scored candidate, and its
reason is reported.  Everything else is ``rerank_batch``'s behaviour: one
engine call for all items (each question's prefix shared by its
candidates), aggregation and selection by name.

Used by the vLLM wrapper, the reranking server and the step-level search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from mmprm_infer.aggregation import aggregate as aggregate_steps
from mmprm_infer.aggregation import get_aggregation
from mmprm_infer.answers import extract_answer
from mmprm_infer.engines import EncodedQuestion, Engine
from mmprm_infer.formats import FormatError
from mmprm_infer.prm import PRM, Candidate, ScoringItem
from mmprm_infer.rerank import NEEDS_NO_PRM, RerankResult, resolve_aggregate
from mmprm_infer.selection import get_strategy, select

__all__ = ["Ranking", "UNSCORED", "candidate_text", "rank_items", "rank_scored", "score_items", "finite_or_none"]

UNSCORED = float("-inf")  # the score of a candidate the PRM could not read


@dataclass
class Ranking:
    """``rerank``: a RerankResult over all candidates; ``errors``: candidate index -> why it has no score."""

    rerank: RerankResult
    errors: dict[int, str] = field(default_factory=dict)


def candidate_text(candidate: Candidate) -> str:
    return candidate if isinstance(candidate, str) else "\n\n".join(candidate)


def finite_or_none(x: float | None) -> float | None:
    """A score for JSON: ``-inf`` (unscored) becomes None."""
    return x if x is not None and math.isfinite(x) else None


def _encode(prm: PRM, item: ScoringItem) -> tuple[EncodedQuestion, list[int], dict[int, str]]:
    """Encoded valid candidates, their indices, and the reason each other candidate was left out.

    Errors about the question or the image (not about one candidate) are raised.
    """
    candidates = item.candidates
    if isinstance(candidates, str) or not isinstance(candidates, Sequence):
        raise TypeError("candidates must be a list of solutions; wrap a single one as [solution]")
    _check_question(prm, item)
    try:
        return prm.encode(item.question, candidates, item.image), list(range(len(candidates))), {}
    except (FormatError, ValueError, TypeError):
        if not isinstance(item.question, str) or len(candidates) == 0:
            raise
    # One candidate at a time; images are prepared once.
    image_tokens, image_features = prm._prepare_images(item.image)
    limit = prm.adapter.max_positions
    encoded, valid, errors = [], [], {}
    for i, cand in enumerate(candidates):
        try:
            enc = prm.format.encode(prm.tokenizer, item.question, prm.split_candidate(cand, i), image_tokens)
            if limit is not None and len(enc.input_ids) > limit:
                raise ValueError(f"candidate {i} is {len(enc.input_ids)} tokens long (question, image and steps), "
                                 f"more than the model's context of {limit} tokens")
        except (FormatError, ValueError, TypeError) as exc:
            errors[i] = str(exc)
            continue
        encoded.append(enc)
        valid.append(i)
    if not valid:
        # Nothing scorable: if the question itself is the problem, say so rather than blaming every candidate.
        prm.format.encode(prm.tokenizer, item.question, ["x"], image_tokens)
    return EncodedQuestion(encoded, image_features), valid, errors


def _check_question(prm: PRM, item: ScoringItem) -> None:
    """A question longer than the context fails once here, instead of being tokenized again for every candidate.

    Only questions of more characters than the context has tokens are tokenized here (a token spans at least
    one character, almost always), so the usual short question costs nothing extra.
    """
    limit = prm.adapter.max_positions
    if limit is None or not isinstance(item.question, str) or len(item.question) <= limit:
        return
    tokens = len(prm.tokenizer(item.question, add_special_tokens=False)["input_ids"])
    if tokens > limit:
        raise ValueError(f"the question is {tokens} tokens long, more than the model's context of {limit} tokens; "
                         "shorten the question")


def score_items(prm: PRM, items: Sequence[ScoringItem], engine: str | Engine | None = None
                ) -> tuple[list[list[list[float] | None]], list[dict[int, str]]]:
    """Step rewards per item and candidate (None where unscorable), and the per-item errors; one engine call."""
    encoded = [_encode(prm, item) for item in items]
    rewards = prm.engine(engine).score(prm.adapter, prm.columns, [e for e, _, _ in encoded])
    out = []
    for item, (_, valid, _), got in zip(items, encoded, rewards):
        per = [None] * len(item.candidates)
        for i, r in zip(valid, got):
            per[i] = r
        out.append(per)
    return out, [errors for _, _, errors in encoded]


def rank_items(prm: PRM | None, items: Sequence[ScoringItem], aggregate: str | Callable | None = None,
               strategy: str = "best_of_n", engine: str | Engine | None = None) -> list[Ranking]:
    """``rerank_batch`` that ranks unscorable candidates last instead of failing the batch."""
    get_strategy(strategy)
    aggregate = resolve_aggregate(aggregate, prm)
    get_aggregation(aggregate)
    if prm is None and strategy not in NEEDS_NO_PRM:
        raise ValueError(f"strategy {strategy!r} needs a PRM; use majority_vote without one")
    for i, item in enumerate(items):
        if len(item.candidates) == 0:
            raise ValueError(f"question {i}: candidates is empty; give at least one candidate to rank")
    if prm is None:
        return rank_scored(items, [None] * len(items), [{} for _ in items], aggregate, strategy)
    rewards, errors = score_items(prm, items, engine)
    return rank_scored(items, rewards, errors, aggregate, strategy)


def rank_scored(items: Sequence[ScoringItem], rewards: Sequence[list[list[float] | None] | None],
                errors: Sequence[dict[int, str]], aggregate: str | Callable = "min",
                strategy: str = "best_of_n") -> list[Ranking]:
    """Aggregate and select, given ``score_items``' output (``rewards[i]`` None: no PRM, majority vote)."""
    get_strategy(strategy)
    aggregation = get_aggregation(aggregate)
    agg_name = aggregate if isinstance(aggregate, str) else getattr(aggregate, "__name__", "custom")
    results = []
    for item, step_rewards, errs in zip(items, rewards, errors):
        answers = [extract_answer(candidate_text(c)) for c in item.candidates]
        if step_rewards is None:  # majority vote without a PRM
            chosen = select(strategy, None, answers)
            ranking, scores, out_rewards = list(chosen.ranking), None, None
        else:
            valid = [i for i, r in enumerate(step_rewards) if r is not None]
            scores = [aggregate_steps(r, aggregation) if r is not None else UNSCORED for r in step_rewards]
            ranking = []
            if valid:
                chosen = select(strategy, [scores[i] for i in valid], [answers[i] for i in valid])
                ranking = [valid[j] for j in chosen.ranking]
            valid_set = set(valid)
            ranking += [i for i in range(len(item.candidates)) if i not in valid_set]
            out_rewards = [r if r is not None else [] for r in step_rewards]
        best = ranking[0]
        results.append(Ranking(RerankResult(
            best_index=best, best=item.candidates[best], scores=scores, step_rewards=out_rewards,
            answers=answers, ranking=ranking, strategy=strategy, aggregate=agg_name,
        ), dict(errs)))
    return results
