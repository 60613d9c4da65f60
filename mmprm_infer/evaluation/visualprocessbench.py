"""VisualProcessBench (VisualPRM; OpenGVLab/VisualProcessBench, test.jsonl + images).

Record: ``image`` (list of paths), ``question``, ``answer``, ``response``
(``steps``: list of str, ``process_correctness``: 1 right, 0 neutral, -1
wrong, one per step), ``policy_model``, ``data_source``.  The PRM scores the
benchmark's own steps with the images (no re-splitting, no merging); a step is
predicted right when its reward is >= the threshold (0.5).  Metric, as the
benchmark's authors compute it (VisualPRM blog, and their evaluation code in
a VLMEvalKit fork, ``vl_prmbenchmark.py``): neutral steps are left out; the
confusion counts are pooled over all steps; the score is the mean of the F1 of
right steps and the F1 of wrong steps.  Overall pools every step (it is not
the mean of the sources); each ``data_source`` pools its own steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mmprm_infer.evaluation.data import Record, field, string_list
from mmprm_infer.evaluation.metrics import StepCounts
from mmprm_infer.prm import ScoringItem

__all__ = ["VisualProcessBenchCase", "read_case", "metrics"]


@dataclass
class VisualProcessBenchCase:
    item: ScoringItem
    labels: list[int]  # 1 right, 0 neutral, -1 wrong
    source: str
    where: str


def read_case(record: Record, images: list[str] | None) -> VisualProcessBenchCase:
    response = field(record, "response", (dict, str))
    if isinstance(response, str):  # the dataset card declares it a string; the file holds an object
        try:
            response = json.loads(response)
        except json.JSONDecodeError:
            raise record.error("field 'response' is a string that is not JSON") from None
        record = Record({**record.data, "response": response}, record.where)
    steps = string_list(record, "response.steps")
    labels = field(record, "response.process_correctness", list)
    if len(labels) != len(steps) or not all(v in (1, 0, -1) and not isinstance(v, bool) for v in labels):
        raise record.error(f"field 'response.process_correctness' must hold one of 1, 0, -1 per step "
                           f"({len(steps)} steps, got {labels!r:.80})")
    question = field(record, "question", str)
    source = str(record.data.get("data_source", "unknown"))
    return VisualProcessBenchCase(ScoringItem(question, [steps], images), [int(v) for v in labels], source,
                                  record.where)


def metrics(cases: list[VisualProcessBenchCase], rewards: list[list[float]], threshold: float = 0.5) -> dict:
    """``{"overall": {...}, "by_source": {source: {...}}, "neutral_steps": n}`` (see the module docstring)."""
    by_source: dict[str, StepCounts] = {}
    neutral = 0
    for case, step_rewards in zip(cases, rewards):
        counts = by_source.setdefault(case.source, StepCounts())
        for reward, label in zip(step_rewards, case.labels):
            if label == 0:
                neutral += 1
                continue
            counts.add(reward >= threshold, label == 1)
    overall = StepCounts()
    for counts in by_source.values():
        overall.merge(counts)
    return {"overall": overall.as_dict(), "by_source": {s: c.as_dict() for s, c in sorted(by_source.items())},
            "neutral_steps": neutral}
