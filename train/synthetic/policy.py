"""A stochastic policy for the synthetic task, with realistic step errors.

``SyntheticPolicy`` implements ``mmprm_infer.policy.Policy``.  It
"sees" the picture (from the spec stored in a synthetic image, or from the
problems it was given) and writes solutions in the task's step format,
making these errors:

- ``trap``: each problem has one hard-to-read value (one cell or bar the
  question uses); the policy misreads it as a fixed confusable digit with a
  per-problem probability drawn from ``trap_range``.  Several samples then
  agree on the same wrong answer -- the case where majority vote fails and a
  PRM that checks the reading can still pick a right solution.
- ``misread``: per value read, a random nearby or look-alike digit.
- ``wrong_line``: per reading step, the neighbouring row / column / cell /
  bar is read under the asked-for name.
- ``slip``: per calculation, the result is off by 1, 2 or 10.
- ``drop_term`` / ``dup_term``: per calculation of three or more terms
  (``dup_term``: any sum), one term dropped / written twice.
- ``skip_op``: the last calculation is skipped and the previous result given
  as the answer.
- ``dup_op``: the last operation is applied a second time.

Continuing a partial solution, the policy re-derives the state from the
partial steps (what was read, what each calculation gave), so an earlier
error carries into every later step and the final answer.  A wrong partial
solution is never lucky: a continuation whose errors cancel out to the
reference answer is drawn again (``allow_lucky=True`` keeps them).

Reproducible: the samples of a call depend only on ``seed``, the problem,
the partial steps and how often that same prompt was asked before (so
annotating one question gives the same rollouts whatever else the policy did
before).  ``temperature`` scales every error rate (0 gives the reference
solution); ``top_p`` / ``top_k`` / ``max_new_tokens`` are accepted and
ignored.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from mmprm_infer.answers import extract_answer
from mmprm_infer.policy import PolicyPrompt, join_steps, sampling_options
from mmprm_infer.train.synthetic.task import (
    BAR_NAMES,
    ArithStage,
    Problem,
    ReadStage,
    Target,
    apply_op,
    derive_state,
    format_answer,
    format_arith,
    format_read,
    make_problems,
    operand_values,
    parse_step,
    problem_from_image,
    split_steps,
)

__all__ = ["ErrorRates", "SyntheticPolicy", "Trap", "policy_report", "error_kind", "LOOKALIKE_DIGITS",
           "SLIP_OFFSETS", "neighbour_target", "synthetic_policy_factory"]

# Digits a reader confuses (look-alikes first, then neighbours).
LOOKALIKE_DIGITS = {1: 7, 2: 7, 3: 8, 4: 9, 5: 6, 6: 5, 7: 1, 8: 3, 9: 4}
# How far an arithmetic slip puts a result off.
SLIP_OFFSETS = (-2, -1, 1, 2, 10, -10)


@dataclass(frozen=True)
class ErrorRates:
    """Error probabilities of the synthetic policy (see the module docstring)."""

    misread: float = 0.025
    trap_range: tuple[float, float] = (0.0, 0.75)
    wrong_line: float = 0.02
    slip: float = 0.05
    drop_term: float = 0.04
    dup_term: float = 0.02
    skip_op: float = 0.02
    dup_op: float = 0.02

    def scaled(self, factor: float) -> ErrorRates:
        def s(p: float) -> float:
            return min(1.0, max(0.0, p * factor))

        return ErrorRates(misread=s(self.misread), trap_range=(s(self.trap_range[0]), s(self.trap_range[1])),
                          wrong_line=s(self.wrong_line), slip=s(self.slip), drop_term=s(self.drop_term),
                          dup_term=s(self.dup_term), skip_op=s(self.skip_op), dup_op=s(self.dup_op))

    def __post_init__(self):
        for name, value in asdict(self).items():
            vals = value if isinstance(value, (tuple, list)) else (value,)
            if any(not 0.0 <= float(v) <= 1.0 for v in vals):
                raise ValueError(f"error rate {name} must lie in [0, 1], got {value}")
        if self.trap_range[0] > self.trap_range[1]:
            raise ValueError(f"trap_range must be (low, high) with low <= high, got {self.trap_range}")


@dataclass(frozen=True)
class Trap:
    """A problem's hard-to-read value: read stage, position in it, wrong value, probability."""

    stage: int
    position: int
    wrong_value: int
    probability: float


@dataclass
class SyntheticPolicy:
    """Seeded stochastic policy for ``task`` problems.

    ``problems``: known problems (needed for text-only prompts, whose
    question text identifies the problem; image prompts carry the problem in
    the image).  ``latency_s``: sleep per ``generate`` call (simulates a slow
    policy, for progress and resume tests).
    """

    problems: Iterable[Problem] = ()
    rates: ErrorRates = field(default_factory=ErrorRates)
    seed: int = 0
    allow_lucky: bool = False
    latency_s: float = 0.0

    def __post_init__(self):
        self._by_question: dict[str, list[Problem]] = defaultdict(list)
        for p in self.problems:
            self.register(p)
        self._counts: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self.calls = 0
        self.samples = 0

    def register(self, problem: Problem) -> None:
        """Make a problem known by its image and text-only questions."""
        for q in {problem.prompt_question(False), problem.prompt_question(True)}:
            if all(p.seed != problem.seed for p in self._by_question[q]):
                self._by_question[q].append(problem)

    # --- which problem ---------------------------------------------------
    def resolve(self, prompt: PolicyPrompt) -> Problem:
        for im in prompt.images:
            p = problem_from_image(im)
            if p is not None:
                return p
        found = self._by_question.get(prompt.question, [])
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(
                f"{len(found)} known problems share the question {prompt.question[:80]!r}; pass the problem's "
                "image (it identifies the problem) or use text-only prompts"
            )
        raise ValueError(
            f"unknown problem {prompt.question[:80]!r}: pass its synthetic image, or give the policy the "
            "problems (SyntheticPolicy(problems=...))"
        )

    # --- the problem's trap ------------------------------------------------
    def trap(self, problem: Problem, rates: ErrorRates | None = None) -> Trap:
        rates = rates or self.rates
        rng = random.Random(f"trap-{problem.seed}-{problem.template}")
        reads = [i for i, st in enumerate(problem.plan) if isinstance(st, ReadStage)]
        stage = rng.choice(reads)
        values = problem.read(cast(ReadStage, problem.plan[stage]).target)  # reads: read stages only
        position = rng.randrange(len(values))
        wrong = LOOKALIKE_DIGITS[values[position]]
        lo, hi = rates.trap_range
        return Trap(stage, position, wrong, lo + (hi - lo) * rng.random())

    # --- sampling -------------------------------------------------------------
    def generate(self, prompts: list[PolicyPrompt], n: int = 1, **sampling: Any) -> list[list[str]]:
        if isinstance(prompts, PolicyPrompt):
            raise TypeError("prompts must be a list of PolicyPrompt; wrap a single one as [prompt]")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        opts = sampling_options({"temperature": 1.0}, sampling)
        rates = self.rates.scaled(float(opts["temperature"]))
        if self.latency_s:
            time.sleep(self.latency_s)
        out = []
        for prompt in prompts:
            problem = self.resolve(prompt)
            key = json.dumps([self.seed, problem.seed, problem.template, list(prompt.partial_steps),
                              opts.get("seed")])
            with self._lock:
                count = self._counts[key]
                self._counts[key] += 1
                self.calls += 1
                self.samples += n
            digest = hashlib.sha256(f"{key}#{count}".encode()).hexdigest()
            rng = random.Random(int(digest[:16], 16))
            out.append([self.continue_solution(problem, prompt.partial_steps, rng, rates) for _ in range(n)])
        return out

    def continue_solution(self, problem: Problem, partial_steps: Sequence[str], rng: random.Random,
                          rates: ErrorRates | None = None) -> str:
        """One sampled continuation (the remaining steps joined by blank lines)."""
        rates = rates or self.rates
        partial = [s.strip() for s in partial_steps if s.strip()]
        steps: list[str] = []
        for _ in range(50):
            steps = self._continue(problem, partial, rng, rates)
            if self.allow_lucky or not self._lucky(problem, partial + steps):
                break
        return join_steps(steps)

    @staticmethod
    def _lucky(problem: Problem, steps: Sequence[str]) -> bool:
        """Errors that cancel out: a wrong step somewhere, yet the reference answer."""
        if not steps or problem.first_error(steps) is None:
            return False
        last = parse_step(steps[-1])
        return last.kind == "answer" and last.result == problem.answer_value

    def _continue(self, problem: Problem, partial: list[str], rng: random.Random, rates: ErrorRates) -> list[str]:
        plan = problem.plan
        state = derive_state(plan, partial)
        if state.answered is not None:
            return []
        trap = self.trap(problem, rates)
        reads = dict(state.reads)
        results = dict(state.results)
        last = state.last_result
        arith = [i for i, st in enumerate(plan) if isinstance(st, ArithStage)]
        last_arith = arith[-1]
        out: list[str] = []
        for i, st in enumerate(plan):
            if isinstance(st, ReadStage):
                if i in reads:
                    continue
                values = self._read(problem, st.target, i, rng, rates, trap)
                reads[i] = values
                out.append(format_read(st.target, values))
            elif isinstance(st, ArithStage):
                if i in results:
                    continue
                if i == last_arith and last is not None and rng.random() < rates.skip_op:
                    break  # skip the last operation: answer the previous result
                ops = operand_values(st, reads, results)
                if len(ops) >= 3 and rng.random() < rates.drop_term:
                    del ops[rng.randrange(len(ops))]
                elif st.op == "+" and rng.random() < rates.dup_term:
                    j = rng.randrange(len(ops))
                    ops.insert(j, ops[j])
                result = apply_op(st.op, ops)
                if rng.random() < rates.slip:
                    result += rng.choice(SLIP_OFFSETS)
                results[i] = result
                last = result
                out.append(format_arith(st.op, ops, result))
                if i == last_arith and rng.random() < rates.dup_op:
                    right = ops[-1]
                    again = apply_op(st.op, [result, right])
                    last = again
                    out.append(format_arith(st.op, [result, right], again))
        if last is None:  # nothing computed (unparseable partial): answer what is known
            last = 0
        out.append(format_answer(last))
        return out

    def _read(self, problem: Problem, target: Target, stage: int, rng: random.Random, rates: ErrorRates,
              trap: Trap) -> tuple[int, ...]:
        source = target
        if rng.random() < rates.wrong_line:
            source = neighbour_target(problem, target, rng)
        values = list(problem.read(source))
        for k, v in enumerate(values):
            if source == target and stage == trap.stage and k == trap.position and rng.random() < trap.probability:
                values[k] = trap.wrong_value
            elif rng.random() < rates.misread:
                values[k] = _misread(v, rng)
        return tuple(values)


def _misread(v: int, rng: random.Random) -> int:
    if rng.random() < 0.5:
        return LOOKALIKE_DIGITS[v]
    return min(9, v + 1) if v == 1 or (v < 9 and rng.random() < 0.5) else v - 1


def neighbour_target(problem: Problem, target: Target, rng: random.Random) -> Target:
    """The row / column / cell / bar next to ``target`` (what a careless reader sees instead)."""
    row, col = cast(int, target.row), cast(int, target.col)  # the ones the target's kind uses are set
    if target.kind == "bar":
        n = len(BAR_NAMES)
        options = [c for c in (col - 1, col + 1) if 1 <= c <= n]
        return Target("bar", col=rng.choice(options))
    rows, cols = len(problem.values), len(problem.values[0])
    if target.kind == "row":
        return Target("row", rng.choice([r for r in (row - 1, row + 1) if 1 <= r <= rows]))
    if target.kind == "col":
        return Target("col", col=rng.choice([c for c in (col - 1, col + 1) if 1 <= c <= cols]))
    cells = [(r, c) for r, c in ((row - 1, col), (row + 1, col),
                                 (row, col - 1), (row, col + 1))
             if 1 <= r <= rows and 1 <= c <= cols]
    r, c = rng.choice(cells)
    return Target("cell", r, c)


def error_kind(reason: str) -> str:
    """A checker verdict's reason -> a short error kind."""
    if reason.startswith("misread"):
        return "misread"
    if "slip" in reason:
        return "arithmetic slip"
    if reason.startswith("calculation should be"):
        return "dropped/doubled term"
    if "before finishing" in reason:
        return "skipped operation"
    if "extra calculation" in reason:
        return "duplicated operation"
    return "other"


def policy_report(problems: Sequence[Problem], policy, n: int = 16, text_only: bool = False) -> dict[str, Any]:
    """Accuracy of single samples, majority vote over ``n`` and pass@n, plus the
    kinds of first errors (shares of wrong samples), on ``problems``."""

    prompts = [PolicyPrompt(p.prompt_question(text_only), [] if text_only else [p.image]) for p in problems]
    outs = policy.generate(prompts, n=n)
    acc = maj = passed = agree = 0.0
    kinds: Counter = Counter()
    for p, sols in zip(problems, outs):
        answers = [extract_answer(s) for s in sols]
        ok = [a == p.answer for a in answers]
        acc += sum(ok) / n
        passed += any(ok)
        counts = Counter(answers)
        top = max(counts.values())
        winners = [a for a, k in counts.items() if k == top]
        maj += (p.answer in winners) / len(winners)
        agree += any(k >= 3 and a != p.answer for a, k in counts.items())
        for s in sols:
            steps = split_steps(s)
            e = p.first_error(steps)
            if e is not None:
                kinds[error_kind(p.check_step(steps[:e], steps[e]).reason)] += 1
    m = max(len(problems), 1)
    wrong = max(sum(kinds.values()), 1)
    return {"problems": len(problems), "n": n, "accuracy": acc / m, f"majority@{n}": maj / m, f"pass@{n}": passed / m,
            "problems_with_agreeing_wrong_answers": agree / m,
            "first_error_kinds": {k: v / wrong for k, v in kinds.most_common()}}


# picklable (a module-level function + partial): ``mmprm annotate --ray`` rebuilds the policy in each worker
def _synthetic_policy(num_problems: int, split: str, seed: int, rates, policy_seed: int,
                      latency_s: float) -> SyntheticPolicy:
    return SyntheticPolicy(make_problems(num_problems, split, seed), rates=rates, seed=policy_seed,
                           latency_s=latency_s)


def synthetic_policy_factory(num_problems: int, split: str, seed: int, rates, policy_seed: int = 0,
                             latency_s: float = 0.0) -> Callable[[], SyntheticPolicy]:
    """The synthetic policy over the same problem set, rebuilt in each worker (its samples depend
    only on the seed, the problem and the partial solution, so a worker gives the same trees)."""
    return functools.partial(_synthetic_policy, num_problems, split, seed, rates, policy_seed, latency_s)
