"""MCTS step annotation, OmegaPRM-style, as MM-PRM runs it.

For one question, ``OmegaPRMSearch`` builds a tree of partial solutions whose
nodes carry Monte Carlo (MC) estimates: the fraction of ``k`` policy rollouts
from that partial solution that reach the reference answer.

1. MC-estimate the question (root).  Each correct rollout becomes a child
   (MC 1); each distinct incorrect rollout of a node with MC > 0 joins the
   candidate pool.
2. Selection: pop the (node, incorrect rollout) pair with the largest
   ``Q + U``, ``Q = alpha^(1 - MC) * beta^(words / L)`` (``words`` of the
   rollout), ``U = c_puct * sqrt(total visits) / (1 + visits)``.
3. Binary search along that rollout for its first error: the prefix up to
   the middle step becomes a child and gets its own MC estimate; MC == 0 puts
   the error in the left half (search again from the same node), MC > 0 in
   the right half (search from the new child).  A prefix that ends the
   rollout is judged directly (MC 1 or 0) without rollouts.
4. Maintenance: the selected node's visit count += 1.
Repeat until ``max_search_count`` searches, ``rollout_budget`` rollouts (the
budget is checked between searches, so a search may overrun it, as in
MM-PRM) or an empty pool.

Tree JSON (MM-PRM's layout; extra keys ``id``, ``search_count``,
``total_rollouts``, ``config`` are ours)::

    {question, answer, image_path, mc_value, visit_count, correct_rollouts,
     incorrect_rollouts, children: [{partial_solution, mc_value, visit_count,
     correct_rollouts, incorrect_rollouts, children}, ...], ...}

``partial_solution`` is the list of steps a node adds to its parent's
prefix; a rollout is the list of steps a policy wrote after the node's
prefix.  Unlike MM-PRM, the rollout lists keep repeats, so everywhere
``mc_value == len(correct_rollouts) / (len(correct_rollouts) +
len(incorrect_rollouts))``; a node judged directly (a complete solution)
records that one check as a rollout with no steps (``[]``).

``annotate`` runs the search over many questions and writes one tree file
per question, atomically, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmprm_infer.answers import AnswerVerifier
from mmprm_infer.io.files import write_json_atomic
from mmprm_infer.io.progress import progress_bar
from mmprm_infer.policy import Policy, PolicyPrompt, join_steps, split_steps
from mmprm_infer.train.mc_annotation import MCConfig, mc_estimate_question

__all__ = [
    "MCTSConfig",
    "Node",
    "OmegaPRMSearch",
    "AnnotationItem",
    "AnnotationStats",
    "annotate",
    "AnnotationRun",
    "prepare_annotation",
    "with_saved_image",
    "search_question",
    "AnnotationProgress",
    "as_annotation_item",
    "tree_path",
    "load_tree",
    "load_trees",
    "iter_nodes",
    "write_json_atomic",
    "out_of_storage",
]

logger = logging.getLogger(__name__)

Verifier = Callable[[str, str], bool]


@dataclass
class MCTSConfig:
    """OmegaPRM search settings; defaults are MM-PRM's (its run script used
    L 2000, budget 1000, max search count 200 for the released data)."""

    num_rollouts: int = 16  # k rollouts per MC estimate
    c_puct: float = 0.125
    alpha: float = 0.5
    beta: float = 0.9
    length_scale: float = 500  # L
    rollout_budget: int = 200
    max_search_count: int = 20
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 1024

    def __post_init__(self):
        if self.num_rollouts < 1:
            raise ValueError(f"num_rollouts must be >= 1, got {self.num_rollouts}")
        if self.rollout_budget < 0 or self.max_search_count < 0:
            raise ValueError("rollout_budget and max_search_count must be >= 0")
        if self.length_scale <= 0:
            raise ValueError(f"length_scale must be > 0, got {self.length_scale}")
        if not (0 < self.alpha <= 1 and 0 < self.beta <= 1):
            raise ValueError(f"alpha and beta must lie in (0, 1], got {self.alpha}, {self.beta}")

    def sampling(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_new_tokens": self.max_new_tokens}


@dataclass(eq=False)
class Node:
    """A partial solution: ``partial_solution`` = the steps it adds to its parent's."""

    partial_solution: list[str]
    parent: Node | None = None
    mc_value: float | None = None
    visit_count: int = 0
    correct_rollouts: list[list[str]] = field(default_factory=list)
    incorrect_rollouts: list[list[str]] = field(default_factory=list)
    children: list[Node] = field(default_factory=list)
    pending: list[tuple[str, ...]] = field(default_factory=list)  # incorrect rollouts not yet searched

    def prefix(self) -> list[str]:
        steps: list[str] = []
        node: Node | None = self
        chain = []
        while node is not None:
            chain.append(node.partial_solution)
            node = node.parent
        for part in reversed(chain):
            steps.extend(part)
        return steps

    def add_child(self, steps: Sequence[str]) -> Node:
        child = Node(list(steps), parent=self)
        self.children.append(child)
        return child

    def set_mc(self) -> None:
        total = len(self.correct_rollouts) + len(self.incorrect_rollouts)
        self.mc_value = len(self.correct_rollouts) / total if total else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "partial_solution": list(self.partial_solution),
            "mc_value": self.mc_value,
            "visit_count": self.visit_count,
            "correct_rollouts": [list(r) for r in self.correct_rollouts],
            "incorrect_rollouts": [list(r) for r in self.incorrect_rollouts],
            "children": [c.to_json() for c in self.children],
        }


class OmegaPRMSearch:
    """The OmegaPRM search for one question (see the module docstring).

    ``verifier(solution_text, reference) -> bool`` judges a finished
    solution; the default is ``AnswerVerifier()`` (last ``\\boxed{}`` /
    "The answer is", math-verify equivalence).  Pass
    ``AnswerVerifier(judge=...)`` or any callable to change the judge.
    """

    def __init__(self, question: str, answer: str, policy: Policy, config: MCTSConfig | None = None, *,
                 images: Sequence[Any] = (), verifier: Verifier | None = None):
        self.question = question
        self.answer = answer
        self.policy = policy
        self.config = config or MCTSConfig()
        self.images = list(images)
        self.verifier = verifier or AnswerVerifier()
        self.root = Node([])
        self.search_count = 0
        self.total_rollouts = 0
        self._order: dict[tuple[int, tuple[str, ...]], int] = {}

    # --- pieces ----------------------------------------------------------
    def is_correct(self, steps: Sequence[str]) -> bool:
        return bool(self.verifier(join_steps(steps), self.answer))

    def rollouts(self, node: Node) -> list[tuple[str, ...]]:
        """k continuations of the node's prefix, as step tuples."""
        prompt = PolicyPrompt(self.question, list(self.images), node.prefix())
        texts = self.policy.generate([prompt], self.config.num_rollouts, **self.config.sampling())[0]
        self.total_rollouts += len(texts)
        return [tuple(split_steps(t)) for t in texts]

    def monte_carlo_estimation(self, node: Node) -> None:
        prefix = node.prefix()
        for rollout in self.rollouts(node):
            if self.is_correct(prefix + list(rollout)):
                if list(rollout) not in node.correct_rollouts:
                    child = node.add_child(rollout)
                    child.correct_rollouts.append([])  # the direct check of a complete solution
                    child.set_mc()
                node.correct_rollouts.append(list(rollout))
            else:
                if rollout and rollout not in node.pending and list(rollout) not in node.incorrect_rollouts:
                    node.pending.append(rollout)
                    self._order.setdefault((id(node), rollout), len(self._order))
                node.incorrect_rollouts.append(list(rollout))
        node.set_mc()

    def judge_directly(self, node: Node) -> None:
        """MC of a complete solution: one check, no rollouts."""
        (node.correct_rollouts if self.is_correct(node.prefix()) else node.incorrect_rollouts).append([])
        node.set_mc()

    def q_value(self, node: Node, rollout: Sequence[str]) -> float:
        words = len("\n".join(rollout).split())
        c = self.config
        # q_value is asked of estimated nodes: mc_value is set
        return c.alpha ** (1 - node.mc_value) * c.beta ** (words / c.length_scale)  # type: ignore[operator]

    def u_value(self, node: Node, total_visits: int) -> float:
        return self.config.c_puct * math.sqrt(total_visits) / (1 + node.visit_count)

    def candidates(self) -> list[tuple[Node, tuple[str, ...]]]:
        return [(n, r) for n in iter_node_objects(self.root) if n.mc_value and n.mc_value > 0 for r in n.pending]

    def select(self) -> tuple[Node, tuple[str, ...]] | None:
        pool = self.candidates()
        if not pool:
            return None
        total = sum(n.visit_count for n in iter_node_objects(self.root))
        node, rollout = max(pool, key=lambda nr: (self.q_value(nr[0], nr[1]) + self.u_value(nr[0], total),
                                                  -self._order[(id(nr[0]), nr[1])]))
        node.pending.remove(rollout)
        return node, rollout

    def binary_search(self, node: Node, rollout: Sequence[str], left: int, right: int) -> None:
        """Locate the first error of ``rollout`` (continuing ``node``) in ``[left, right]``."""
        while left <= right:
            mid = (left + right) // 2
            child = node.add_child(rollout[left:mid + 1])
            if mid == len(rollout) - 1:
                self.judge_directly(child)
            else:
                self.monte_carlo_estimation(child)
            if child.mc_value == 0:
                right = mid - 1
            else:
                node, left = child, mid + 1

    # --- the search --------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.monte_carlo_estimation(self.root)
        c = self.config
        while self.search_count < c.max_search_count and self.total_rollouts < c.rollout_budget:
            picked = self.select()
            if picked is None:
                break
            node, rollout = picked
            self.binary_search(node, rollout, 0, len(rollout) - 1)
            node.visit_count += 1
            self.search_count += 1
        return self.tree()

    def tree(self) -> dict[str, Any]:
        data = self.root.to_json()
        del data["partial_solution"]
        return {"question": self.question, "answer": self.answer, "image_path": None, **data,
                "search_count": self.search_count, "total_rollouts": self.total_rollouts}


def iter_node_objects(root: Node) -> Iterable[Node]:
    stack = [root]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(reversed(n.children))


def iter_nodes(tree: dict[str, Any], prefix: Sequence[str] = ()) -> Iterable[tuple[dict[str, Any], list[str]]]:
    """(node, full prefix) for every node of a tree JSON, root first, depth first."""
    stack = [(tree, list(prefix))]
    while stack:
        node, pre = stack.pop()
        yield node, pre
        for child in reversed(node.get("children", [])):
            stack.append((child, pre + list(child.get("partial_solution", []))))


# --------------------------------------------------------------------------
# Many questions: files, resume, progress
# --------------------------------------------------------------------------


@dataclass
class AnnotationItem:
    """A question to annotate: ``image`` is a PIL image or a path (or None)."""

    id: str
    question: str
    answer: str
    image: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class AnnotationStats:
    questions: int = 0
    skipped: int = 0  # trees already on disk (resumed run)
    annotated: int = 0
    failed: list[str] = field(default_factory=list)
    rollouts: int = 0
    seconds: float = 0.0

    @property
    def rollouts_per_s(self) -> float:
        return self.rollouts / self.seconds if self.seconds > 0 else 0.0


def as_annotation_item(item: Any, text_only: bool = False) -> AnnotationItem:
    """An ``AnnotationItem`` (returned as it is) or a dict in MM-PRM's input layout
    (``question``, ``correct_answer`` or ``answer``, ``image_path``, optional ``id``;
    ``text_only`` drops its image).  Anything else raises ``TypeError``: a task of your own
    converts its problems first (the synthetic task: ``synthetic.task.annotation_items``)."""
    if isinstance(item, AnnotationItem):
        return item
    if isinstance(item, dict):
        answer = item.get("correct_answer", item.get("answer"))
        if answer is None or "question" not in item:
            raise ValueError(f"a question dict needs 'question' and 'correct_answer' (or 'answer'); got keys "
                             f"{sorted(item)}")
        image = None if text_only else item.get("image_path", item.get("image"))
        qid = item.get("id")
        if qid is None:
            qid = hashlib.md5(json.dumps(item, sort_keys=True, default=str).encode()).hexdigest()
        extra = {k: v for k, v in item.items() if k not in ("question", "correct_answer", "answer", "image_path",
                                                             "image", "id")}
        return AnnotationItem(str(qid), item["question"], str(answer), image, extra)
    raise TypeError(f"cannot annotate a {type(item).__name__}: give an AnnotationItem or a dict in MM-PRM's "
                    "input layout")


_SAFE_RE = re.compile(r"[^A-Za-z0-9._-]+")


def _file_stem(qid: str) -> str:
    stem = _SAFE_RE.sub("_", qid).strip("._") or "q"
    if stem != qid:  # keep distinct ids distinct after sanitizing
        stem += "-" + hashlib.md5(qid.encode()).hexdigest()[:8]
    return stem


def tree_path(out_dir: str | os.PathLike, qid: str) -> Path:
    return Path(out_dir) / "trees" / f"{_file_stem(qid)}.json"


class _NotStarted(Exception):
    """A question skipped because an earlier write found the disk full; the rerun does it."""


def out_of_storage(error: BaseException | None) -> bool:
    """A write failed for lack of space or a read-only disk: every later question would fail the same way."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def load_tree(path: str | os.PathLike) -> dict[str, Any] | None:
    """A finished tree file (or a ``--method mc`` record), or None when missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    finished = ("children" in data and "mc_value" in data) or (data.get("method") == "mc" and "solutions" in data)
    return data if finished else None


def load_trees(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every finished tree under ``out_dir/trees`` (sorted by file name)."""
    trees = []
    for p in sorted((Path(out_dir) / "trees").glob("*.json")):
        t = load_tree(p)
        if t is not None:
            trees.append(t)
    return trees


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temp_files(folder: Path) -> None:
    """Temp files left by a killed run (its pid no longer runs)."""
    for tmp in folder.glob(".*.tmp-*"):
        m = re.search(r"\.tmp-(\d+)-", tmp.name)
        if m and not _pid_alive(int(m.group(1))):
            tmp.unlink(missing_ok=True)


def _save_image(item: AnnotationItem, out_dir: Path) -> str | None:
    """Save the item's image under out_dir/images; the path the tree records."""
    image = item.image
    if image is None:
        return None
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    path = out_dir / "images" / f"{_file_stem(item.id)}.png"
    if not path.exists():
        from PIL.PngImagePlugin import PngInfo  # PIL: heavy, loaded where used

        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        info = PngInfo()  # keep text metadata (a synthetic image carries its problem spec)
        for key, value in getattr(image, "info", {}).items():
            if isinstance(key, str) and isinstance(value, str):
                info.add_text(key, value)
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    return str(path)


@dataclass
class AnnotationRun:
    """The questions still to annotate under ``out`` (what ``prepare_annotation`` found)."""

    out: Path
    todo: list[AnnotationItem]
    stats: AnnotationStats


def prepare_annotation(problems: Iterable[Any], out_dir: str | os.PathLike, config: MCTSConfig,
                       text_only: bool = False) -> AnnotationRun:
    """Folders, stale temp files, unique ids, run.json, and which questions are
    already finished (skipped: their tree file exists for the same question and answer)."""
    out = Path(out_dir)
    (out / "trees").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(out / "trees")
    _remove_stale_temp_files(out / "images")
    items = [as_annotation_item(p, text_only) for p in problems]
    seen: dict[str, int] = {}
    for i, it in enumerate(items):
        if _file_stem(it.id) in seen:
            raise ValueError(f"questions {seen[_file_stem(it.id)]} and {i} share the id {it.id!r}; ids must be unique")
        seen[_file_stem(it.id)] = i
    run = {"config": dataclasses.asdict(config), "text_only": text_only, "questions": len(items)}
    try:
        before = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        before = None
    if before and (before.get("config") != run["config"] or before.get("text_only") != text_only):
        logger.warning("%s holds trees annotated with other settings (%s); finished questions are kept as they are",
                       out, before)
    write_json_atomic(out / "run.json", run)
    todo = []
    for it in items:
        tree = load_tree(tree_path(out, it.id))
        if tree is not None and (tree.get("question") != it.question or str(tree.get("answer")) != it.answer):
            logger.warning("%s holds a tree for another question or answer; annotating %s again",
                           tree_path(out, it.id), it.id)
            tree = None
        if tree is None:
            todo.append(it)
    return AnnotationRun(out, todo, AnnotationStats(questions=len(items), skipped=len(items) - len(todo)))


def with_saved_image(item: AnnotationItem, out: Path) -> AnnotationItem:
    """The item with its in-memory image saved under out/images and replaced by that path."""
    return dataclasses.replace(item, image=_save_image(item, out))


def search_question(item: AnnotationItem, policy: Policy, config: MCTSConfig,
                    verifier: Verifier | None = None) -> tuple[dict[str, Any], int]:
    """One question's finished tree (MM-PRM layout + id, config, extras) and its rollout count;
    ``item.image`` is a path (``with_saved_image``) or None.  With an ``MCConfig``: per-step
    Monte Carlo estimates instead (``train.mc_annotation``)."""

    if isinstance(config, MCConfig):
        return mc_estimate_question(item, policy, config, verifier)
    search = OmegaPRMSearch(item.question, item.answer, policy, config,
                            images=[item.image] if item.image else [], verifier=verifier)
    tree = search.run()
    tree["image_path"] = item.image
    return {"id": item.id, **tree, "config": dataclasses.asdict(config), **item.extra}, search.total_rollouts


class AnnotationProgress:
    """Counts finished/failed questions and rollouts (thread-safe) behind one progress bar."""

    def __init__(self, run: AnnotationRun, progress: bool, desc: str = "annotate"):
        self.stats, self.lock, self.start = run.stats, threading.Lock(), time.perf_counter()
        self.bar = progress_bar(total=run.stats.questions, initial=run.stats.skipped, unit="q", desc=desc,
                                disable=not progress)

    def done(self, qid: str, rollouts: int | None, error: BaseException | str | None) -> None:
        with self.lock:
            if error is not None:
                logger.error("annotating %s failed: %s", qid, error)
                self.stats.failed.append(qid)
            else:
                self.stats.annotated += 1
                self.stats.rollouts += rollouts  # type: ignore[operator]  # a success reports its rollouts
            elapsed = time.perf_counter() - self.start
            self.bar.update(1)
            self.bar.set_postfix(rollouts=self.stats.rollouts,
                                 rollouts_per_s=f"{self.stats.rollouts / max(elapsed, 1e-9):.1f}",
                                 failed=len(self.stats.failed), refresh=False)

    def close(self) -> AnnotationStats:
        self.bar.close()
        self.stats.seconds = time.perf_counter() - self.start
        return self.stats


def annotate(problems: Iterable[Any], policy: Policy, out_dir: str | os.PathLike, config: MCTSConfig | None = None,
             *, verifier: Verifier | None = None, text_only: bool = False, progress: bool = True,
             workers: int = 1) -> AnnotationStats:
    """Annotate every question with an OmegaPRM tree under ``out_dir``.

    Layout: ``out_dir/trees/<id>.json`` (one finished tree per question,
    written atomically), ``out_dir/images/<id>.png`` (each in-memory image,
    saved so ``image_path`` names a real file; path images are recorded as
    given), ``out_dir/run.json`` (the settings of the last run).

    Resuming: questions whose tree file exists (for the same question text and
    answer) are skipped, so rerunning the same command after a kill finishes
    the rest and redoes nothing; a tree left by another question under the
    same id is redone, with a warning.
    ``problems``: ``AnnotationItem``s or dicts in MM-PRM's input layout
    (``id``, ``question``, ``image_path``, ``correct_answer``).
    ``text_only``: questions without images (a dict's image is dropped; an
    item is taken as it is, so convert text-only items accordingly: the
    synthetic task's ``annotation_items(problems, text_only=True)`` puts the
    picture's content in the question text); recorded in ``run.json``.
    ``workers`` > 1 annotates that many questions at once (threads; useful
    with an HTTP policy).  A question that raises is logged and listed in
    ``stats.failed``; the others go on.  ``integrations.ray_annotate`` runs the
    same on a Ray cluster.
    """
    config = config or MCTSConfig()
    run = prepare_annotation(problems, out_dir, config, text_only)
    tracker = AnnotationProgress(run, progress)

    storage_failed = threading.Event()  # set by the worker whose write hit a full disk, before others start

    def one(item: AnnotationItem) -> int:
        if storage_failed.is_set():
            raise _NotStarted
        tree, rollouts = search_question(with_saved_image(item, run.out), policy, config, verifier)
        try:
            write_json_atomic(tree_path(run.out, item.id), tree)
        except OSError as exc:
            if out_of_storage(exc):
                storage_failed.set()
            raise
        return rollouts

    try:
        if workers <= 1:
            for it in run.todo:
                try:
                    r = one(it)
                except Exception as e:  # noqa: BLE001 - one bad question must not stop the run
                    if out_of_storage(e):  # ... but a full disk fails every question after it: stop
                        raise
                    tracker.done(it.id, None, e)
                else:
                    tracker.done(it.id, r, None)
        else:
            ex = ThreadPoolExecutor(max_workers=workers)
            try:
                futures = {ex.submit(one, it): it for it in run.todo}
                first_storage_error = None
                for fut in as_completed(futures):
                    err = fut.exception()
                    if out_of_storage(err):
                        first_storage_error = first_storage_error or err
                    elif not isinstance(err, _NotStarted):
                        tracker.done(futures[fut].id, None if err else fut.result(), err)
                if first_storage_error is not None:
                    raise first_storage_error
            finally:  # on a full disk or Ctrl-C, questions not yet started are dropped, not run
                ex.shutdown(wait=True, cancel_futures=True)
    finally:
        stats = tracker.close()
    return stats
