"""Training samples in, model-ready micro-batches out.

``as_example`` accepts any object with ``question``, ``steps``, ``labels``
and optionally ``image``/``images``/``image_path``/``image_paths``
attributes (``train.datasets.StepSample`` among them), or a dict with those
keys.  ``make_layout`` places encoded sequences into one micro-batch, either

- padded: one row per sample, right padding, a 2-D attention mask; or
- packed: all samples back to back in one row, position ids restarting at 0
  for each sample and no attention mask, so transformers' masking builds a
  block-diagonal causal mask from the position ids;

and gives the flat row index of every reward marker, in sample/step order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TrainExample", "as_example", "BatchLayout", "make_layout", "place_tokens", "place_embeds"]

_IMAGE_KEYS = ("images", "image_paths", "image", "image_path")


@dataclass
class TrainExample:
    """One labelled solution: question, steps, one label in [0, 1] per step, optional image(s)."""

    question: str
    steps: list[str]
    labels: list[float]
    images: Any = None  # None, one image (PIL image or path) or a list of them


def _get(sample, key: str, default=None):
    if isinstance(sample, dict):
        return sample.get(key, default)
    return getattr(sample, key, default)


def as_example(sample, index: int) -> TrainExample:
    """Normalize a sample (StepSample-like object or dict) and check its labels."""
    if isinstance(sample, TrainExample):
        return sample
    question, steps, labels = _get(sample, "question"), _get(sample, "steps"), _get(sample, "labels")
    if question is None or steps is None or labels is None:
        missing = [k for k, v in (("question", question), ("steps", steps), ("labels", labels)) if v is None]
        raise ValueError(
            f"training sample {index} has no {', '.join(missing)}; each sample needs question, steps "
            "(list of str) and labels (one float in [0, 1] per step)"
        )
    if not isinstance(question, str):
        raise TypeError(f"training sample {index}: question must be a string, got {type(question).__name__}")
    if isinstance(steps, str) or not all(isinstance(s, str) for s in steps):
        raise TypeError(f"training sample {index}: steps must be a list of step strings")
    try:
        labels = [float(v) for v in labels]
    except (TypeError, ValueError):
        raise TypeError(f"training sample {index}: labels must be numbers, got {labels!r}") from None
    if len(labels) != len(steps):
        raise ValueError(
            f"training sample {index} has {len(steps)} steps but {len(labels)} labels; give one label per step"
        )
    bad = [v for v in labels if not (0.0 <= v <= 1.0) or math.isnan(v)]
    if bad:
        raise ValueError(
            f"training sample {index}: labels must be Monte-Carlo scores in [0, 1], got {bad[:3]}; "
            "map hard -1/+1 labels to 0/1 first"
        )
    images = None
    for key in _IMAGE_KEYS:
        value = _get(sample, key)
        if value is not None and not (isinstance(value, (list, tuple)) and len(value) == 0):
            images = value
            break
    return TrainExample(question, list(steps), labels, images)


@dataclass
class BatchLayout:
    """Where each sample of a micro-batch sits in the [rows, width] input."""

    rows: int
    width: int
    starts: list[tuple[int, int]]  # (row, first column) per sample
    lengths: list[int]
    position_ids: torch.Tensor  # [rows, width]
    attention_mask: torch.Tensor | None  # [rows, width] for padded batches, None when packed
    marker_index: torch.Tensor  # [markers]: flat index into rows * width, sample by sample, step by step
    cu_markers: list[int]  # markers of sample i are marker_index[cu[i]:cu[i+1]]


def make_layout(lengths: Sequence[int], reward_positions: Sequence[Sequence[int]], packing: bool,
                device: torch.device | str = "cpu") -> BatchLayout:
    if packing:
        rows, width = 1, sum(lengths)
        starts, at = [], 0
        for n in lengths:
            starts.append((0, at))
            at += n
        position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
        attention_mask = None
    else:
        rows, width = len(lengths), max(lengths)
        starts = [(i, 0) for i in range(rows)]
        position_ids = torch.arange(width).expand(rows, width).clone()
        attention_mask = torch.zeros(rows, width, dtype=torch.long)
        for i, n in enumerate(lengths):
            attention_mask[i, :n] = 1
    markers: list[int] = []
    cu = [0]
    for (row, col), positions in zip(starts, reward_positions):
        markers.extend(row * width + col + p for p in positions)
        cu.append(len(markers))
    return BatchLayout(
        rows, width, starts, list(lengths), position_ids.to(device),
        None if attention_mask is None else attention_mask.to(device),
        torch.tensor(markers, dtype=torch.long, device=device), cu,
    )


def place_tokens(layout: BatchLayout, sequences: Sequence[Sequence[int]], pad_id: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    ids = torch.full((layout.rows, layout.width), pad_id, dtype=torch.long)
    for (row, col), seq in zip(layout.starts, sequences):
        ids[row, col:col + len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return ids.to(device)


def place_embeds(layout: BatchLayout, embeds: Sequence[torch.Tensor]) -> torch.Tensor:
    """[rows, width, d] from per-sample [T_i, d] rows (padding rows are zeros); keeps the autograd graph."""
    if layout.attention_mask is None:  # packed: one row, concatenated
        return torch.cat(list(embeds))[None]
    pieces = []
    for e in embeds:
        pad = layout.width - e.shape[0]
        pieces.append(torch.cat([e, e.new_zeros(pad, e.shape[1])]) if pad else e)
    return torch.stack(pieces)
