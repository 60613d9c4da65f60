"""ProcessBench (Qwen/ProcessBench): find the earliest wrong step.

Record: ``id``, ``generator``, ``problem``, ``steps`` (list of str),
``final_answer_correct``, ``label`` (index of the earliest wrong step, -1 when
every step is right).  The PRM scores the steps as one solution to
``problem``; the prediction is the first step whose reward is below the
threshold, else -1.  Per split: ``acc_error`` (exact match on the cases with
an error), ``acc_correct`` (cases without one, predicted -1) and ``f1``, their
harmonic mean -- ProcessBench's run_eval scripts compute the same three from
the same predictions; ``average_f1`` is the mean of the splits' F1, as the
paper's "Avg. F1" column.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmprm_infer.evaluation.data import Record, field, string_list
from mmprm_infer.evaluation.metrics import first_error_index, step_error_f1
from mmprm_infer.prm import ScoringItem

__all__ = ["ProcessBenchCase", "read_case", "split_metrics"]


@dataclass
class ProcessBenchCase:
    item: ScoringItem
    label: int
    id: str | None
    where: str


def read_case(record: Record) -> ProcessBenchCase:
    problem = field(record, "problem", str)
    steps = string_list(record, "steps")
    label = field(record, "label", int)
    if not -1 <= label < len(steps):
        raise record.error(f"field 'label' is {label}, but there are {len(steps)} steps (-1 means all right)")
    return ProcessBenchCase(ScoringItem(problem, [steps]), label, record.data.get("id"), record.where)


def split_metrics(cases: list[ProcessBenchCase], rewards: list[list[float]], threshold: float) -> dict:
    """``{acc_error, acc_correct, f1, n, num_error, num_correct}`` for one split (one reward list per case)."""
    m = step_error_f1(rewards, [c.label for c in cases], threshold)
    return {"acc_error": m["acc_error"], "acc_correct": m["acc_correct"], "f1": m["f1"], "n": m["num_cases"],
            "num_error": m["num_error"], "num_correct": m["num_correct"]}


def predictions(rewards: list[list[float]], threshold: float) -> list[int]:
    return [first_error_index(r, threshold) for r in rewards]
