"""Step rewards for evaluation, cached on disk so a rerun with another threshold or
aggregation neither rescores nor loads the model.

The cache is a JSON file beside the report, keyed by a hash of the PRM (its
folder, format, dtype and the size and time of its files) and of the item
(question, candidates, images): a retrained checkpoint or an edited record is
scored again, nothing else is.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmprm_infer.io.files import write_json_atomic
from mmprm_infer.io.progress import progress_bar
from mmprm_infer.io.records import PRMSpec
from mmprm_infer.prm import ScoringItem, batch_then_each

__all__ = ["RewardCache", "prm_fingerprint", "score_with_cache", "ScoringFailure"]


@dataclass
class ScoringFailure:
    """An item the PRM could not score (bad steps, too long, unreadable image)."""

    message: str


def prm_fingerprint(spec: PRMSpec) -> str:
    root = Path(spec.path).resolve()
    files = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in root.iterdir() if p.is_file())
    return json.dumps([str(root), spec.format, spec.dtype, spec.max_tiles, files])


def _item_key(fingerprint: str, item: ScoringItem) -> str:
    image = item.image if isinstance(item.image, (str, list, type(None))) else repr(item.image)
    text = json.dumps([fingerprint, item.question, item.candidates, image], ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class RewardCache:
    """``{item key: step rewards}`` in one JSON file, written atomically after scoring."""

    def __init__(self, path: str | os.PathLike | None, fingerprint: str):
        self.path, self.fingerprint = (Path(path) if path else None), fingerprint
        self.entries: dict[str, list] = {}
        if self.path and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.entries = {}  # a damaged cache only costs a rescore

    def key(self, item: ScoringItem) -> str:
        return _item_key(self.fingerprint, item)

    def save(self) -> None:
        if self.path:
            write_json_atomic(self.path, self.entries)


def _score_batch(prm, items: list[ScoringItem], engine: str | None) -> list[list | ScoringFailure]:
    """One engine call; when it fails, item by item so only the bad item fails."""
    return batch_then_each(lambda chunk: prm.score_batch(chunk, engine=engine), items,
                           lambda _, exc: ScoringFailure(f"{type(exc).__name__}: {exc}"))


def score_with_cache(items: Sequence[ScoringItem], load_prm: Callable[[], object], cache: RewardCache,
                     batch: int = 8, engine: str | None = None, progress: bool = True, desc: str = "score",
                     score_remote: Callable[[list[ScoringItem]], list] | None = None) -> list[list | ScoringFailure]:
    """Step rewards per item (``[[reward per step] per candidate]``) or a ScoringFailure; the model
    is loaded only when some item is not cached.  ``score_remote`` (e.g. Ray) scores the missing
    items instead of this process."""
    keys = [cache.key(it) for it in items]
    todo = [i for i, k in enumerate(keys) if k not in cache.entries]
    results: dict[int, list | ScoringFailure] = {}
    if todo:
        if score_remote is not None:
            for i, rewards in zip(todo, score_remote([items[i] for i in todo])):
                results[i] = rewards
        else:
            prm = load_prm()
            with progress_bar(total=len(todo), desc=desc, unit="item", disable=not progress) as bar:
                for start in range(0, len(todo), batch):
                    chunk = todo[start:start + batch]
                    for i, rewards in zip(chunk, _score_batch(prm, [items[i] for i in chunk], engine)):
                        results[i] = rewards
                    bar.update(len(chunk))
        for i, rewards in results.items():
            if not isinstance(rewards, ScoringFailure):
                cache.entries[keys[i]] = rewards
        cache.save()
    return [results[i] if i in results else cache.entries[k] for i, k in enumerate(keys)]
