"""The whole PRM pipeline, end to end, on the synthetic multimodal task.

    mmprm pipeline --preset demo --run-dir runs/pipeline-demo
    mmprm pipeline --preset full --run-dir runs/pipeline-full

1. make train problems (3x3 digit tables / bar charts) and annotate them with
   OmegaPRM MCTS, the synthetic policy writing the rollouts (``mcts.annotate``);
2. trees -> step-labelled samples (``labels.trees_to_samples``; per-step
   labels, hard 1/0 by MC > 0 by default);
3. build a small PRM (``prm_init.build_task_prm``: tiny InternVL, mm-prm
   format, the image included; its question also carries the picture as text,
   see prm_init), optionally pretrain it on reference solutions and reading
   drills (``prm_init.pretrain_reading``), teach its step marker to verify
   true and perturbed readings and calculations (``prm_init.
   pretrain_step_verification``, then -- ``row_verification_steps`` -- once
   more on row and column readings only; ``verification_mix`` also adds such
   drills to the PRM's training set), and train it (``trainer.train_prm``;
   ``balance_positions`` weights the loss so the step index alone predicts
   nothing: MCTS paths end at their first error, so later steps are more
   often wrong and a tiny PRM otherwise learns that prior instead of reading);
4. on held-out test problems (the disjoint test split) sample N = 16
   candidates per problem from the same policy, score them all once with the
   trained PRM (``PRM.score_batch``, the fast engine) and report
   - ProcessBench step-error metrics (acc on wrong cases, acc on right cases,
     F1) against the checker's true first errors (``Problem.first_error``);
   - Best-of-N accuracy for every aggregation, PRM-weighted vote, majority
     vote, random (expected accuracy of a uniform pick) and pass@N for N in
     1, 2, 4, 8, 16 (each N averaged over the 16 / N disjoint groups of
     candidates);
   - ``report.json`` and ``accuracy_vs_n.png`` in the run directory.

Everything is seeded: the same config gives the same report (up to
floating-point nondeterminism of multi-threaded CPU kernels).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from mmprm_infer.aggregation import AGGREGATIONS as _LIBRARY_AGGREGATIONS
from mmprm_infer.aggregation import PROBABILITY_AGGREGATIONS
from mmprm_infer.selection import select

__all__ = ["PipelineConfig", "ReadingStages", "PRESETS", "preset_config", "run_pipeline",
           "rerank_example", "AGGREGATIONS"]

# every aggregation of the library, the probability-like ones first (the report's order)
AGGREGATIONS = (*PROBABILITY_AGGREGATIONS, *(a for a in _LIBRARY_AGGREGATIONS if a not in PROBABILITY_AGGREGATIONS))


@dataclass
class ReadingStages:
    """The recipe's research knobs: how the tiny PRM learns to read the picture before (and while)
    it is trained as a PRM (``prm_init``).  Off by default; the presets turn them on.  What each
    one bought: RESULTS.md."""

    with_image_text: bool = True  # the PRM's question carries the picture as text too (see prm_init)
    pretrain_steps: int = 0  # next-token pretraining on facts + reference solutions first (prm_init.pretrain_reading)
    verification_steps: int = 0  # then step verification at the marker (prm_init.pretrain_step_verification)
    verification_arithmetic: float = 0.0  # share of calculations among the verification statements
    row_verification_steps: int = 0  # then a second verification stage on row / column readings only
    # (prm_init.ROW_VERIFICATION_CURRICULUM): after the first, the marker checks only their last value
    verification_token_verdicts: float = 0.0  # weight of a verdict at every statement token in both stages
    # (right so far or not; prm_init.pretrain_step_verification's token_verdicts)
    verification_mix: float = 0.0  # verification drills added to the PRM's training set, per MCTS sample: the
    # comparison the verification stage grew then keeps being trained in the PRM's own layout (image included)

    def check_stages(self) -> None:
        """``ValueError`` naming the first knob out of range (or verification without the picture's text)."""
        if not 0.0 <= self.verification_arithmetic <= 1.0:
            raise ValueError(f"verification_arithmetic is a share in [0, 1], got {self.verification_arithmetic}")
        if self.verification_token_verdicts < 0:
            raise ValueError("verification_token_verdicts is a loss weight >= 0, "
                             f"got {self.verification_token_verdicts}")
        if self.verification_mix < 0:
            raise ValueError(f"verification_mix must be >= 0 (drills per MCTS sample), got {self.verification_mix}")
        for name in ("pretrain_steps", "verification_steps", "row_verification_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if (self.verification_mix or self.verification_steps or self.row_verification_steps) \
                and not self.with_image_text:
            raise ValueError("step verification checks readings against the picture's text: it needs "
                             "with_image_text=True (drop --no-image-text, or set verification_steps, "
                             "row_verification_steps and verification_mix to 0)")


@dataclass
class PipelineConfig(ReadingStages):
    """One run: the task's problems, annotation, labels, model, training and evaluation settings,
    plus the research knobs of ``ReadingStages`` (one flat set of keyword arguments, one flat
    ``config.json``).  ``ValueError`` on a setting out of range, before any work."""

    run_dir: str = "runs/pipeline"
    preset: str = "custom"
    seed: int = 0  # problem seed (train and test splits have disjoint problem seeds)
    templates: tuple[str, ...] | None = None  # question types (task.TEMPLATES); None: all of them
    policy_seed: int = 0
    # (a) annotation
    train_problems: int = 300
    num_rollouts: int = 16
    rollout_budget: int = 200
    max_search_count: int = 20
    # (b) labels
    granularity: str = "step"
    hard_labels: bool = True  # labels 1/0 by MC > 0 (the checker's notion of a wrong step)
    # (c) model
    model_kind: str = "internvl"  # "internvl" (mm-prm, images) | "text" (custom format, text-only task)
    hidden: int = 64
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 192
    image_size: int = 112
    balance_positions: bool = False  # loss weights: good/bad labels weigh the same at every step index (trainer)
    max_steps: int = 600
    batch_size: int = 8
    learning_rate: float | None = 2e-3
    warmup_ratio: float = 0.05
    eval_fraction: float = 0.05  # of the labelled samples held out for the trainer's eval log
    # (d) evaluation
    test_problems: int = 50
    n_candidates: int = 16
    ns: tuple[int, ...] = (1, 2, 4, 8, 16)
    aggregations: tuple[str, ...] = AGGREGATIONS
    vote_aggregation: str = "min"  # scores summed per answer by the PRM-weighted vote
    threshold: float = 0.5  # predicted first error: first step with reward < threshold
    score_batch_questions: int = 8
    example: bool = True  # print a reranking example at the end
    progress: bool = True
    ray: str | None = None  # score the held-out candidates on a Ray cluster ("auto" or an address; ray_scoring)
    threads: int | None = 1  # torch threads; 1 where runs share the cores (measured: 2 threads on a shared
    # 2-core machine was 5x slower per step than 1), 2 on an idle 2-core machine (1.5x faster than 1, the demo);
    # None leaves torch's default

    def __post_init__(self):
        self.ns = tuple(int(n) for n in self.ns)
        if self.templates is not None:
            from mmprm_infer.train.synthetic.task import TEMPLATES

            self.templates = tuple(self.templates)
            unknown = [t for t in self.templates if t not in TEMPLATES]
            if unknown or not self.templates:
                raise ValueError(f"templates must be a non-empty subset of {', '.join(TEMPLATES)}; "
                                 f"got {list(self.templates)}")
        bad = [n for n in self.ns if n < 1 or self.n_candidates % n]
        if bad:
            raise ValueError(f"every N must divide n_candidates={self.n_candidates}; got {bad}")
        if self.model_kind not in ("internvl", "text"):
            raise ValueError(f"model_kind must be 'internvl' or 'text', got {self.model_kind!r}")
        self.check_stages()


PRESETS: dict[str, dict[str, Any]] = {
    # about 4 minutes on 2 cores: the full preset's stages, short (2 layers; 400 pretraining, 600 + 300
    # verification and 2400 PRM steps; 2 threads: 1.5x faster per step than 1 on an idle machine);
    # 300 held-out problems (scoring them takes seconds).  Time against quality: RESULTS.md beside this file
    "demo": dict(train_problems=300, pretrain_steps=400, verification_steps=600, verification_arithmetic=0.3,
                 row_verification_steps=300, verification_token_verdicts=1.0, verification_mix=0.5, max_steps=2400,
                 test_problems=300, layers=2, learning_rate=1e-3, balance_positions=True, threads=2),
    # >= 200 held-out problems
    # ~35 min: reading pretraining (with drills) grows the copy circuit that checks a reading against the
    # picture's text; the PRM stage then runs at a lower rate so as not to erase it, on a position-balanced loss
    # step verification (verification_steps; its drills also join the PRM's training set, verification_mix)
    # then gives the marker a comparison to start from, and a second pass on rows and columns
    # (row_verification_steps) makes it check every value of those
    "full": dict(train_problems=2400, pretrain_steps=4000, verification_steps=5000, verification_arithmetic=0.3,
                 row_verification_steps=3000, verification_token_verdicts=1.0, verification_mix=0.5, max_steps=3000,
                 test_problems=300, layers=6, learning_rate=1e-3, balance_positions=True),
    # for tests: seconds
    "tiny": dict(train_problems=12, rollout_budget=48, max_search_count=6, max_steps=4, batch_size=4,
                 hidden=32, layers=1, intermediate=64, test_problems=4, example=False, progress=False),
}


def preset_config(name: str, **overrides) -> PipelineConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PipelineConfig(preset=name, **{**PRESETS[name], **overrides})


# --------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------
def _groups(n_candidates: int, n: int) -> list[list[int]]:
    return [list(range(g * n, (g + 1) * n)) for g in range(n_candidates // n)]


def _best_of_n(scores: Sequence[float], answers, idx: Sequence[int]) -> int:
    """The library's best-of-N (``selection.select``: the highest score, first on ties) over ``idx``."""
    chosen = select("best_of_n", [scores[i] for i in idx], [answers[i] for i in idx],
                    group_ids=range(len(idx))).best_index  # best-of-N looks at no group: none computed
    return idx[chosen]


def _vote(answers, correct, weights, idx) -> float:
    """Expected correctness of the answer with the highest total weight (ties split evenly).

    A statistic, not a selection: ``selection.weighted_vote`` / ``majority_vote`` pick one answer
    (ties to the group seen first) and group answers by math equivalence; this one groups the exact
    answer strings the checker compares and splits a tie between the tied answers, so a vote of two
    different answers at N = 2 scores 1/2 instead of favouring the first candidate.  The numbers in
    RESULTS.md were measured this way."""
    totals: dict[str, float] = defaultdict(float)
    for i in idx:
        if answers[i] is not None:
            totals[answers[i]] += weights[i]
    if not totals:
        return sum(correct[i] for i in idx) / len(idx)  # nothing answered: a uniform pick
    top = max(totals.values())
    winners = [a for a, w in totals.items() if math.isclose(w, top, rel_tol=1e-12, abs_tol=1e-12)]
    truth = {answers[i] for i in idx if correct[i]}
    return sum(a in truth for a in winners) / len(winners)


def selection_metrics(cases: list[dict], ns: Sequence[int], aggregations: Sequence[str], n_candidates: int,
                      vote_aggregation: str = "min") -> dict[str, dict[str, float]]:
    """accuracy[method][str(N)] over cases; each case has answers, correct, scores[agg]."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for n in ns:
        groups = _groups(n_candidates, n)
        acc: dict[str, float] = defaultdict(float)
        for case in cases:
            correct, answers = case["correct"], case["answers"]
            for idx in groups:
                w = 1.0 / (len(groups) * len(cases))
                acc["random"] += w * sum(correct[i] for i in idx) / len(idx)
                acc["pass"] += w * any(correct[i] for i in idx)
                acc["majority_vote"] += w * _vote(answers, correct, [1.0] * len(correct), idx)
                for agg in aggregations:
                    acc[f"prm_best_of_n/{agg}"] += w * correct[_best_of_n(case["scores"][agg], answers, idx)]
                vote_w = [max(s, 0.0) for s in case["scores"][vote_aggregation]]
                acc["prm_weighted_vote"] += w * _vote(answers, correct, vote_w, idx)
        for k, v in acc.items():
            out[k][str(n)] = v
    return dict(out)


# --------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(f"[pipeline] {msg}", flush=True)


def _build_samples(config: PipelineConfig, problems, ann_dir: Path):
    from mmprm_infer.train.labels import LabelConfig, label_stats, trees_to_samples
    from mmprm_infer.train.mcts import load_trees
    from mmprm_infer.train.synthetic.prm_init import prm_question

    by_id = {p.id: p for p in problems}
    trees = [t for t in load_trees(ann_dir) if str(t.get("id")) in by_id]
    samples = trees_to_samples(trees, LabelConfig(granularity=config.granularity, hard_labels=config.hard_labels,
                                                  seed=config.seed))
    for s in samples:  # the PRM's question: with the picture's text when asked (prm_init.prm_question)
        s.question = prm_question(by_id[s.id], config.with_image_text)
        if config.model_kind == "text":
            s.images = []
    return trees, samples, label_stats(samples)


def _final_loss(losses: list[float], last: int = 50) -> float | None:
    """Mean of the last ``last`` losses of a stage (None when it did not run)."""
    return sum(losses[-last:]) / len(losses[-last:]) if losses else None


def _verification_samples(config: PipelineConfig, problems, train_samples, n: int):
    """``n`` step-verification drills (``prm_init.verification_drill``, the PRM's full question) as
    labelled samples, over the problems (and with the images) of ``train_samples``."""
    from mmprm_infer.train.datasets import StepSample
    from mmprm_infer.train.synthetic.prm_init import verification_drill

    images = {s.id: s.image_paths for s in train_samples}
    pool = [p for p in problems if p.id in images]
    rng = random.Random(f"verification-{config.seed}")
    out = []
    for _ in range(n):
        p = rng.choice(pool)
        question, statements, labels = verification_drill(p, rng, arithmetic_share=config.verification_arithmetic)
        out.append(StepSample(question, statements, labels, [] if config.model_kind == "text" else images[p.id],
                              id=f"verification-{p.id}"))
    return out


def _score_cases(prm, problems, candidates, config: PipelineConfig, checkpoint: Path) -> list[list[list[float]]]:
    """Step rewards of every candidate, ``score_batch_questions`` problems per engine call
    (with ``config.ray``: the same calls on Ray actors that load ``checkpoint``)."""
    from mmprm_infer.io.progress import progress_bar
    from mmprm_infer.prm import ScoringItem
    from mmprm_infer.train.synthetic.prm_init import prm_question

    items = [ScoringItem(prm_question(p, config.with_image_text), cands,
                         None if config.model_kind == "text" else p.image) for p, cands in zip(problems, candidates)]
    bs = config.score_batch_questions
    if config.ray is not None:
        from mmprm_infer.integrations.ray_scoring import score_items

        return score_items(items, str(checkpoint), batch_questions=bs, address=config.ray, progress=config.progress)
    rewards: list[list[list[float]]] = []
    for start in progress_bar(range(0, len(items), bs), desc="score candidates", unit="batches",
                              disable=not config.progress):
        rewards.extend(prm.score_batch(items[start:start + bs]))
    return rewards


def run_pipeline(config: PipelineConfig) -> dict:
    """Annotate, label, train and evaluate; writes ``report.json`` and ``accuracy_vs_n.png`` under
    ``config.run_dir`` and returns the report."""
    import torch

    from mmprm_infer.aggregation import aggregate
    from mmprm_infer.answers import extract_answer
    from mmprm_infer.evaluation.metrics import step_error_f1
    from mmprm_infer.io.progress import quiet_transformers_progress
    from mmprm_infer.policy import PolicyPrompt
    from mmprm_infer.prm import PRM
    from mmprm_infer.train.mcts import MCTSConfig, annotate
    from mmprm_infer.train.synthetic.policy import SyntheticPolicy
    from mmprm_infer.train.synthetic.prm_init import build_task_prm
    from mmprm_infer.train.synthetic.task import annotation_items, make_problems
    from mmprm_infer.train.trainer import TrainConfig, train_prm

    started = time.perf_counter()
    timings: dict[str, float] = {}
    quiet_transformers_progress()
    if config.threads:
        torch.set_num_threads(config.threads)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    random.seed(config.seed)
    torch.manual_seed(config.seed)

    # (a) annotate
    t0 = time.perf_counter()
    kinds = {} if config.templates is None else {"templates": config.templates}
    train_problems = make_problems(config.train_problems, "train", config.seed, **kinds)
    test_problems = make_problems(config.test_problems, "test", config.seed, **kinds)
    assert not {p.seed for p in train_problems} & {p.seed for p in test_problems}
    policy = SyntheticPolicy(train_problems + test_problems, seed=config.policy_seed)
    mcts = MCTSConfig(num_rollouts=config.num_rollouts, rollout_budget=config.rollout_budget,
                      max_search_count=config.max_search_count)
    _log(f"(a) annotating {len(train_problems)} train problems with MCTS (k={config.num_rollouts}, "
         f"budget {config.rollout_budget})")
    text_only = config.model_kind == "text"
    ann = annotate(annotation_items(train_problems, text_only), policy, run_dir / "annotation", mcts,
                   text_only=text_only, progress=config.progress)
    timings["annotate_s"] = time.perf_counter() - t0

    # (b) labelled samples
    t0 = time.perf_counter()
    trees, samples, stats = _build_samples(config, train_problems, run_dir / "annotation")
    if not samples:
        raise RuntimeError("MCTS produced no labelled samples; annotate more problems")
    rng = random.Random(config.seed)
    ids = sorted({s.id for s in samples})
    rng.shuffle(ids)
    n_eval = max(1, int(len(ids) * config.eval_fraction)) if len(ids) > 1 else 0
    eval_ids = set(ids[:n_eval])
    train_samples = [s for s in samples if s.id not in eval_ids]
    eval_samples = [s for s in samples if s.id in eval_ids] or None
    drills = (_verification_samples(config, train_problems, train_samples,
                                    round(config.verification_mix * len(train_samples)))
              if config.verification_mix else [])
    train_samples += drills
    from mmprm_infer.train.datasets import save_samples

    save_samples(samples, run_dir / "samples.jsonl", "stepwise")
    timings["labels_s"] = time.perf_counter() - t0
    _log(f"(b) {len(trees)} trees -> {stats['samples']} samples ({stats['negatives']} negatives, "
         f"{stats['labelled_steps']} labelled steps); {len(train_samples)} train / "
         f"{len(eval_samples or [])} eval samples")

    # (c) build + train
    t0 = time.perf_counter()
    init_dir, fmt, fmt_options = build_task_prm(run_dir / "init", kind=config.model_kind, hidden=config.hidden,
                                                layers=config.layers, heads=config.heads, kv_heads=config.kv_heads,
                                                intermediate=config.intermediate, image_size=config.image_size,
                                                seed=config.seed)
    prm = PRM.from_pretrained(init_dir, format=fmt, dtype="float32", **fmt_options)
    n_params = sum(p.numel() for p in prm.model.parameters())
    pretrain_losses: list[float] = []
    verification_losses: list[float] = []
    row_verification_losses: list[float] = []
    if config.pretrain_steps:
        from mmprm_infer.train.synthetic.prm_init import pretrain_reading

        _log(f"(c) pretraining the text model on {len(train_problems)} reference solutions, "
             "reading and arithmetic drills, "
             f"{config.pretrain_steps} steps (next-token loss)")
        pretrain_losses = pretrain_reading(prm, train_problems, steps=config.pretrain_steps,
                                           batch_size=config.batch_size, with_image_text=config.with_image_text,
                                           seed=config.seed, progress=config.progress)
    if config.verification_steps:
        from mmprm_infer.train.synthetic.prm_init import pretrain_step_verification

        _log(f"(c) step verification at the step marker (true and perturbed readings and calculations), "
             f"{config.verification_steps} steps")
        verification_losses = pretrain_step_verification(prm, train_problems, steps=config.verification_steps,
                                                         arithmetic_share=config.verification_arithmetic,
                                                         token_verdicts=config.verification_token_verdicts,
                                                         seed=config.seed, progress=config.progress)
    if config.row_verification_steps:
        from mmprm_infer.train.synthetic.prm_init import ROW_VERIFICATION_CURRICULUM, pretrain_step_verification

        _log(f"(c) step verification on row and column readings only, {config.row_verification_steps} steps")
        row_verification_losses = pretrain_step_verification(
            prm, train_problems, steps=config.row_verification_steps, curriculum=ROW_VERIFICATION_CURRICULUM,
            token_verdicts=config.verification_token_verdicts, seed=config.seed + 1, progress=config.progress,
            desc="row verification")
    model_desc = (f"tiny InternVL (Qwen2 text {config.layers}x{config.hidden}, 1-layer ViT at {config.image_size}px), "
                  f"format mm-prm, image + {'picture as text + ' if config.with_image_text else ''}question"
                  if config.model_kind == "internvl" else
                  f"tiny Qwen2 causal LM {config.layers}x{config.hidden}, format custom, text-only task")
    _log(f"(c) training {model_desc}: {n_params / 1e6:.2f}M parameters, {config.max_steps} steps")
    train_cfg = TrainConfig(output_dir=run_dir / "prm", max_steps=config.max_steps, batch_size=config.batch_size,
                            learning_rate=config.learning_rate, warmup_ratio=config.warmup_ratio, seed=config.seed,
                            balance_positions=config.balance_positions,
                            eval_every=max(1, config.max_steps // 4), progress=config.progress)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*inference-mode tensors.*")
        result = train_prm(prm, train_samples, train_cfg, eval_samples)
    timings["train_s"] = time.perf_counter() - t0
    prm = PRM.from_pretrained(run_dir / "prm")  # what a user gets: the saved checkpoint, no arguments

    # (d) evaluate on held-out problems
    t0 = time.perf_counter()
    _log(f"(d) sampling {config.n_candidates} candidates for {len(test_problems)} held-out problems")
    prompts = [PolicyPrompt(p.prompt_question(config.model_kind == "text"),
                            [] if config.model_kind == "text" else [p.image]) for p in test_problems]
    candidates = policy.generate(prompts, n=config.n_candidates)
    step_lists = [[[s.strip() for s in c.split("\n\n") if s.strip()] for c in cands] for cands in candidates]
    rewards = _score_cases(prm, test_problems, step_lists, config, run_dir / "prm")
    timings["score_s"] = time.perf_counter() - t0
    cases, preds, truths = [], [], []
    for p, cands, steps_list, rw in zip(test_problems, candidates, step_lists, rewards):
        answers = [extract_answer(c) for c in cands]
        correct = [a == p.answer for a in answers]
        scores = {agg: [aggregate(r, agg) for r in rw] for agg in config.aggregations}
        if config.vote_aggregation not in scores:
            scores[config.vote_aggregation] = [aggregate(r, config.vote_aggregation) for r in rw]
        cases.append({"id": p.id, "answers": answers, "correct": correct, "scores": scores})
        for steps, r in zip(steps_list, rw):
            fe = p.first_error(steps)
            preds.append(r)
            truths.append(-1 if fe is None else fe)
    f1 = step_error_f1(preds, truths, threshold=config.threshold)
    accuracy = selection_metrics(cases, config.ns, config.aggregations, config.n_candidates, config.vote_aggregation)
    n_max = str(max(config.ns))
    best_agg = max(config.aggregations, key=lambda a: accuracy[f"prm_best_of_n/{a}"][n_max])
    timings["total_s"] = time.perf_counter() - started
    report = {
        "preset": config.preset,
        "config": asdict(config),
        "model": {"kind": config.model_kind, "format": fmt, "format_options": fmt_options, "description": model_desc,
                  "inputs": ("image + picture-as-text + question" if config.model_kind == "internvl" and
                             config.with_image_text else "image + question" if config.model_kind == "internvl"
                             else "text-only (picture as text)"),
                  "parameters": n_params, "checkpoint": str(run_dir / "prm")},
        "annotation": {"questions": ann.questions, "annotated": ann.annotated, "skipped": ann.skipped,
                       "rollouts": ann.rollouts, "rollouts_per_s": round(ann.rollouts_per_s, 1),
                       "trees": len(trees)},
        "labels": stats,
        "training": {"pretrain_steps": config.pretrain_steps, "balance_positions": config.balance_positions,
                     "pretrain_final_loss": _final_loss(pretrain_losses, 10),
                     "verification_steps": config.verification_steps,
                     "verification_final_loss": _final_loss(verification_losses),
                     "row_verification_steps": config.row_verification_steps,
                     "row_verification_final_loss": _final_loss(row_verification_losses),
                     "verification_token_verdicts": config.verification_token_verdicts,
                     "steps": result.steps, "epochs": result.epochs, "learning_rate": result.learning_rate,
                     "first_loss": result.losses[0], "final_loss": _final_loss(result.losses, 10),
                     "train_samples": len(train_samples), "verification_samples": len(drills),
                     "eval_samples": len(eval_samples or []),
                     "eval_history": result.eval_history},
        "test": {"problems": len(test_problems), "candidates_per_problem": config.n_candidates,
                 "candidates": sum(len(c) for c in candidates), "split": "test"},
        "step_error": f1,
        "accuracy": accuracy,
        "best_aggregation": best_agg,
        "summary": {
            "f1": f1["f1"], "acc_error": f1["acc_error"], "acc_correct": f1["acc_correct"],
            **{f"prm_best_of_{n_max}/{a}": accuracy[f"prm_best_of_n/{a}"][n_max] for a in config.aggregations},
            f"prm_weighted_vote@{n_max}": accuracy["prm_weighted_vote"][n_max],
            f"majority@{n_max}": accuracy["majority_vote"][n_max],
            "random": accuracy["random"][n_max],
            f"pass@{n_max}": accuracy["pass"][n_max],
        },
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    (run_dir / "test_cases.jsonl").write_text("".join(
        json.dumps({**c, "rewards": rw}) + "\n" for c, rw in zip(cases, rewards)))
    plot_accuracy(report, run_dir / "accuracy_vs_n.png")
    if config.example:
        rerank_example(prm, test_problems, step_lists, config, aggregate=SUMMARY_AGGREGATION)
    print_summary(report, run_dir)
    return report


def plot_accuracy(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = report["accuracy"]
    ns = sorted(int(n) for n in acc["random"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    best = report["best_aggregation"]
    styles = [("pass", "pass@N", "k:"), (f"prm_best_of_n/{best}", f"PRM best-of-N ({best})", "C0-o"),
              ("prm_best_of_n/min", "PRM best-of-N (min)", "C4--"), ("prm_weighted_vote", "PRM-weighted vote", "C1-s"),
              ("majority_vote", "majority vote", "C2-^"), ("random", "random", "C3-x")]
    seen = set()
    for key, label, style in styles:
        if key in acc and key not in seen:
            seen.add(key)
            ax.plot(ns, [100 * acc[key][str(n)] for n in ns], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N (candidates per problem)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Synthetic task, {report['test']['problems']} held-out problems, F1 {report['step_error']['f1']:.2f}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


SUMMARY_AGGREGATION = "min"  # the aggregation the summary table and the reranking example use
SUMMARY_NS = (1, 4, 16)


def print_summary(report: dict, run_dir: Path) -> None:
    """The run at a glance: step-error F1, a small accuracy table (PRM best-of-N with ``min``,
    PRM-weighted vote, majority vote, random, pass@N at N = 1, 4, 16 where measured) and where the
    report, the plot and the trained PRM are.  Every aggregation and N is in report.json."""
    s, acc = report["summary"], report["accuracy"]
    measured = sorted(int(n) for n in acc["random"])
    ns = [n for n in measured if n in SUMMARY_NS] or measured
    agg = SUMMARY_AGGREGATION if f"prm_best_of_n/{SUMMARY_AGGREGATION}" in acc else report["best_aggregation"]
    rows = [(f"PRM best-of-N ({agg})", f"prm_best_of_n/{agg}"), ("PRM-weighted vote", "prm_weighted_vote"),
            ("majority vote", "majority_vote"), ("random pick", "random"), ("pass@N (any right)", "pass")]
    print(f"\n=== held-out evaluation: {report['test']['problems']} problems x "
          f"{report['test']['candidates_per_problem']} candidates ({report['model']['inputs']}) ===")
    print(f"step-error (ProcessBench): F1 {s['f1']:.3f} (acc on wrong {s['acc_error']:.3f}, "
          f"acc on right {s['acc_correct']:.3f})")
    print("accuracy (%)".ljust(24) + "".join(f"N={n}".rjust(8) for n in ns))
    for label, key in rows:
        print(label.ljust(24) + "".join(f"{100 * acc[key][str(n)]:8.1f}" for n in ns))
    print(f"wall time {report['timings_s']['total_s']:.0f} s")
    print(f"report (every aggregation, N = {', '.join(map(str, measured))}): {run_dir / 'report.json'}")
    print(f"plot: {run_dir / 'accuracy_vs_n.png'}")
    print(f"trained PRM: {run_dir / 'prm'}  (PRM.from_pretrained('{run_dir / 'prm'}'))", flush=True)


def rerank_example(prm, problems, step_lists, config: PipelineConfig, aggregate: str | None = None) -> dict:
    """Print one held-out question, its candidates with step rewards, and the chosen answer
    (``rerank_batch``); prefers a question where majority vote and the PRM disagree."""
    from mmprm_infer.prm import ScoringItem
    from mmprm_infer.rerank import rerank_batch
    from mmprm_infer.train.synthetic.prm_init import prm_question

    aggregate = aggregate or "min"
    k = min(8, config.n_candidates)
    chosen = 0
    for i, (p, sl) in enumerate(zip(problems, step_lists)):  # a question with several distinct answers
        if len({s[-1] for s in sl[:k]}) >= 2:
            chosen = i
            break
    p, cands = problems[chosen], step_lists[chosen][:k]
    image = None if config.model_kind == "text" else p.image
    item = ScoringItem(prm_question(p, config.with_image_text), cands, image)
    res = rerank_batch([item], prm, aggregate=aggregate, strategy="best_of_n")[0]
    maj = rerank_batch([item], None, strategy="majority_vote")[0]
    print("=== reranking example (a held-out problem; the PRM sees the picture"
          f"{' and its text rendering' if config.with_image_text else ''}) ===")
    print(item.question)
    print(f"(reference answer {p.answer}; the picture: {'a 3x3 table' if p.kind == 'grid' else 'a bar chart'})\n")
    for i, (steps, rw, score, ans) in enumerate(zip(cands, res.step_rewards, res.scores, res.answers)):
        mark = "right" if ans == p.answer else "WRONG"
        print(f"Candidate {i}: answer {ans} ({mark}), score ({aggregate}) {score:.3f}")
        for s, r in zip(steps, rw):
            print(f"    {r:.3f}  {s}")
    print(f"\nPRM best-of-{k} ({aggregate}) chose candidate {res.best_index}: answer {res.answers[res.best_index]} "
          f"({'right' if res.answers[res.best_index] == p.answer else 'wrong'}); majority vote: "
          f"{maj.answers[maj.best_index]}; reference {p.answer}", flush=True)
    return res.to_dict()
