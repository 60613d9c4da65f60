"""Best-of-N accuracy against N, from scored candidates (no model here).

For every question with candidates c_1..c_M, and every n in ``ns`` (n <= M),
each method picks one candidate from a subset of n candidates; the question's
accuracy at n is the mean over subsets: every subset when there are at most
``subsets`` of them (exact), else ``subsets`` random ones (seeded, so reruns
agree).  Methods, all through the library's own selection
(``mmprm_infer.selection``, the code `rerank()` runs):

- ``best_of_n/<agg>``: the highest aggregated PRM score (first on ties);
- ``weighted_vote/<agg>``: the answer group with the largest summed score;
- ``majority``: the largest answer group (self-consistency);
- ``random``: the mean correctness of the subset (a uniform pick);
- ``pass``: any candidate of the subset right (pass@n);
- with ``tie_split=True`` also ``majority_tie_split`` and ``weighted_vote_tie_split/<agg>``: the
  same votes as a statistic rather than a selection -- a tie between answer groups is split evenly
  (a uniform pick among the tied answers), so a vote of two different answers at n = 2 scores 1/2
  instead of favouring the first candidate.

``groups="disjoint"`` cuts the M candidates into M / n consecutive groups instead of drawing
subsets: each candidate counts once at every n (the synthetic recipe's reports).

Answer groups come from ``answers.group_answers`` over all M candidates (the
math-aware equivalence); a candidate is right when its answer matches the gold
one (``matches_gold``: multiple-choice letters compared as letters).  The
overall accuracy is the mean over questions, with a 95 % band of
1.96 x the standard error over questions.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from mmprm_infer.aggregation import aggregate
from mmprm_infer.answers import answers_equivalent, extract_answer, group_answers, has_answer
from mmprm_infer.selection import select

__all__ = ["BonQuestion", "matches_gold", "default_ns", "question_accuracy", "accuracy_curves", "METHODS_WITHOUT_PRM"]

METHODS_WITHOUT_PRM = ("majority", "random", "pass")
_CHOICE_RE = re.compile(r"^\s*\(?\s*([A-Za-z])\s*\)?\s*(?:[.:)]\s*.*)?$", re.S)


def _choice_letter(answer: str | None) -> str | None:
    """The letter of a multiple-choice answer: "B", "(B)", "B.", "B: 12", "(b) 12"; else None."""
    if not answer:
        return None
    text = re.sub(r"^\\text\{(.*)\}$", r"\1", answer.strip())
    m = _CHOICE_RE.match(text)
    return m.group(1).upper() if m else None


def matches_gold(answer: str | None, gold: str) -> bool:
    """Whether a candidate's final answer is the gold answer: for a gold letter (a multiple-choice
    question) the letters are compared, else ``answers.answers_equivalent``."""
    gold = str(gold).strip()
    if re.fullmatch(r"\(?[A-Za-z]\)?", gold):
        return _choice_letter(answer) == gold.strip("()").upper()
    return answers_equivalent(answer, gold)


@dataclass
class BonQuestion:
    """One question's candidates, scored: ``step_rewards[i]`` per candidate."""

    answers: list[str | None]
    correct: list[bool]
    step_rewards: list[list[float]] | None = None
    category: str | None = None
    group_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_candidates(cls, candidates: Sequence[str | Sequence[str]], gold: str,
                        step_rewards: list[list[float]] | None = None, category: str | None = None) -> BonQuestion:
        texts = [c if isinstance(c, str) else "\n\n".join(c) for c in candidates]
        answers = [extract_answer(t) for t in texts]
        return cls(answers, [matches_gold(a, gold) for a in answers], step_rewards, category, group_answers(answers))


def default_ns(max_n: int) -> list[int]:
    """1, 2, 4, ... up to ``max_n``, and ``max_n`` itself."""
    ns = [1 << k for k in range(max_n.bit_length()) if 1 << k <= max_n]
    return ns if ns[-1] == max_n else [*ns, max_n]


GROUPINGS = ("subsets", "disjoint")


def _subsets(m: int, n: int, count: int, rng: random.Random, groups: str = "subsets") -> list[tuple[int, ...]]:
    if groups == "disjoint":
        return [tuple(range(g * n, (g + 1) * n)) for g in range(m // n)]
    if math.comb(m, n) <= count:
        return list(itertools.combinations(range(m), n))
    return [tuple(sorted(rng.sample(range(m), n))) for _ in range(count)]


def _pick(strategy: str, scores: list[float] | None, q: BonQuestion, idx: tuple[int, ...]) -> bool:
    chosen = select(strategy, None if scores is None else [scores[i] for i in idx], [q.answers[i] for i in idx],
                    [q.group_ids[i] for i in idx]).best_index
    return q.correct[idx[chosen]]


def _tie_split_vote(weights: Sequence[float], q: BonQuestion, idx: tuple[int, ...]) -> float:
    """Expected correctness of the answer group with the largest total weight, a tie split evenly; candidates
    without an answer do not vote, and a subset where none answered is a uniform pick."""
    totals: dict[int, float] = defaultdict(float)
    for i in idx:
        if has_answer(q.answers[i]):
            totals[q.group_ids[i]] += weights[i]
    if not totals:
        return sum(q.correct[i] for i in idx) / len(idx)
    top = max(totals.values())
    winners = [g for g, w in totals.items() if math.isclose(w, top, rel_tol=1e-12, abs_tol=1e-12)]
    right = {q.group_ids[i] for i in idx if q.correct[i]}
    return sum(g in right for g in winners) / len(winners)


def question_accuracy(q: BonQuestion, ns: Sequence[int], aggregations: Sequence[str], subsets: int = 256,
                      seed: int = 0, *, groups: str = "subsets",
                      tie_split: bool = False) -> dict[str, dict[int, float]]:
    """``{method: {n: accuracy}}`` for one question (see the module docstring)."""
    if groups not in GROUPINGS:
        raise ValueError(f"groups must be one of {GROUPINGS}, got {groups!r}")
    m = len(q.correct)
    if groups == "disjoint" and any(m % n for n in ns if n <= m):
        raise ValueError(f"groups='disjoint' needs every n to divide the {m} candidates; got ns={list(ns)}")
    scores = {agg: [aggregate(r, agg) for r in q.step_rewards] for agg in aggregations} if q.step_rewards else {}
    out: dict[str, dict[int, float]] = {}
    rng = random.Random(seed)
    for n in ns:
        if n > m:
            continue
        chosen = _subsets(m, n, subsets, rng, groups)
        hits: dict[str, float] = defaultdict(float)
        for idx in chosen:
            hits["random"] += sum(q.correct[i] for i in idx) / n
            hits["pass"] += any(q.correct[i] for i in idx)
            hits["majority"] += _pick("majority_vote", None, q, idx)
            if tie_split:
                hits["majority_tie_split"] += _tie_split_vote([1.0] * m, q, idx)
            for agg, s in scores.items():
                hits[f"best_of_n/{agg}"] += _pick("best_of_n", s, q, idx)
                if min(s) >= 0:  # a vote needs probability-like scores (not log-probabilities)
                    hits[f"weighted_vote/{agg}"] += _pick("weighted_vote", s, q, idx)
                    if tie_split:
                        hits[f"weighted_vote_tie_split/{agg}"] += _tie_split_vote(s, q, idx)
        for method, h in hits.items():
            out.setdefault(method, {})[n] = h / len(chosen)
    return out


def _mean_and_band(values: list[float]) -> tuple[float, float]:
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, 1.96 * math.sqrt(var / len(values))


def accuracy_curves(questions: Sequence[BonQuestion], aggregations: Sequence[str], ns: Sequence[int] | None = None,
                    subsets: int = 256, seed: int = 0, *, groups: str = "subsets", tie_split: bool = False) -> dict:
    """``{"ns", "accuracy": {method: {n: mean}}, "band": {method: {n: half-width}}, "questions",
    "by_category": {cat: {"accuracy", "band", "questions"}}}``; ``ns`` defaults to
    ``default_ns`` of the smallest candidate count, so every question counts at every n."""
    if not questions:
        raise ValueError("no questions to evaluate")
    ns = list(ns or default_ns(min(len(q.correct) for q in questions)))
    per_q = [question_accuracy(q, ns, aggregations, subsets, seed + i, groups=groups, tie_split=tie_split)
             for i, q in enumerate(questions)]

    def summarise(rows: list[dict]) -> dict:
        acc: dict[str, dict[str, float]] = {}
        band: dict[str, dict[str, float]] = {}
        for method in sorted({k for r in rows for k in r}):
            for n in ns:
                values = [r[method][n] for r in rows if n in r.get(method, {})]
                if values:
                    acc.setdefault(method, {})[str(n)], band.setdefault(method, {})[str(n)] = _mean_and_band(values)
        return {"accuracy": acc, "band": band, "questions": len(rows)}

    report = {"ns": ns, **summarise(per_q)}
    categories = sorted({q.category for q in questions if q.category is not None})
    report["by_category"] = {c: summarise([r for r, q in zip(per_q, questions) if q.category == c])
                             for c in categories}
    return report
