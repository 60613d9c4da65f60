"""Step-labelled PRM training samples and the file layouts they travel in.

``StepSample``: a question (with its images), a solution split into steps,
and one label per step (a soft MC value in [0, 1], or a hard 0/1).

Layouts, each read and written here:

- ``"mm-prm"``: MM-PRM's training JSONL (InternVL chat-data style)::

      {"id": 0, "image": "img.png",
       "conversations": [
         {"from": "human", "value": "Question: Q\\nProcess: s1<prm>\\n\\ns2<prm>"},
         {"from": "gpt", "value": [0.75, 0.0]}]}

  Each step ends with ``<prm>``; steps are joined by ``"\\n\\n"`` (MM-PRM's
  traverse writes ``step<prm>\\n\\n`` and strips the end); ``value`` of the
  gpt turn is the label list, one per ``<prm>``.  ``image`` is a path or a
  list of paths, absent for text-only samples.  MM-PRM's trainer prepends
  ``<image>\\n`` itself when missing; a leading ``<image>`` is dropped on
  reading.
- ``"mm-prm-traverse"``: MM-PRM's intermediate JSON list from its traverse
  step (``question``, ``answer``, ``image_path``, ``process``, ``labels``).
- ``"visualprm"``: VisualPRM400K's annotation JSONL::

      {"image": ["img.png"], "question": Q, "answer": A, "response": "s1\\n\\ns2",
       "steps_with_score": [{"step": "s1", "score": 0.75}, {"step": "s2", "score": 0.0}]}

- ``"stepwise"``: TRL's stepwise-supervision layout (also what OpenRLHF
  users convert from)::

      {"prompt": Q, "completions": ["s1", "s2"], "labels": [0.75, 0.0], "images": ["img.png"]}

  TRL's PRMTrainer wants boolean labels: ``hard_threshold=0.0`` writes
  ``label > 0`` as booleans; booleans read back as 1.0 / 0.0.

``load_samples(path)`` recognises the layout from the first record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmprm_infer.io.data import DataError, read_records
from mmprm_infer.io.files import atomic_output

__all__ = [
    "StepSample",
    "PRM_TAG",
    "LAYOUTS",
    "to_mmprm_record",
    "from_mmprm_record",
    "to_visualprm_record",
    "from_visualprm_record",
    "to_stepwise_record",
    "from_stepwise_record",
    "to_mmprm_traverse_record",
    "from_mmprm_traverse_record",
    "save_samples",
    "load_samples",
    "detect_layout",
    "DatasetFormatError",
]

PRM_TAG = "<prm>"
LAYOUTS = ("mm-prm", "mm-prm-traverse", "visualprm", "stepwise")


class DatasetFormatError(ValueError):
    """A record does not fit the layout it is read as."""


@dataclass
class StepSample:
    """One labelled solution: ``labels[i]`` scores ``steps[i]`` (MC value or 0/1)."""

    question: str
    steps: list[str]
    labels: list[float]
    image_paths: list[str] = field(default_factory=list)
    answer: str | None = None
    id: str | None = None

    def __post_init__(self):
        if isinstance(self.image_paths, (str, os.PathLike)):
            self.image_paths = [os.fspath(self.image_paths)]
        self.image_paths = [os.fspath(p) for p in (self.image_paths or [])]
        self.steps = list(self.steps)
        self.labels = [float(x) for x in self.labels]
        if len(self.steps) != len(self.labels):
            raise ValueError(f"sample {self.id or self.question[:40]!r}: {len(self.steps)} steps but "
                             f"{len(self.labels)} labels; give one label per step")
        if not self.steps:
            raise ValueError(f"sample {self.id or self.question[:40]!r} has no steps")

    @property
    def image_path(self) -> str | None:
        """The first image's path (None for text-only)."""
        return self.image_paths[0] if self.image_paths else None

    def hard_labels(self, threshold: float = 0.0) -> list[float]:
        return [1.0 if x > threshold else 0.0 for x in self.labels]


def _images_value(paths: list[str]) -> Any:
    return paths[0] if len(paths) == 1 else list(paths)


def _as_paths(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def _check_steps(sample: StepSample, tag: str | None = PRM_TAG) -> None:
    for i, s in enumerate(sample.steps):
        if not s.strip():
            raise DatasetFormatError(f"sample {sample.id or sample.question[:40]!r}: step {i} is blank")
        if tag and tag in s:
            raise DatasetFormatError(f"sample {sample.id or sample.question[:40]!r}: step {i} contains the "
                                     f"step tag {tag!r}, which would shift every label after it")


# --- MM-PRM ------------------------------------------------------------------

def mmprm_process(steps: Sequence[str]) -> str:
    """Steps as MM-PRM's ``process``: each step + ``<prm>``, joined by blank lines."""
    return "\n\n".join(s.strip() + PRM_TAG for s in steps)


def to_mmprm_record(sample: StepSample, index: int = 0) -> dict[str, Any]:
    _check_steps(sample)
    rec: dict[str, Any] = {"id": sample.id if sample.id is not None else index}
    if sample.image_paths:
        rec["image"] = _images_value(sample.image_paths)
    rec["conversations"] = [
        {"from": "human", "value": f"Question: {sample.question}\nProcess: {mmprm_process(sample.steps)}"},
        {"from": "gpt", "value": list(sample.labels)},
    ]
    return rec


def _split_process(process: str) -> list[str]:
    parts = process.split(PRM_TAG)
    if parts and not parts[-1].strip():
        parts = parts[:-1]
    return [p.strip() for p in parts]


def from_mmprm_record(rec: dict[str, Any]) -> StepSample:
    try:
        conv = rec["conversations"]
        human = next(t for t in conv if t.get("from") == "human")["value"]
        labels = next(t for t in conv if t.get("from") == "gpt")["value"]
    except (KeyError, StopIteration, TypeError) as e:
        raise DatasetFormatError(f"field 'conversations' must hold a human and a gpt turn, each with 'value' "
                                 f"({type(e).__name__}: {e})") from e
    text = human
    while text.startswith("<image>"):
        text = text[len("<image>"):].lstrip("\n")
    if not text.startswith("Question: ") or "\nProcess: " not in text:
        raise DatasetFormatError(f"MM-PRM human turn is not 'Question: ...\\nProcess: ...': {text[:120]!r}")
    question, process = text[len("Question: "):].split("\nProcess: ", 1)
    steps = _split_process(process)
    if len(steps) != len(labels):
        raise DatasetFormatError(f"MM-PRM record {rec.get('id')}: {len(steps)} <prm> steps but {len(labels)} labels")
    rid = rec.get("id")
    return StepSample(question, steps, labels, _as_paths(rec.get("image")), id=None if rid is None else str(rid))


def to_mmprm_traverse_record(sample: StepSample) -> dict[str, Any]:
    _check_steps(sample)
    return {"question": sample.question, "answer": sample.answer, "image_path": _images_value(sample.image_paths)
            if sample.image_paths else None, "process": mmprm_process(sample.steps), "labels": list(sample.labels)}


def from_mmprm_traverse_record(rec: dict[str, Any]) -> StepSample:
    steps = _split_process(rec["process"])
    if len(steps) != len(rec["labels"]):
        raise DatasetFormatError(f"traverse record: {len(steps)} <prm> steps but {len(rec['labels'])} labels")
    return StepSample(rec["question"], steps, rec["labels"], _as_paths(rec.get("image_path")), rec.get("answer"))


# --- VisualPRM ---------------------------------------------------------------

def to_visualprm_record(sample: StepSample) -> dict[str, Any]:
    _check_steps(sample, tag=None)
    rec: dict[str, Any] = {"image": list(sample.image_paths), "question": sample.question,
                           "answer": sample.answer, "response": "\n\n".join(sample.steps),
                           "steps_with_score": [{"step": s, "score": x} for s, x in zip(sample.steps, sample.labels)]}
    if sample.id is not None:
        rec["id"] = sample.id
    return rec


def from_visualprm_record(rec: dict[str, Any]) -> StepSample:
    try:
        sws = rec["steps_with_score"]
        steps = [s["step"] for s in sws]
        scores = [s["score"] for s in sws]
    except (KeyError, TypeError) as e:
        raise DatasetFormatError(f"field 'steps_with_score' must be a list of {{step, score}} objects "
                                 f"({type(e).__name__}: {e})") from e
    rid = rec.get("id")
    return StepSample(rec.get("question", ""), steps, scores, _as_paths(rec.get("image")), rec.get("answer"),
                      None if rid is None else str(rid))


# --- TRL stepwise --------------------------------------------------------------

STEPWISE_SOFT_KEY = "soft_labels"  # soft MC values, under their own name: TRL reads "labels" with int()


def to_stepwise_record(sample: StepSample, hard_threshold: float = 0.0, soft: bool = False) -> dict[str, Any]:
    """TRL's stepwise layout: ``labels`` are bools, True when MC > ``hard_threshold`` (0: a step
    is right when any rollout from it reached the answer, Math-Shepherd's rule).  ``soft=True``
    writes the MC values instead, under ``soft_labels``, so a trainer that expects bools fails
    loudly rather than truncating 0.75 to 0."""
    _check_steps(sample, tag=None)
    rec: dict[str, Any] = {"prompt": sample.question, "completions": list(sample.steps)}
    if soft:
        rec[STEPWISE_SOFT_KEY] = list(sample.labels)
    else:
        rec["labels"] = [x > hard_threshold for x in sample.labels]
    if sample.image_paths:
        rec["images"] = list(sample.image_paths)
    if sample.answer is not None:
        rec["answer"] = sample.answer
    if sample.id is not None:
        rec["id"] = sample.id
    return rec


def from_stepwise_record(rec: dict[str, Any]) -> StepSample:
    try:
        raw = rec[STEPWISE_SOFT_KEY] if STEPWISE_SOFT_KEY in rec else rec["labels"]
        labels = [float(x) for x in raw]  # bool -> 1.0 / 0.0
        return StepSample(rec["prompt"], rec["completions"], labels, _as_paths(rec.get("images", rec.get("image"))),
                          rec.get("answer"), None if rec.get("id") is None else str(rec["id"]))
    except KeyError as e:
        raise DatasetFormatError(f"missing field {e.args[0]!r}: a stepwise record needs prompt, completions, labels "
                                 f"(or {STEPWISE_SOFT_KEY})") from e


# --- files -------------------------------------------------------------------

def detect_layout(rec: dict[str, Any]) -> str:
    if "conversations" in rec:
        return "mm-prm"
    if "steps_with_score" in rec:
        return "visualprm"
    if "completions" in rec and "prompt" in rec:
        return "stepwise"
    if "process" in rec and "labels" in rec:
        return "mm-prm-traverse"
    raise DatasetFormatError(f"unknown sample layout with keys {sorted(rec)}; known: {', '.join(LAYOUTS)}")


def _relative_to(paths: list[str], folder: Path) -> list[str]:
    """Image paths that are valid from the working directory, rewritten relative to ``folder``."""
    return [os.path.relpath(os.path.abspath(p), os.path.abspath(folder)) for p in paths]


def save_samples(samples: Iterable[StepSample], path: str | os.PathLike, format: str = "mm-prm", *,
                 hard_threshold: float | None = None, soft_labels: bool = False,
                 images_from_cwd: bool = False) -> int:
    """Write samples; JSONL except ``mm-prm-traverse`` (one JSON list, as MM-PRM).
    ``hard_threshold``: labels become 1/0 by MC > threshold (``stepwise`` always writes bools,
    by MC > 0 unless given, except with ``soft_labels``).  Image paths are written as the samples hold
    them, which readers take relative to the file; ``images_from_cwd``: the samples' paths are valid from
    the working directory (as annotation trees hold them) and are rewritten relative to the file.  Written
    to a temp file and renamed into place.  Returns the count."""
    if format not in LAYOUTS:
        raise ValueError(f"unknown format {format!r}; choose from {', '.join(LAYOUTS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for i, s in enumerate(samples):
        if images_from_cwd and s.image_paths:
            s = StepSample(s.question, s.steps, s.labels, _relative_to(s.image_paths, path.parent), s.answer, s.id)
        if hard_threshold is not None and format != "stepwise":
            s = StepSample(s.question, s.steps, s.hard_labels(hard_threshold), s.image_paths, s.answer, s.id)
        if format == "mm-prm":
            records.append(to_mmprm_record(s, i))
        elif format == "visualprm":
            records.append(to_visualprm_record(s))
        elif format == "stepwise":
            records.append(to_stepwise_record(s, 0.0 if hard_threshold is None else hard_threshold, soft_labels))
        else:
            records.append(to_mmprm_traverse_record(s))
    with atomic_output(path) as f:
        if format == "mm-prm-traverse":
            json.dump(records, f, ensure_ascii=False, indent=1)
        else:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return len(records)


_READERS = {
    "mm-prm": from_mmprm_record,
    "mm-prm-traverse": from_mmprm_traverse_record,
    "visualprm": from_visualprm_record,
    "stepwise": from_stepwise_record,
}


def load_samples(path: str | os.PathLike, format: str | None = None) -> list[StepSample]:
    """Read a sample file (JSONL, JSON, Parquet, Arrow: ``mmprm_infer.io.data``) in any of ``LAYOUTS``
    (detected from the first record when not given); a bad record is named by file, line and field."""

    try:
        records = list(read_records(path))
    except DataError as exc:
        raise DatasetFormatError(str(exc)) from None
    if not records:
        return []
    try:
        fmt = format or detect_layout(records[0].data)
    except DatasetFormatError as e:
        raise DatasetFormatError(f"{records[0].where}: {e}") from None
    if fmt not in _READERS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(LAYOUTS)}")
    out = []
    for rec in records:
        try:
            out.append(_READERS[fmt](rec.data))
        except KeyError as e:
            raise DatasetFormatError(f"{rec.where}: missing field {e.args[0]!r} of the {fmt} layout") from None
        except (DatasetFormatError, ValueError, TypeError) as e:
            raise DatasetFormatError(f"{rec.where}: {e}") from None
    return out
