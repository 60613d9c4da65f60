"""PRMBench (ssmisya/PRMBench; data/*.jsonl, HF hitsmy/PRMBench_Preview).

Record: ``modified_question``, ``modified_process`` (list of str),
``error_steps`` (1-based), ``classification`` (circular, confidence,
counterfactual, deception, domain_inconsistency, missing_condition,
redundency, step_contradiction, multi_solutions), ``idx``, and the
original question and process.  As the benchmark's own task
(``mr_eval/tasks/prmtest_classified``) does: the PRM scores the *modified*
process; a step is predicted right when its reward is > the threshold (0.5,
strict); the counts pool every step; PRMScore = (F1 of right steps + F1 of
wrong steps) / 2, overall and per classification, except
``multi_solutions``, which has no wrong steps and scores F1 of right steps
only; the three category scores are the plain mean of their classes'
PRMScores.  Records repeating a (classification, idx) pair are dropped after
the first, and error steps past the last step are ignored, both as the
official loader does; the report counts them.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmprm_infer.evaluation.data import Record, field, string_list
from mmprm_infer.evaluation.metrics import StepCounts
from mmprm_infer.prm import ScoringItem

__all__ = ["PRMBenchCase", "read_case", "metrics", "CATEGORIES"]

CATEGORIES = {
    "simplicity": ("redundency", "circular"),
    "soundness": ("counterfactual", "step_contradiction", "domain_inconsistency", "confidence"),
    "sensitivity": ("missing_condition", "deception", "multi_solutions"),
}
ONLY_RIGHT_STEPS = "multi_solutions"


@dataclass
class PRMBenchCase:
    item: ScoringItem
    error_steps: set[int]  # 0-based
    classification: str
    key: tuple[str, str]
    where: str
    out_of_range: int  # error steps past the last step


def read_case(record: Record) -> PRMBenchCase:
    question = field(record, "modified_question", str)
    steps = string_list(record, "modified_process")
    errors = field(record, "error_steps", list)
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in errors):
        raise record.error(f"field 'error_steps' must hold 1-based step numbers, got {errors!r:.80}")
    classification = field(record, "classification", str)
    key = (classification, str(record.data.get("idx", record.where)))
    inside = {e - 1 for e in errors if e <= len(steps)}
    return PRMBenchCase(ScoringItem(question, [steps]), inside, classification, key, record.where,
                        len(set(errors)) - len(inside))


def _score(counts: StepCounts, classification: str | None = None) -> float:
    return counts.f1_correct if classification == ONLY_RIGHT_STEPS else counts.macro_f1


def metrics(cases: list[PRMBenchCase], rewards: list[list[float]], threshold: float = 0.5) -> dict:
    """``{"prmscore", "by_classification": {name: {"prmscore", ...counts}}, "categories": {...}, ...}``."""
    seen: set[tuple[str, str]] = set()
    per_class: dict[str, StepCounts] = {}
    duplicates = out_of_range = 0
    for case, step_rewards in zip(cases, rewards):
        if case.key in seen:
            duplicates += 1
            continue
        seen.add(case.key)
        out_of_range += case.out_of_range
        counts = per_class.setdefault(case.classification, StepCounts())
        for k, reward in enumerate(step_rewards):
            counts.add(reward > threshold, k not in case.error_steps)
    overall = StepCounts()
    for counts in per_class.values():
        overall.merge(counts)
    by_class = {name: {"prmscore": _score(c, name), **c.as_dict()} for name, c in sorted(per_class.items())}
    categories = {}
    for category, members in CATEGORIES.items():
        scores = [by_class[m]["prmscore"] for m in members if m in by_class]
        if scores:
            categories[category] = sum(scores) / len(scores)
    return {"prmscore": overall.macro_f1, "overall": overall.as_dict(), "by_classification": by_class,
            "categories": categories, "samples": len(seen), "duplicates_dropped": duplicates,
            "error_steps_out_of_range": out_of_range}
