"""Step-error metrics of a PRM on labelled solutions (plain functions, no model).

ProcessBench-style first-error metric (``step_error_f1``): every case is a
solution with per-step rewards (the PRM's prediction) and per-step labels.

- predicted first error: the first step whose reward is ``< threshold``
  (default 0.5), or -1 when no step falls below it;
- true first error: the first step whose label is ``< label_threshold``
  (default 0.5), or -1 when none; a label may also be given directly as the
  first-error index (an ``int``, ProcessBench's ``label`` field, -1 = all
  steps right).  With hard labels in {0, 1} or {-1, +1} the default rule is
  "label <= 0"; with soft Monte-Carlo labels it calls a step wrong when fewer
  than half of its rollouts reached the right answer.  To use MM-PRM's data
  rule instead (a step is wrong only when MC == 0), pass a tiny
  ``label_threshold`` such as 1e-6.
- acc_error: exact-match accuracy of the predicted first error on the cases
  that have a wrong step (ProcessBench acc1); acc_correct: fraction of the
  all-right cases where no step is predicted wrong (acc2); f1: their
  harmonic mean, 0.0 when both are 0.

``step_macro_f1`` is VisualProcessBench's per-step metric: macro F1 over the
two classes (correct / incorrect) of every labelled step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

__all__ = ["first_error_index", "step_error_f1", "step_macro_f1", "StepCounts"]


def first_error_index(values: Sequence[float], threshold: float = 0.5) -> int:
    """Index of the first value below ``threshold``, or -1 when there is none."""
    for i, v in enumerate(values):
        if v < threshold:
            return i
    return -1


def _is_index(label) -> bool:
    """A first-error index: any integer (numpy's too, as Parquet/pandas give them), not a bool."""
    return isinstance(label, numbers.Integral) and not isinstance(label, bool)


def _true_first_error(label, label_threshold: float, case: int) -> int:
    if isinstance(label, bool) or type(label).__name__ in ("bool_", "bool"):  # numpy's bool is no int subclass
        raise TypeError(f"case {case}: label is a bool; give per-step labels (a list) or a first-error index")
    if _is_index(label):
        label = int(label)
        if label < -1:
            raise ValueError(f"case {case}: first-error index {label} is below -1 (-1 means all steps right)")
        return label
    return first_error_index([float(v) for v in label], label_threshold)


def _check_lengths(predictions: Sequence, labels: Sequence) -> None:
    if len(predictions) != len(labels):
        raise ValueError(f"got {len(predictions)} predictions but {len(labels)} labels; give one of each per case")


def step_error_f1(
    predictions: Sequence[Sequence[float]],
    labels: Sequence[Sequence[float] | int],
    threshold: float = 0.5,
    label_threshold: float = 0.5,
) -> dict:
    """ProcessBench metric over cases: acc on wrong cases, acc on right cases, F1.

    ``predictions[i]`` holds the step rewards of case i; ``labels[i]`` its step
    labels (same length) or its first-error index (-1 = all right).  Returns
    ``{"f1", "acc_error", "acc_correct", "num_error", "num_correct", "num_cases"}``;
    an accuracy over zero cases is ``nan`` (and then f1 is ``nan`` too).
    """
    _check_lengths(predictions, labels)
    hit_error = hit_correct = num_error = num_correct = 0
    for i, (pred, label) in enumerate(zip(predictions, labels)):
        pred = [float(v) for v in pred]
        truth = _true_first_error(label, label_threshold, i)
        # not an index (checked above): a sequence of labels
        if not _is_index(label) and len(label) != len(pred):  # type: ignore[arg-type]
            raise ValueError(f"case {i}: {len(pred)} step rewards but {len(label)} step labels; they must match")  # type: ignore[arg-type]
        if truth >= len(pred):
            raise ValueError(f"case {i}: first-error index {truth} but only {len(pred)} steps were scored")
        guess = first_error_index(pred, threshold)
        if truth == -1:
            num_correct += 1
            hit_correct += guess == -1
        else:
            num_error += 1
            hit_error += guess == truth
    acc_error = hit_error / num_error if num_error else math.nan
    acc_correct = hit_correct / num_correct if num_correct else math.nan
    if math.isnan(acc_error) or math.isnan(acc_correct):
        f1 = math.nan
    elif acc_error + acc_correct == 0:
        f1 = 0.0
    else:
        f1 = 2 * acc_error * acc_correct / (acc_error + acc_correct)
    return {
        "f1": f1,
        "acc_error": acc_error,
        "acc_correct": acc_correct,
        "num_error": num_error,
        "num_correct": num_correct,
        "num_cases": num_error + num_correct,
    }


def step_macro_f1(
    predictions: Sequence[Sequence[float]],
    labels: Sequence[Sequence[float]],
    threshold: float = 0.5,
    label_threshold: float = 0.5,
) -> dict:
    """Per-step macro F1 of correct (reward/label >= threshold) vs incorrect steps.

    Returns ``{"macro_f1", "f1_correct", "f1_incorrect", "step_accuracy", "num_steps"}``.
    A class that never occurs in either labels or predictions gets F1 = nan
    and is left out of the macro average.
    """
    _check_lengths(predictions, labels)
    tp = fp = fn = tn = 0  # "positive" = correct step
    for i, (pred, label) in enumerate(zip(predictions, labels)):
        if len(pred) != len(label):
            raise ValueError(f"case {i}: {len(pred)} step rewards but {len(label)} step labels; they must match")
        for p, y in zip(pred, label):
            good_pred, good_true = float(p) >= threshold, float(y) >= label_threshold
            tp += good_pred and good_true
            fp += good_pred and not good_true
            fn += (not good_pred) and good_true
            tn += (not good_pred) and not good_true

    def f1(a: int, b: int, c: int) -> float:  # true hits, false alarms, misses
        return 2 * a / (2 * a + b + c) if (2 * a + b + c) else math.nan

    f1_correct, f1_incorrect = f1(tp, fp, fn), f1(tn, fn, fp)
    present = [v for v in (f1_correct, f1_incorrect) if not math.isnan(v)]
    total = tp + fp + fn + tn
    return {
        "macro_f1": sum(present) / len(present) if present else math.nan,
        "f1_correct": f1_correct,
        "f1_incorrect": f1_incorrect,
        "step_accuracy": (tp + tn) / total if total else math.nan,
        "num_steps": total,
    }


class StepCounts:
    """Step-level confusion counts, "positive" = a correct step; pooled (micro) over every step added.

    The two per-class F1 scores and their mean are the per-step metric of VisualProcessBench
    (VisualPRM) and PRMBench ("PRMScore"); a class with no steps in truth and prediction has F1
    nan (the official scripts give -1 or divide by zero there)."""

    def __init__(self) -> None:
        self.tp = self.fp = self.fn = self.tn = 0

    def add(self, predicted_correct: bool, truly_correct: bool) -> None:
        if truly_correct:
            self.tp += predicted_correct
            self.fn += not predicted_correct
        else:
            self.fp += predicted_correct
            self.tn += not predicted_correct

    def merge(self, other: StepCounts) -> StepCounts:
        for name in ("tp", "fp", "fn", "tn"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    @staticmethod
    def _f1(hits: int, false_alarms: int, misses: int) -> float:
        return 2 * hits / (2 * hits + false_alarms + misses) if hits + false_alarms + misses else math.nan

    @property
    def f1_correct(self) -> float:
        return self._f1(self.tp, self.fp, self.fn)

    @property
    def f1_incorrect(self) -> float:
        return self._f1(self.tn, self.fn, self.fp)

    @property
    def macro_f1(self) -> float:
        return (self.f1_correct + self.f1_incorrect) / 2

    def as_dict(self) -> dict:
        return {"macro_f1": self.macro_f1, "f1_correct": self.f1_correct, "f1_incorrect": self.f1_incorrect,
                "steps": self.tp + self.fp + self.fn + self.tn, "tp": self.tp, "fp": self.fp, "fn": self.fn,
                "tn": self.tn}
