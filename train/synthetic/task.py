"""A verifiable multimodal task for training and testing PRMs end to end.

Each problem is a small picture -- a 3 x 3 table of digits or a bar chart of
five labelled bars -- and a multi-step arithmetic question about it:

    image:     a table, rows 1-3, columns A-C, digits 1-9
    question:  "Add the numbers in row 2. Then multiply the sum by the number
                in row 1, column C."
    solution:  Row 2 is 4, 7, 2.
               4 + 7 + 2 = 13.
               Row 1, column C is 3.
               13 * 3 = 39.
               The answer is \\boxed{39}.

Steps are short and regular (one reading or one calculation each, joined by
"\\n\\n") so that a tiny PRM trained for minutes on a CPU can learn to spot
the errors a policy makes: misreading the picture, arithmetic slips, a
dropped or doubled term.  Every problem carries

- ``image``: the picture (PIL, rendered on first use; the problem's spec is
  stored in the PNG's text chunk ``mmprm_synthetic`` so a saved file is
  self-describing),
- ``question``: the question about the image,
- ``image_text``: the same content as text, for a text-only variant
  (``prompt_question(text_only=True)`` puts it before the question),
- ``answer``: the reference answer (an integer, as a string),
- ``gold_steps``: the reference step-by-step solution,
- a checker, ``check_step`` / ``first_error`` / ``step_labels``, deciding
  whether any step is right given the steps before it.

Problems come from integer seeds; ``make_problems(n, split, seed)`` hands the
train and test splits disjoint seeds (even / odd problem seeds).
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, cast

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from mmprm_infer.formats.base import split_on_blank_lines
from mmprm_infer.train.mcts import AnnotationItem
from mmprm_infer.vision import open_image

__all__ = [
    "Target",
    "ReadStage",
    "ArithStage",
    "AnswerStage",
    "Problem",
    "StepCheck",
    "ParsedStep",
    "parse_step",
    "derive_state",
    "make_problem",
    "make_problems",
    "annotation_items",
    "problem_seeds",
    "problem_from_image",
    "SPEC_KEY",
    "GRID_ROWS",
    "GRID_COLS",
    "BAR_NAMES",
]

SPEC_KEY = "mmprm_synthetic"  # PNG text chunk holding the problem spec
GRID_ROWS = 3
GRID_COLS = 3
COL_NAMES = "ABCDEFGH"
BAR_NAMES = "ABCDE"
_SPLIT_OFFSET = {"train": 0, "test": 1}
_SEED_STRIDE = 10_000_000


# --------------------------------------------------------------------------
# Plan: what a solution does, stage by stage
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Something to read off the picture: a row, a column, one cell or one bar."""

    kind: str  # "row" | "col" | "cell" | "bar"
    row: int | None = None  # 1-based
    col: int | None = None  # 1-based (A = 1); for bars, the bar index (A = 1)

    def describe(self) -> str:
        col = cast(int, self.col)  # set for every kind but "row"
        if self.kind == "row":
            return f"Row {self.row}"
        if self.kind == "col":
            return f"Column {COL_NAMES[col - 1]}"
        if self.kind == "cell":
            return f"Row {self.row}, column {COL_NAMES[col - 1]}"
        return f"Bar {BAR_NAMES[col - 1]}"

    @property
    def is_line(self) -> bool:
        return self.kind in ("row", "col")


@dataclass(frozen=True)
class ReadStage:
    target: Target


@dataclass(frozen=True)
class ArithStage:
    """``op`` over operands; an operand is ``("read", i)`` (all values read in
    stage i: a whole row expands to its three terms) or ``("result", i)``
    (the result of arithmetic stage i)."""

    op: str  # "+" | "-" | "*"
    operands: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class AnswerStage:
    source: int  # the arithmetic stage whose result is the answer


Stage = ReadStage | ArithStage | AnswerStage


# --------------------------------------------------------------------------
# Step text: writing and parsing
# --------------------------------------------------------------------------


def format_read(target: Target, values: Sequence[int]) -> str:
    return f"{target.describe()} is {', '.join(str(v) for v in values)}."


def format_arith(op: str, operands: Sequence[int], result: int) -> str:
    return f" {op} ".join(str(v) for v in operands) + f" = {result}."


def format_answer(value: int) -> str:
    return f"The answer is \\boxed{{{value}}}."


_INT = r"-?\d+"
_READ_RE = re.compile(
    r"^(?:(?P<cell_r>Row (?P<cr>\d+), column (?P<cc>[A-H]))|(?:Row (?P<r>\d+))|(?:Column (?P<c>[A-H]))"
    r"|(?:Bar (?P<b>[A-H]))) is (?P<vals>" + _INT + r"(?:, " + _INT + r")*)\.?$"
)
_ARITH_RE = re.compile(r"^(?P<lhs>" + _INT + r"(?: [-+*] " + _INT + r")+) = (?P<res>" + _INT + r")\.?$")
_ANSWER_RE = re.compile(r"^The answer is \\boxed\{(?P<v>" + _INT + r")\}\.?$")


@dataclass(frozen=True)
class ParsedStep:
    """One step read back from text: ``kind`` is read / arith / answer / other."""

    kind: str
    target: Target | None = None
    values: tuple[int, ...] = ()  # read values, or arithmetic operands
    ops: tuple[str, ...] = ()  # arithmetic operators between operands
    result: int | None = None  # arithmetic result or answer value


@functools.lru_cache(maxsize=1 << 16)  # MCTS re-checks the same step texts ~1M times per annotation
def parse_step(text: str) -> ParsedStep:
    s = " ".join(text.split())
    m = _READ_RE.match(s)
    if m:
        vals = tuple(int(v) for v in m.group("vals").split(", "))
        if m.group("cell_r"):
            t = Target("cell", int(m.group("cr")), COL_NAMES.index(m.group("cc")) + 1)
        elif m.group("r"):
            t = Target("row", int(m.group("r")))
        elif m.group("c"):
            t = Target("col", col=COL_NAMES.index(m.group("c")) + 1)
        else:
            t = Target("bar", col=BAR_NAMES.index(m.group("b")) + 1 if m.group("b") in BAR_NAMES else 99)
        return ParsedStep("read", target=t, values=vals)
    m = _ARITH_RE.match(s)
    if m:
        tokens = m.group("lhs").split(" ")
        return ParsedStep(
            "arith", values=tuple(int(t) for t in tokens[0::2]), ops=tuple(tokens[1::2]),
            result=int(m.group("res")),
        )
    m = _ANSWER_RE.match(s)
    if m:
        return ParsedStep("answer", result=int(m.group("v")))
    return ParsedStep("other")


def apply_op(op: str, values: Sequence[int]) -> int:
    acc = values[0]
    for v in values[1:]:
        acc = acc + v if op == "+" else acc - v if op == "-" else acc * v
    return acc


# --------------------------------------------------------------------------
# State of a (partial) solution, derived from its steps
# --------------------------------------------------------------------------


@dataclass
class SolutionState:
    """What a partial solution has established, read back from its steps.

    ``reads[i]``: values written for read stage i; ``results[i]``: result
    written for arithmetic stage i; ``extra_results``: results of arithmetic
    steps beyond the plan (a duplicated operation); ``answered``: the value
    boxed, if any; ``unparsed``: indices of steps that fit no stage.
    """

    reads: dict[int, tuple[int, ...]] = field(default_factory=dict)
    results: dict[int, int] = field(default_factory=dict)
    extra_results: list[int] = field(default_factory=list)
    answered: int | None = None
    unparsed: list[int] = field(default_factory=list)
    last_result: int | None = None
    matched: list[int | None] = field(default_factory=list)  # stage index per step

    def next_stage(self, plan: Sequence[Stage]) -> int | None:
        """Index of the first stage not yet done (None once answered)."""
        if self.answered is not None:
            return None
        for i, st in enumerate(plan):
            if isinstance(st, ReadStage) and i not in self.reads:
                return i
            if isinstance(st, ArithStage) and i not in self.results:
                return i
            if isinstance(st, AnswerStage):
                return i
        return None


def derive_state(plan: Sequence[Stage], steps: Sequence[str]) -> SolutionState:
    """Match each step to a stage of the plan and record what it states.

    A read step is matched to the first unread stage reading that target; an
    arithmetic step to the next arithmetic stage in plan order (one past the
    last is a duplicate); an answer step ends the solution.
    """
    state = SolutionState()
    arith_stages = [i for i, st in enumerate(plan) if isinstance(st, ArithStage)]
    next_arith = 0
    for k, text in enumerate(steps):
        p = parse_step(text)
        stage: int | None = None
        if p.kind == "read":
            for i, st in enumerate(plan):
                if isinstance(st, ReadStage) and st.target == p.target and i not in state.reads:
                    stage = i
                    state.reads[i] = p.values
                    break
        elif p.kind == "arith":
            if next_arith < len(arith_stages):
                stage = arith_stages[next_arith]
                state.results[stage] = cast(int, p.result)  # an arithmetic step has one
                next_arith += 1
            else:
                state.extra_results.append(cast(int, p.result))
            state.last_result = p.result
        elif p.kind == "answer":
            stage = len(plan) - 1
            state.answered = p.result
        if stage is None and p.kind != "arith":
            state.unparsed.append(k)
        state.matched.append(stage)
    return state


# --------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class StepCheck:
    """Verdict on one step: ``ok`` and, when not ok, what is wrong."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


@dataclass
class Problem:
    """One synthetic problem; build with ``make_problem`` / ``make_problems``."""

    id: str
    seed: int
    kind: str  # "grid" | "bars"
    values: tuple[tuple[int, ...], ...]  # grid rows, or one row of bar values
    template: str
    question: str
    plan: tuple[Stage, ...]
    split: str = "train"

    # --- content ---------------------------------------------------------
    def read(self, target: Target) -> tuple[int, ...]:
        """The true values of a target in the picture."""
        row, col = cast(int, target.row), cast(int, target.col)  # the ones the target's kind uses are set
        if target.kind == "row":
            return tuple(self.values[row - 1])
        if target.kind == "col":
            return tuple(r[col - 1] for r in self.values)
        if target.kind == "cell":
            return (self.values[row - 1][col - 1],)
        return (self.values[0][col - 1],)

    def has_target(self, target: Target) -> bool:
        if target.kind in ("row", "cell") and not (target.row and 1 <= target.row <= len(self.values)):
            return False
        if target.kind in ("col", "cell") and not (target.col and 1 <= target.col <= len(self.values[0])):
            return False
        if target.kind == "bar":
            return self.kind == "bars" and target.col is not None and 1 <= target.col <= len(self.values[0])
        return self.kind == "grid"

    @cached_property
    def gold_steps(self) -> list[str]:
        steps: list[str] = []
        reads: dict[int, tuple[int, ...]] = {}
        results: dict[int, int] = {}
        for i, st in enumerate(self.plan):
            if isinstance(st, ReadStage):
                reads[i] = self.read(st.target)
                steps.append(format_read(st.target, reads[i]))
            elif isinstance(st, ArithStage):
                operands = operand_values(st, reads, results)
                results[i] = apply_op(st.op, operands)
                steps.append(format_arith(st.op, operands, results[i]))
            else:
                steps.append(format_answer(results[st.source]))
        return steps

    @property
    def gold_solution(self) -> str:
        return "\n\n".join(self.gold_steps)

    @property
    def answer(self) -> str:
        return str(self.answer_value)

    @cached_property
    def answer_value(self) -> int:
        return cast(int, parse_step(self.gold_steps[-1]).result)  # the gold answer step has one

    @property
    def image_text(self) -> str:
        """The picture's content as text, worded like the reading steps
        ("Row 2: 4, 7, 2" / "Bar B: 7"), for the text-only variant."""
        if self.kind == "grid":
            cols = ", ".join(COL_NAMES[: len(self.values[0])])
            lines = [f"The table has rows 1-{len(self.values)} and columns {cols}."]
            lines += [f"Row {r}: " + ", ".join(str(v) for v in row) for r, row in enumerate(self.values, 1)]
            return "\n".join(lines)
        lines = [f"The bar chart has bars {BAR_NAMES[0]}-{BAR_NAMES[len(self.values[0]) - 1]}."]
        lines += [f"Bar {BAR_NAMES[c]}: {v}" for c, v in enumerate(self.values[0])]
        return "\n".join(lines)

    def prompt_question(self, text_only: bool = False) -> str:
        """The question as a policy or PRM sees it; text-only puts the picture's content first."""
        return f"{self.image_text}\n{self.question}" if text_only else self.question

    def annotation_item(self, text_only: bool = False):
        """The problem as the annotator takes it (``mcts.AnnotationItem``): the question as the
        policy sees it, the answer, and the image (None when ``text_only``: the picture is then in
        the question's text)."""

        return AnnotationItem(self.id, self.prompt_question(text_only), str(self.answer),
                              None if text_only else self.image)

    # --- spec (self-describing images, registries) ----------------------
    @property
    def spec(self) -> dict[str, Any]:
        return {"id": self.id, "seed": self.seed, "split": self.split, "template": self.template}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Problem:
        return make_problem(int(spec["seed"]), split=spec.get("split"), id=spec.get("id"),
                            template=spec.get("template"))

    # --- image -----------------------------------------------------------
    @cached_property
    def image(self) -> Image.Image:
        img = _render_grid(self.values) if self.kind == "grid" else _render_bars(self.values[0])
        img.info[SPEC_KEY] = json.dumps(self.spec)
        return img

    def save_image(self, path) -> None:
        """Save as PNG with the spec in a text chunk (``problem_from_image`` reads it back)."""
        info = PngInfo()
        info.add_text(SPEC_KEY, json.dumps(self.spec))
        self.image.save(path, format="PNG", pnginfo=info)

    # --- checking ----------------------------------------------------------
    def check_step(self, previous_steps: Sequence[str], step: str) -> StepCheck:
        """Is ``step`` right, given the steps before it?

        A step is right when every earlier step is right and it is the true
        next thing to say: a reading of a target the question needs (not yet
        read) with the picture's true values; the next calculation of the
        plan with the right operands (true values, none dropped or doubled)
        and the right result; or, after all calculations, the reference
        answer boxed.  A step after a wrong one is never right (errors carry).
        """
        for k, prev in enumerate(previous_steps):
            c = self._check_next(previous_steps[:k], prev)
            if not c.ok:
                return StepCheck(False, f"an earlier step ({k + 1}) is wrong: {c.reason}")
        return self._check_next(previous_steps, step)

    def _check_next(self, previous_steps: Sequence[str], step: str) -> StepCheck:
        state = derive_state(self.plan, previous_steps)
        if state.answered is not None:
            return StepCheck(False, "the solution already gave its answer")
        p = parse_step(step)
        if p.kind == "other":
            return StepCheck(False, f"not a reading, a calculation or an answer: {step!r}")
        if p.kind == "read":
            target = cast(Target, p.target)  # a read step has one
            stages = [i for i, st in enumerate(self.plan) if isinstance(st, ReadStage) and st.target == target]
            if not stages:
                return StepCheck(False, f"{target.describe()} is not needed for this question")
            if all(i in state.reads for i in stages):
                return StepCheck(False, f"{target.describe()} was already read")
            true = self.read(target)
            if p.values != true:
                return StepCheck(
                    False, f"misread {target.describe()}: {list(p.values)}, the picture shows {list(true)}"
                )
            return StepCheck(True)
        true_reads = {i: self.read(st.target) for i, st in enumerate(self.plan) if isinstance(st, ReadStage)}
        true_results = self._true_results()
        arith_done = all(i in state.results for i, st in enumerate(self.plan) if isinstance(st, ArithStage))
        if p.kind == "answer":
            if not arith_done:
                return StepCheck(False, "answers before finishing the calculation")
            if p.result != self.answer_value:
                return StepCheck(False, f"answer {p.result} is not {self.answer_value}")
            return StepCheck(True)
        # arithmetic
        pending = [i for i, st in enumerate(self.plan) if isinstance(st, ArithStage) and i not in state.results]
        if not pending:
            return StepCheck(False, "an extra calculation: the plan's operations are all done")
        stage_i = pending[0]
        st = cast(ArithStage, self.plan[stage_i])  # pending holds arithmetic stages only
        for kind, j in st.operands:
            if kind == "read" and j not in state.reads:
                return StepCheck(False, f"calculates before reading {cast(ReadStage, self.plan[j]).target.describe()}")
        want = operand_values(st, true_reads, true_results)
        if list(p.ops) != [st.op] * (len(want) - 1) or list(p.values) != list(want):
            return StepCheck(False, f"calculation should be {format_arith(st.op, want, true_results[stage_i])!r}")
        if p.result != true_results[stage_i]:
            return StepCheck(False, f"arithmetic slip: {format_arith(st.op, want, cast(int, p.result))!r}, "
                                    f"the result is {true_results[stage_i]}")
        return StepCheck(True)

    def _true_results(self) -> dict[int, int]:
        reads: dict[int, tuple[int, ...]] = {}
        results: dict[int, int] = {}
        for i, st in enumerate(self.plan):
            if isinstance(st, ReadStage):
                reads[i] = self.read(st.target)
            elif isinstance(st, ArithStage):
                results[i] = apply_op(st.op, operand_values(st, reads, results))
        return results

    def first_error(self, steps: Sequence[str]) -> int | None:
        """Index of the first wrong step, or None when every step is right
        (a correct but unfinished prefix also gives None)."""
        for k in range(len(steps)):
            if not self._check_next(steps[:k], steps[k]).ok:
                return k
        return None

    def step_labels(self, steps: Sequence[str]) -> list[bool]:
        """True for each step before the first error, False from it on."""
        e = self.first_error(steps)
        return [e is None or k < e for k in range(len(steps))]

    def is_correct_solution(self, steps: Sequence[str] | str) -> bool:
        """Every step right and the reference answer given."""
        if isinstance(steps, str):
            steps = split_steps(steps)
        return bool(steps) and self.first_error(steps) is None and parse_step(steps[-1]).kind == "answer"


def split_steps(text: str) -> list[str]:
    """A solution's steps: the blank-line rule most PRM formats use (``formats.base.split_on_blank_lines``)."""
    return split_on_blank_lines(text)


def operand_values(stage: ArithStage, reads: Mapping[int, Sequence[int]], results: Mapping[int, int]) -> list[int]:
    out: list[int] = []
    for kind, j in stage.operands:
        if kind == "read":
            out.extend(reads[j])
        else:
            out.append(results[j])
    return out


# --------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------

TEMPLATES = ("grid_sum_times_cell", "grid_row_minus_col", "grid_cell_product_plus_row",
             "bars_pair_times_bar", "bars_triple_minus_bar")


def problem_seeds(n: int, split: str = "train", seed: int = 0) -> list[int]:
    """Problem seeds of a split: train gets even, test odd ones, so splits are disjoint."""
    if split not in _SPLIT_OFFSET:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 0 or n > _SEED_STRIDE // 2:
        raise ValueError(f"n must be in [0, {_SEED_STRIDE // 2}], got {n}")
    base = seed * _SEED_STRIDE + _SPLIT_OFFSET[split]
    return [base + 2 * i for i in range(n)]


def make_problems(n: int, split: str = "train", seed: int = 0, templates: Sequence[str] = TEMPLATES) -> list[Problem]:
    """``n`` problems of a split; the same (n, split, seed) always gives the same problems."""
    return [make_problem(s, split=split, templates=templates) for s in problem_seeds(n, split, seed)]


def annotation_items(problems: Sequence[Problem], text_only: bool = False) -> list:
    """``Problem.annotation_item`` of each problem, in order: what ``mcts.annotate`` and
    ``ray_annotate`` take."""
    return [p.annotation_item(text_only) for p in problems]


def make_problem(problem_seed: int, split: str | None = None, templates: Sequence[str] = TEMPLATES,
                 id: str | None = None, template: str | None = None) -> Problem:
    """The problem of one seed (deterministic); ``template`` forces the
    question type, otherwise it is drawn from ``templates``."""
    if split is None:
        split = "test" if problem_seed % 2 else "train"
    if template is None:
        unknown = [t for t in templates if t not in _BUILDERS]
        if unknown or not templates:
            raise ValueError(f"unknown templates {unknown or templates}; choose from {list(_BUILDERS)}")
        template = templates[random.Random(f"mmprm-synthetic-{problem_seed}-template").randrange(len(templates))]
    elif template not in _BUILDERS:
        raise ValueError(f"unknown template {template!r}; choose from {list(_BUILDERS)}")
    rng = random.Random(f"mmprm-synthetic-{problem_seed}-{template}")
    kind, values, question, plan = _BUILDERS[template](rng)
    return Problem(id=id or f"syn{problem_seed}", seed=problem_seed, kind=kind, values=values,
                   template=template, question=question, plan=tuple(plan), split=split)


def _grid(rng: random.Random) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(rng.randint(1, 9) for _ in range(GRID_COLS)) for _ in range(GRID_ROWS))


def _small_cell(rng: random.Random, values, avoid_row: int | None = None) -> tuple[int, int]:
    """A (row, col), 1-based, holding a value in 2..5 (resampled if none exists)."""
    cells = [(r + 1, c + 1) for r in range(len(values)) for c in range(len(values[0]))
             if 2 <= values[r][c] <= 5 and r + 1 != avoid_row]
    return rng.choice(cells) if cells else (0, 0)


def _build_grid_sum_times_cell(rng):
    while True:
        values = _grid(rng)
        r = rng.randint(1, GRID_ROWS)
        cr, cc = _small_cell(rng, values, avoid_row=r)
        if cr:
            break
    q = (f"Add the numbers in row {r}. Then multiply the sum by the number in row {cr}, "
         f"column {COL_NAMES[cc - 1]}.")
    plan = [ReadStage(Target("row", r)), ArithStage("+", (("read", 0),)),
            ReadStage(Target("cell", cr, cc)), ArithStage("*", (("result", 1), ("read", 2))), AnswerStage(3)]
    return "grid", values, q, plan


def _build_grid_row_minus_col(rng):
    while True:
        values = _grid(rng)
        r, c = rng.randint(1, GRID_ROWS), rng.randint(1, GRID_COLS)
        if sum(values[r - 1]) > sum(row[c - 1] for row in values):
            break
    q = f"Subtract the sum of column {COL_NAMES[c - 1]} from the sum of row {r}."
    plan = [ReadStage(Target("row", r)), ArithStage("+", (("read", 0),)),
            ReadStage(Target("col", col=c)), ArithStage("+", (("read", 2),)),
            ArithStage("-", (("result", 1), ("result", 3))), AnswerStage(4)]
    return "grid", values, q, plan


def _build_grid_cell_product_plus_row(rng):
    values = _grid(rng)
    cells = rng.sample([(r, c) for r in range(1, GRID_ROWS + 1) for c in range(1, GRID_COLS + 1)], 2)
    (r1, c1), (r2, c2) = cells
    r3 = rng.randint(1, GRID_ROWS)
    q = (f"Multiply the number in row {r1}, column {COL_NAMES[c1 - 1]} by the number in row {r2}, "
         f"column {COL_NAMES[c2 - 1]}, then add the sum of row {r3}.")
    plan = [ReadStage(Target("cell", r1, c1)), ReadStage(Target("cell", r2, c2)),
            ArithStage("*", (("read", 0), ("read", 1))), ReadStage(Target("row", r3)),
            ArithStage("+", (("read", 3),)), ArithStage("+", (("result", 2), ("result", 4))), AnswerStage(5)]
    return "grid", values, q, plan


def _build_bars_pair_times_bar(rng):
    values = (tuple(rng.randint(1, 9) for _ in BAR_NAMES),)
    small = [i + 1 for i, v in enumerate(values[0]) if 2 <= v <= 5]
    while not small:
        values = (tuple(rng.randint(1, 9) for _ in BAR_NAMES),)
        small = [i + 1 for i, v in enumerate(values[0]) if 2 <= v <= 5]
    z = rng.choice(small)
    x, y = sorted(rng.sample([i for i in range(1, len(BAR_NAMES) + 1) if i != z], 2))
    q = (f"Add the values of bars {BAR_NAMES[x - 1]} and {BAR_NAMES[y - 1]}, then multiply the sum by the "
         f"value of bar {BAR_NAMES[z - 1]}.")
    plan = [ReadStage(Target("bar", col=x)), ReadStage(Target("bar", col=y)),
            ArithStage("+", (("read", 0), ("read", 1))), ReadStage(Target("bar", col=z)),
            ArithStage("*", (("result", 2), ("read", 3))), AnswerStage(4)]
    return "bars", values, q, plan


def _build_bars_triple_minus_bar(rng):
    values = (tuple(rng.randint(1, 9) for _ in BAR_NAMES),)
    idx = rng.sample(range(1, len(BAR_NAMES) + 1), 4)
    x, y, z = sorted(idx[:3])
    w = idx[3]
    q = (f"Add the values of bars {BAR_NAMES[x - 1]}, {BAR_NAMES[y - 1]} and {BAR_NAMES[z - 1]}, then "
         f"subtract the value of bar {BAR_NAMES[w - 1]}.")
    plan = [ReadStage(Target("bar", col=x)), ReadStage(Target("bar", col=y)), ReadStage(Target("bar", col=z)),
            ArithStage("+", (("read", 0), ("read", 1), ("read", 2))), ReadStage(Target("bar", col=w)),
            ArithStage("-", (("result", 3), ("read", 4))), AnswerStage(5)]
    return "bars", values, q, plan


_BUILDERS = {
    "grid_sum_times_cell": _build_grid_sum_times_cell,
    "grid_row_minus_col": _build_grid_row_minus_col,
    "grid_cell_product_plus_row": _build_grid_cell_product_plus_row,
    "bars_pair_times_bar": _build_bars_pair_times_bar,
    "bars_triple_minus_bar": _build_bars_triple_minus_bar,
}


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------

_FONT_SIZE = 22


def _font():
    try:
        return ImageFont.load_default(size=_FONT_SIZE)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def _centered(draw: ImageDraw.ImageDraw, xy, text: str, font, fill=(0, 0, 0)) -> None:
    if isinstance(font, ImageFont.FreeTypeFont):
        draw.text(xy, text, font=font, fill=fill, anchor="mm")
    else:  # bitmap font: no anchors
        draw.text((xy[0] - 4 * len(text), xy[1] - 6), text, font=font, fill=fill)


def _render_grid(values) -> Image.Image:
    cell, margin = 48, 8
    rows, cols = len(values), len(values[0])
    w, h = margin * 2 + cell * (cols + 1), margin * 2 + cell * (rows + 1)
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = _font()
    for c in range(cols):
        _centered(d, (margin + cell * (c + 1.5), margin + cell * 0.5), COL_NAMES[c], font, (40, 40, 160))
    for r in range(rows):
        _centered(d, (margin + cell * 0.5, margin + cell * (r + 1.5)), str(r + 1), font, (40, 40, 160))
        for c in range(cols):
            x0, y0 = margin + cell * (c + 1), margin + cell * (r + 1)
            d.rectangle([x0, y0, x0 + cell, y0 + cell], outline=(0, 0, 0), width=2)
            _centered(d, (x0 + cell / 2, y0 + cell / 2), str(values[r][c]), font)
    return img


def _render_bars(values) -> Image.Image:
    bar_w, gap, unit, margin = 32, 16, 14, 12
    n = len(values)
    w = margin * 2 + n * bar_w + (n - 1) * gap
    base = margin + 28 + 9 * unit
    h = base + 30
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = _font()
    d.line([margin - 4, base, w - margin + 4, base], fill=(0, 0, 0), width=2)
    for i, v in enumerate(values):
        x0 = margin + i * (bar_w + gap)
        d.rectangle([x0, base - v * unit, x0 + bar_w, base], fill=(90, 140, 210), outline=(0, 0, 0))
        _centered(d, (x0 + bar_w / 2, base - v * unit - 13), str(v), font)
        _centered(d, (x0 + bar_w / 2, base + 15), BAR_NAMES[i], font, (40, 40, 160))
    return img


def problem_from_image(image) -> Problem | None:
    """The problem a rendered picture (PIL image or saved PNG path) shows, from
    its ``mmprm_synthetic`` text chunk; None for any other picture."""
    if not isinstance(image, Image.Image):
        try:
            with open_image(image) as im:
                spec = im.info.get(SPEC_KEY)
        except (OSError, ValueError):
            return None
    else:
        spec = image.info.get(SPEC_KEY)
    if not spec:
        return None
    try:
        return Problem.from_spec(json.loads(spec))
    except (ValueError, KeyError, TypeError):
        return None
