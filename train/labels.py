"""MCTS trees -> step-labelled training samples, as MM-PRM's traverse does it.

Rules (MM-PRM ``data_pipeline/traverse.py``):

- only questions whose root MC lies strictly in (0, 1) (``require_mixed_root``);
- walk every root-to-node path; a node contributes its steps and its MC
  value as the label;
- a path stops at the first node with MC <= ``threshold`` (0): that path is
  a *negative* sample; a path that reaches a leaf with every MC > threshold
  is a *positive* sample;
- duplicates (same steps) are dropped; all negatives are kept and the
  positives are downsampled (seeded) to the number of negatives -- so a tree
  without negatives yields no samples, as in MM-PRM;
- ``hard_labels``: labels become 1.0 when MC > threshold, else 0.0
  (VisualPRM's rule); otherwise the soft MC values are kept (what MM-PRM
  trains on).

Granularity: a tree node may hold several steps (a binary-search chunk or a
whole correct rollout).  ``"node"`` (MM-PRM's) makes each node one labelled
"step" (its steps joined by blank lines, one ``<prm>`` after it).  ``"step"``
splits nodes into their steps and labels each: by the MC of the node with
exactly that prefix when the tree has one, else by the next labelled step
of the node when that is positive (a prefix of a solvable prefix is
solvable), else by the label before it; the path then stops at its first
step with MC <= threshold.  Binary search leaves a node at the prefix just
before and at the first error, so in a finished tree every step up to the
first error is labelled from a real estimate.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mmprm_infer.train.datasets import StepSample
from mmprm_infer.train.mcts import iter_nodes

__all__ = ["LabelConfig", "tree_paths", "tree_to_samples", "trees_to_samples", "is_negative",
           "label_stats"]


@dataclass
class LabelConfig:
    granularity: str = "node"  # "node" (MM-PRM) | "step"
    threshold: float = 0.0  # MC <= threshold: a negative (the path stops there)
    hard_labels: bool = False  # labels 1.0 / 0.0 by threshold instead of soft MC values
    balance: bool = True  # positives downsampled to the number of negatives
    require_mixed_root: bool = True  # only trees with root MC in (0, 1)
    min_words: int = 0  # drop samples of <= min_words words (MM-PRM used 10; 0 keeps all)
    dedupe: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.granularity not in ("node", "step"):
            raise ValueError(f"granularity must be 'node' or 'step', got {self.granularity!r}")


def _prefix_values(tree: dict[str, Any]) -> dict[tuple[str, ...], float]:
    """Mean MC per full prefix over all nodes of a tree."""
    acc: dict[tuple[str, ...], list[float]] = defaultdict(list)
    for node, prefix in iter_nodes(tree):
        if prefix and node.get("mc_value") is not None:
            acc[tuple(s.strip() for s in prefix)].append(float(node["mc_value"]))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def tree_paths(tree: dict[str, Any], config: LabelConfig | None = None) -> tuple[list[tuple[list[str], list[float]]],
                                                                               list[tuple[list[str], list[float]]]]:
    """(negatives, positives) of one tree, each (steps, MC labels), before dedupe and balancing."""
    config = config or LabelConfig()
    thr = config.threshold
    negatives: list[tuple[list[str], list[float]]] = []
    positives: list[tuple[list[str], list[float]]] = []
    values = _prefix_values(tree) if config.granularity == "step" else {}
    root_mc = float(tree.get("mc_value") or 0.0)

    def expand(prefix: list[str], chunk: list[str], node_mc: float, prev: float) -> list[float]:
        labels: list[float | None] = []
        for j in range(len(chunk)):
            if j == len(chunk) - 1:
                labels.append(node_mc)
            else:
                labels.append(values.get(tuple(prefix + chunk[:j + 1])))
        out: list[float] = []
        for j, x in enumerate(labels):
            if x is None:
                nxt = next(v for v in labels[j + 1:] if v is not None)
                x = nxt if nxt > thr else prev
            out.append(x)
            prev = x
        return out

    def walk(node: dict[str, Any], steps: list[str], labels: list[float]) -> None:
        chunk = [s.strip() for s in node.get("partial_solution", [])]
        mc = float(node.get("mc_value") or 0.0)
        if not chunk:  # an empty node adds nothing; treat its children as the parent's
            kids = node.get("children", [])
            for child in kids:
                walk(child, steps, labels)
            return
        if config.granularity == "node":
            new_steps, new_labels = ["\n\n".join(chunk)], [mc]
        else:
            new_steps = chunk
            new_labels = expand(steps, chunk, mc, labels[-1] if labels else root_mc)
        for k, x in enumerate(new_labels):
            if x <= thr:
                negatives.append((steps + new_steps[:k + 1], labels + new_labels[:k + 1]))
                return
        steps, labels = steps + new_steps, labels + new_labels
        kids = node.get("children", [])
        if kids:
            for child in kids:
                walk(child, steps, labels)
        else:
            positives.append((steps, labels))

    for child in tree.get("children", []):
        walk(child, [], [])
    return negatives, positives


def tree_to_samples(tree: dict[str, Any], config: LabelConfig | None = None) -> list[StepSample]:
    """Labelled samples of one tree (negatives first, then the kept positives)."""
    config = config or LabelConfig()
    root_mc = tree.get("mc_value")
    if config.require_mixed_root and not (root_mc is not None and 0.0 < float(root_mc) < 1.0):
        return []
    negatives, positives = tree_paths(tree, config)

    def keep(paths):
        out, seen = [], set()
        for steps, labels in paths:
            key = tuple(steps)
            if config.dedupe and key in seen:
                continue
            seen.add(key)
            if config.min_words and len(" ".join(steps).split(" ")) <= config.min_words:
                continue
            out.append((steps, labels))
        return out

    negatives, positives = keep(negatives), keep(positives)
    if config.balance and len(positives) > len(negatives):
        rng = random.Random(f"{config.seed}-{tree.get('id', '')}-{tree.get('question', '')}")
        positives = rng.sample(positives, len(negatives))
    image = tree.get("image_path")
    images = [] if not image else ([image] if isinstance(image, str) else list(image))
    out = []
    for steps, labels in negatives + positives:
        if config.hard_labels:
            labels = [1.0 if x > config.threshold else 0.0 for x in labels]
        out.append(StepSample(tree["question"], steps, labels, images, tree.get("answer"),
                              None if tree.get("id") is None else str(tree["id"])))
    return out


def _mc_samples(record: dict[str, Any], config: LabelConfig) -> list[StepSample]:
    """A ``--method mc`` record: one sample per solution, every step with its estimate."""
    out, seen = [], set()
    for k, sol in enumerate(record["solutions"]):
        steps, labels = list(sol["steps"]), [float(v) for v in sol["mc"]]
        if config.dedupe and tuple(steps) in seen:
            continue
        seen.add(tuple(steps))
        if config.hard_labels:
            labels = [float(v > config.threshold) for v in labels]
        if len(" ".join(steps).split()) > config.min_words:
            image = [record["image_path"]] if record.get("image_path") else []
            out.append(StepSample(record["question"], steps, labels, image, record.get("answer"),
                                  f"{record.get('id')}-{k}"))
    return out


def trees_to_samples(trees: Iterable[dict[str, Any]], config: LabelConfig | None = None) -> list[StepSample]:
    out: list[StepSample] = []
    config = config or LabelConfig()
    for t in trees:
        out.extend(_mc_samples(t, config) if t.get("method") == "mc" else tree_to_samples(t, config))
    return out


def is_negative(sample: StepSample, threshold: float = 0.0) -> bool:
    """A sample ending on a step with label <= threshold (a located error)."""
    return sample.labels[-1] <= threshold


def label_stats(samples: Sequence[StepSample], threshold: float = 0.0) -> dict[str, Any]:
    n_neg = sum(is_negative(s, threshold) for s in samples)
    steps = sum(len(s.labels) for s in samples)
    bad_steps = sum(1 for s in samples for x in s.labels if x <= threshold)
    return {"samples": len(samples), "negatives": n_neg, "positives": len(samples) - n_neg,
            "fraction_negative": n_neg / len(samples) if samples else 0.0, "labelled_steps": steps,
            "fraction_bad_steps": bad_steps / steps if steps else 0.0}
