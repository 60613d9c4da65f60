"""PRM-guided step-level search: beam search and diverse verifier tree search (DVTS).

The two searches of HuggingFace's search-and-learn ("scaling test-time
compute"), written against this library's ``Policy`` protocol and ``PRM``:
the policy writes one step at a time (a step ends at the separator
``"\\n\\n"``), the PRM scores every partial solution, and the best ones are
continued.

- ``beam_search``: ``beam_width`` beams survive each round; each is
  continued with ``n_per_beam`` sampled next steps (so each round scores
  ``beam_width * n_per_beam`` partial solutions; search-and-learn's ``n`` is
  this product and its ``beam_width`` our ``n_per_beam``).  Finished
  candidates (the policy stopped, wrote a final ``\\boxed{}`` answer, or the
  last round wrote to the end) leave the beam and are collected; the rest are
  de-duplicated and the top ``beam_width`` by aggregated reward go on.  At
  the end the collected solutions are ranked, best ``beam_width * n_per_beam``
  kept, and one is picked by ``final_strategy``.
- ``dvts``: ``beam_width`` independent subtrees, each keeping only its best
  candidate per round (greedy within a subtree, diverse across them); a
  subtree stops when its best candidate is finished.  The first round draws
  all subtrees' first steps from the question in one call, ``n_per_beam``
  each.  The final pool is each subtree's last round of ``n_per_beam``
  candidates.

Scoring: every round is one PRM call through a ``TreeCacheEngine`` (by
default a fresh one per search), which keeps the K/V of the question and of
every scored step, so a round runs only the new steps' tokens
(``SearchResult.rounds[i].prm_computed_tokens`` shows it).  Candidates the
PRM cannot read (a step tag inside the text, too long) are dropped.

Policies: any ``Policy``; one with ``generate_steps`` (``VLLMPolicy``) stops
at the separator itself, the others write on and the search keeps the first
step of each continuation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mmprm_infer.aggregation import aggregate as aggregate_steps
from mmprm_infer.aggregation import get_aggregation
from mmprm_infer.answers import extract_answer
from mmprm_infer.engines import Engine
from mmprm_infer.engines.tree_cache import TreeCacheEngine
from mmprm_infer.policy import STEP_SEPARATOR, PolicyPrompt, split_steps
from mmprm_infer.prm import PRM, ScoringItem
from mmprm_infer.selection import get_strategy, select

__all__ = ["SearchConfig", "SampledSteps", "Beam", "RoundStats", "SearchResult", "beam_search", "dvts", "search",
           "sample_steps", "has_boxed_answer"]


def has_boxed_answer(text: str) -> bool:
    return "\\boxed{" in text


@dataclass
class SearchConfig:
    """Search settings.

    ``beam_width``: beams kept per round (beam search) / subtrees (DVTS).
    ``n_per_beam``: next steps sampled from each beam per round.
    ``max_steps``: rounds; the last one writes each solution to its end.
    ``aggregate``: step rewards -> score of a partial solution when choosing
    beams ("last": the newest step's reward, search-and-learn's default).
    ``final_aggregate`` / ``final_strategy``: how the finished solutions are
    ranked and the answer picked (best_of_n, weighted_vote, majority_vote).
    ``sampling``: policy options (temperature, top_p, top_k, max_new_tokens);
    ``seed``: round r samples with seed + r.
    """

    beam_width: int = 4
    n_per_beam: int = 4
    max_steps: int = 40
    aggregate: str = "last"
    final_aggregate: str | None = None  # default: aggregate
    final_strategy: str = "best_of_n"
    sampling: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.8, "top_p": 1.0})
    seed: int | None = None
    filter_duplicates: bool = True
    is_final: Callable[[str], bool] | None = has_boxed_answer  # a step that ends the solution

    def __post_init__(self) -> None:
        for name in ("beam_width", "n_per_beam", "max_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SearchConfig.{name} must be a positive integer, got {value!r}")
        get_aggregation(self.aggregate)
        get_aggregation(self.final_aggregate or self.aggregate)
        get_strategy(self.final_strategy)


@dataclass
class SampledSteps:
    """New steps a policy wrote (one, or the rest of the solution) and whether the solution ended."""

    steps: list[str]
    finished: bool


@dataclass
class Beam:
    steps: list[str]
    step_rewards: list[float] = field(default_factory=list)
    score: float = -math.inf
    finished: bool = False

    @property
    def text(self) -> str:
        return STEP_SEPARATOR.join(self.steps)

    @property
    def answer(self) -> str | None:
        return extract_answer(self.text) if self.steps else None


@dataclass
class RoundStats:
    round: int
    prompts: int
    candidates: int  # partial solutions scored
    policy_s: float
    prm_s: float
    prm_requested_tokens: int | None = None  # tokens the candidates span (tree-cache engines only)
    prm_computed_tokens: int | None = None  # tokens the PRM actually ran


@dataclass
class SearchResult:
    method: str
    best: Beam | None
    candidates: list[Beam]  # the final pool, best first
    rounds: list[RoundStats]

    @property
    def best_text(self) -> str | None:
        return self.best.text if self.best is not None else None


# --------------------------------------------------------------------------
# sampling steps from a policy
# --------------------------------------------------------------------------


def sample_steps(policy, prompts: list[PolicyPrompt], n: int, sampling: dict[str, Any], *, to_end: bool = False
                 ) -> list[list[SampledSteps]]:
    """n next steps per prompt (the rest of the solution when ``to_end``)."""
    if hasattr(policy, "generate_steps"):
        return policy.generate_steps(prompts, n, to_end=to_end, **sampling)
    out = []
    for texts in policy.generate(prompts, n, **sampling):
        row = []
        for text in texts:
            steps = split_steps(text)
            if to_end:
                row.append(SampledSteps(steps, True))
            else:
                # The policy wrote on past the step: keep the first; it ended if that was all it wrote.
                row.append(SampledSteps(steps[:1], len(steps) <= 1))
        out.append(row)
    return out


# --------------------------------------------------------------------------
# the searches
# --------------------------------------------------------------------------


class _Scorer:
    """One PRM call per round through a (tree-cache) engine, recording what it cost."""

    def __init__(self, prm: PRM, question: str, image, engine: str | Engine | None, aggregate: str):
        self.prm = prm
        self.question = question
        self.image = image
        self.engine = engine if engine is not None else TreeCacheEngine(max_batch_tokens=prm.max_batch_tokens)
        self.aggregation = get_aggregation(aggregate)

    def score(self, beams: list[Beam], stats: RoundStats) -> list[Beam]:
        """Fill step_rewards and score of each beam; return the beams the PRM could read."""
        if not beams:
            return []
        t0 = time.perf_counter()
        rewards, _ = self.prm.score_readable([ScoringItem(self.question, [b.steps for b in beams], self.image)],
                                             self.engine)
        stats.prm_s += time.perf_counter() - t0
        engine = self.prm.engine(self.engine)
        if isinstance(engine, TreeCacheEngine):
            last = engine.stats.last
            stats.prm_requested_tokens = (stats.prm_requested_tokens or 0) + last.requested_tokens
            stats.prm_computed_tokens = (stats.prm_computed_tokens or 0) + last.computed_tokens
        kept = []
        for beam, r in zip(beams, rewards[0]):
            if r is None:
                continue
            beam.step_rewards = r
            beam.score = aggregate_steps(r, self.aggregation)
            kept.append(beam)
        return kept


def _images(image) -> list:
    if image is None:
        return []
    return list(image) if isinstance(image, (list, tuple)) else [image]


def _expand(parent: Beam, sample: SampledSteps, is_final) -> Beam | None:
    steps = [s for s in sample.steps if s.strip()]
    finished = sample.finished or not steps or (is_final is not None and any(is_final(s) for s in steps))
    if not steps and not parent.steps:
        return None  # nothing written at all
    return Beam(parent.steps + steps, finished=finished)


def _round_sampling(config: SearchConfig, r: int) -> dict[str, Any]:
    opts = dict(config.sampling)
    if config.seed is not None:
        opts["seed"] = config.seed + r
    return opts


def _final_pick(pool: list[Beam], config: SearchConfig) -> tuple[Beam | None, list[Beam]]:
    """Rank the pool by the final aggregation; pick with the final strategy."""
    if not pool:
        return None, []
    agg = get_aggregation(config.final_aggregate or config.aggregate)
    scores = [aggregate_steps(b.step_rewards, agg) for b in pool]
    chosen = select(config.final_strategy, scores, [b.answer for b in pool])
    ordered = [pool[i] for i in chosen.ranking]
    return pool[chosen.best_index], ordered


def beam_search(question: str, policy, prm: PRM, config: SearchConfig | None = None, image=None,
                engine: str | Engine | None = None) -> SearchResult:
    """Beam search over steps (see the module doc)."""
    config = config or SearchConfig()
    scorer = _Scorer(prm, question, image, engine, config.aggregate)
    images = _images(image)
    total = config.beam_width * config.n_per_beam
    active = [Beam([])]
    completed: list[Beam] = []
    rounds: list[RoundStats] = []
    for r in range(config.max_steps):
        last = r == config.max_steps - 1
        # Every round samples `total` continuations, spread over the surviving beams.
        n = math.ceil(total / len(active))
        prompts = [PolicyPrompt(question, images, list(b.steps)) for b in active]
        stats = RoundStats(r, len(prompts), 0, 0.0, 0.0)
        t0 = time.perf_counter()
        samples = sample_steps(policy, prompts, n, _round_sampling(config, r), to_end=last)
        stats.policy_s = time.perf_counter() - t0
        children = [c for beam, row in zip(active, samples) for s in row
                    if (c := _expand(beam, s, config.is_final)) is not None]
        if last:
            for c in children:
                c.finished = True
        stats.candidates = len(children)
        scored = scorer.score(children, stats)
        rounds.append(stats)
        completed.extend(b for b in scored if b.finished)
        open_beams = [b for b in scored if not b.finished]
        if config.filter_duplicates:
            seen: dict[tuple, Beam] = {}
            for b in open_beams:
                seen.setdefault(tuple(b.steps), b)
            open_beams = list(seen.values())
        # Stable sort: ties keep sampling order.
        active = sorted(open_beams, key=lambda b: -b.score)[:config.beam_width]
        if not active:
            break
    pool = sorted(completed, key=lambda b: -aggregate_steps(b.step_rewards, config.final_aggregate or config.aggregate)
                  )[:total]
    best, ordered = _final_pick(pool, config)
    return SearchResult("beam_search", best, ordered, rounds)


def dvts(question: str, policy, prm: PRM, config: SearchConfig | None = None, image=None,
         engine: str | Engine | None = None) -> SearchResult:
    """Diverse verifier tree search: beam_width independent greedy subtrees (see the module doc)."""
    config = config or SearchConfig()
    scorer = _Scorer(prm, question, image, engine, config.aggregate)
    images = _images(image)
    trees = [Beam([]) for _ in range(config.beam_width)]
    last_round: list[list[Beam]] = [[] for _ in trees]
    rounds: list[RoundStats] = []
    for r in range(config.max_steps):
        live = [i for i, t in enumerate(trees) if not t.finished]
        if not live:
            break
        last = r == config.max_steps - 1
        t0 = time.perf_counter()
        if r == 0:
            # Every subtree starts at the question: one prompt, all samples at once (so a seeded policy
            # does not hand every subtree the same samples), dealt out n_per_beam per subtree.
            stats = RoundStats(r, 1, 0, 0.0, 0.0)
            row = sample_steps(policy, [PolicyPrompt(question, images, [])], len(live) * config.n_per_beam,
                               _round_sampling(config, r), to_end=last)[0]
            samples = [row[k * config.n_per_beam:(k + 1) * config.n_per_beam] for k in range(len(live))]
        else:
            prompts = [PolicyPrompt(question, images, list(trees[i].steps)) for i in live]
            stats = RoundStats(r, len(prompts), 0, 0.0, 0.0)
            samples = sample_steps(policy, prompts, config.n_per_beam, _round_sampling(config, r), to_end=last)
        stats.policy_s = time.perf_counter() - t0
        per_tree = [[c for s in row if (c := _expand(trees[i], s, config.is_final)) is not None]
                    for i, row in zip(live, samples)]
        flat = [c for cs in per_tree for c in cs]
        if last:
            for c in flat:
                c.finished = True
        stats.candidates = len(flat)
        scored = {id(b) for b in scorer.score(flat, stats)}
        rounds.append(stats)
        for i, cands in zip(live, per_tree):
            cands = [c for c in cands if id(c) in scored]
            if not cands:  # nothing usable: the subtree ends where it is
                trees[i].finished = True
                continue
            last_round[i] = cands
            trees[i] = max(cands, key=lambda b: b.score)  # first of the best on ties
    pool = [b for cands in last_round for b in cands]
    best, ordered = _final_pick(pool, config)
    return SearchResult("dvts", best, ordered, rounds)


SEARCHES = {"beam_search": beam_search, "dvts": dvts}


def search(question: str, policy, prm: PRM, method: str = "beam_search", config: SearchConfig | None = None,
           image=None, engine: str | Engine | None = None) -> SearchResult:
    if method not in SEARCHES:
        raise ValueError(f"unknown search method {method!r}; choose one of {sorted(SEARCHES)}")
    return SEARCHES[method](question, policy, prm, config, image=image, engine=engine)
