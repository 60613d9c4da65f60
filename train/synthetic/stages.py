"""The synthetic recipe's stages, each one step of ``run_pipeline`` (and of the demo's miniature run):

1. ``annotate_problems``: OmegaPRM MCTS over the train problems, the synthetic policy writing rollouts;
2. ``labelled_samples``: trees -> step-labelled samples, a held-out slice for the trainer's eval log, and
   the step-verification drills that join the training set (``verification_mix``);
3. ``train_task_prm``: a tiny PRM built from scratch, its reading and verification stages, then PRM training;
4. ``sample_candidates`` and ``evaluate_candidates``: N policy samples per held-out problem, scored once with a PRM,
   with the step-error F1 against the checker's first errors and the accuracy curves (``report``).
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmprm_infer.aggregation import aggregate
from mmprm_infer.answers import extract_answer
from mmprm_infer.evaluation.metrics import step_error_f1
from mmprm_infer.integrations.ray_scoring import score_items as ray_score_items
from mmprm_infer.io.progress import progress_bar
from mmprm_infer.policy import PolicyPrompt
from mmprm_infer.prm import PRM, ScoringItem
from mmprm_infer.train.datasets import StepSample, save_samples
from mmprm_infer.train.labels import LabelConfig, label_stats, trees_to_samples
from mmprm_infer.train.mcts import MCTSConfig, annotate, load_trees
from mmprm_infer.train.synthetic import prm_init
from mmprm_infer.train.synthetic.presets import PipelineConfig
from mmprm_infer.train.synthetic.report import selection_metrics
from mmprm_infer.train.synthetic.task import Problem, annotation_items, split_steps
from mmprm_infer.train.trainer import TrainConfig, TrainResult, train_prm

__all__ = ["log", "annotate_problems", "Samples", "labelled_samples", "TrainedPRM", "train_task_prm",
           "Candidates", "sample_candidates", "Evaluation", "evaluate_candidates"]


def log(msg: str) -> None:
    print(f"[pipeline] {msg}", flush=True)


def _final_loss(losses: list[float], last: int = 50) -> float | None:
    """Mean of the last ``last`` losses of a stage (None when it did not run)."""
    return sum(losses[-last:]) / len(losses[-last:]) if losses else None


# --------------------------------------------------------------------------
# (a) annotation
# --------------------------------------------------------------------------
def annotate_problems(config: PipelineConfig, problems: Sequence[Problem], policy, ann_dir: Path):
    """MCTS trees of ``problems`` under ``ann_dir`` (resumable: trees on disk are kept); the run's stats."""
    mcts = MCTSConfig(num_rollouts=config.num_rollouts, rollout_budget=config.rollout_budget,
                      max_search_count=config.max_search_count)
    log(f"(a) annotating {len(problems)} train problems with MCTS (k={config.num_rollouts}, "
        f"budget {config.rollout_budget})")
    text_only = config.model_kind == "text"
    return annotate(annotation_items(problems, text_only), policy, ann_dir, mcts, text_only=text_only,
                    progress=config.progress)


# --------------------------------------------------------------------------
# (b) labelled samples
# --------------------------------------------------------------------------
@dataclass
class Samples:
    """What the labelling stage hands to training."""

    trees: list[dict]
    stats: dict
    train: list[StepSample]  # MCTS samples of the training questions, then the verification drills
    eval: list[StepSample] | None  # MCTS samples of the held-out questions (the trainer's eval log)
    drills: int  # verification drills among ``train``


def _verification_samples(config: PipelineConfig, problems, train_samples, n: int) -> list[StepSample]:
    """``n`` step-verification drills (``prm_init.verification_drill``, the PRM's full question) as
    labelled samples, over the problems (and with the images) of ``train_samples``."""
    images = {s.id: s.image_paths for s in train_samples}
    pool = [p for p in problems if p.id in images]
    rng = random.Random(f"verification-{config.seed}")
    out = []
    for _ in range(n):
        p = rng.choice(pool)
        question, statements, labels = prm_init.verification_drill(p, rng,
                                                                   arithmetic_share=config.verification_arithmetic)
        out.append(StepSample(question, statements, labels, [] if config.model_kind == "text" else images[p.id],
                              id=f"verification-{p.id}"))
    return out


def labelled_samples(config: PipelineConfig, problems: Sequence[Problem], run_dir: Path) -> Samples:
    """Trees -> samples (the PRM's question: with the picture's text when asked), split by question into
    training and a held-out ``eval_fraction``; every sample is also written to ``run_dir/samples.jsonl``."""
    by_id = {p.id: p for p in problems}
    trees = [t for t in load_trees(run_dir / "annotation") if str(t.get("id")) in by_id]
    samples = trees_to_samples(trees, LabelConfig(granularity=config.granularity, hard_labels=config.hard_labels,
                                                  seed=config.seed))
    if not samples:
        raise RuntimeError("MCTS produced no labelled samples; annotate more problems")
    for s in samples:
        s.question = prm_init.prm_question(by_id[s.id], config.with_image_text)  # type: ignore[index]  # ids set
        if config.model_kind == "text":
            # StepSample has no `images` field (its images are image_paths): this sets a stray attribute
            s.images = []  # type: ignore[attr-defined]
    rng = random.Random(config.seed)
    ids = sorted({s.id for s in samples})  # type: ignore[type-var]  # trees_to_samples sets every id
    rng.shuffle(ids)
    n_eval = max(1, int(len(ids) * config.eval_fraction)) if len(ids) > 1 else 0
    eval_ids = set(ids[:n_eval])
    train = [s for s in samples if s.id not in eval_ids]
    held = [s for s in samples if s.id in eval_ids] or None
    drills = (_verification_samples(config, problems, train, round(config.verification_mix * len(train)))
              if config.verification_mix else [])
    save_samples(samples, run_dir / "samples.jsonl", "stepwise", images_from_cwd=True)
    stats = label_stats(samples)
    log(f"(b) {len(trees)} trees -> {stats['samples']} samples ({stats['negatives']} negatives, "
        f"{stats['labelled_steps']} labelled steps); {len(train) + len(drills)} train / {len(held or [])} eval samples")
    return Samples(trees, stats, train + drills, held, len(drills))


# --------------------------------------------------------------------------
# (c) build and train
# --------------------------------------------------------------------------
@dataclass
class TrainedPRM:
    """The trained PRM as a user gets it (loaded back from its checkpoint) and what training recorded."""

    prm: PRM
    checkpoint: Path
    format: str
    format_options: dict
    description: str
    parameters: int
    result: TrainResult
    stage_losses: dict[str, list[float]] = field(default_factory=dict)  # pretrain, verification, row_verification


def model_description(config: PipelineConfig) -> str:
    if config.model_kind == "internvl":
        return (f"tiny InternVL (Qwen2 text {config.layers}x{config.hidden}, 1-layer ViT at {config.image_size}px), "
                f"format mm-prm, image + {'picture as text + ' if config.with_image_text else ''}question")
    return f"tiny Qwen2 causal LM {config.layers}x{config.hidden}, format custom, text-only task"


def _reading_stages(config: PipelineConfig, prm: PRM, problems: Sequence[Problem]) -> dict[str, list[float]]:
    """Next-token pretraining, then step verification (all statements, then rows and columns only): the
    stages ``ReadingStages`` turns on, each with its losses."""
    losses: dict[str, list[float]] = {"pretrain": [], "verification": [], "row_verification": []}
    if config.pretrain_steps:
        log(f"(c) pretraining the text model on {len(problems)} reference solutions, reading and arithmetic "
            f"drills, {config.pretrain_steps} steps (next-token loss)")
        losses["pretrain"] = prm_init.pretrain_reading(prm, problems, steps=config.pretrain_steps,
                                                       batch_size=config.batch_size,
                                                       with_image_text=config.with_image_text, seed=config.seed,
                                                       progress=config.progress)
    if config.verification_steps:
        log("(c) step verification at the step marker (true and perturbed readings and calculations), "
            f"{config.verification_steps} steps")
        losses["verification"] = prm_init.pretrain_step_verification(
            prm, problems, steps=config.verification_steps, arithmetic_share=config.verification_arithmetic,
            token_verdicts=config.verification_token_verdicts, seed=config.seed, progress=config.progress)
    if config.row_verification_steps:
        log(f"(c) step verification on row and column readings only, {config.row_verification_steps} steps")
        losses["row_verification"] = prm_init.pretrain_step_verification(
            prm, problems, steps=config.row_verification_steps, curriculum=prm_init.ROW_VERIFICATION_CURRICULUM,
            token_verdicts=config.verification_token_verdicts, seed=config.seed + 1, progress=config.progress,
            desc="row verification")
    return losses


def train_task_prm(config: PipelineConfig, problems: Sequence[Problem], samples: Samples,
                   run_dir: Path) -> TrainedPRM:
    """Build the task's tiny PRM from scratch under ``run_dir/init``, run its reading stages, train it
    as a PRM into ``run_dir/prm``, and load it back from there (no arguments: the checkpoint records
    its format)."""
    init_dir, fmt, fmt_options = prm_init.build_task_prm(
        run_dir / "init", kind=config.model_kind, hidden=config.hidden, layers=config.layers, heads=config.heads,
        kv_heads=config.kv_heads, intermediate=config.intermediate, image_size=config.image_size, seed=config.seed)
    prm = PRM.from_pretrained(init_dir, format=fmt, dtype="float32", **fmt_options)
    parameters = sum(p.numel() for p in prm.model.parameters())
    stage_losses = _reading_stages(config, prm, problems)
    if config.save_reading_checkpoint:  # the model before PRM training: a base to train PRMs from
        prm.save_pretrained(run_dir / "reading")
    description = model_description(config)
    log(f"(c) training {description}: {parameters / 1e6:.2f}M parameters, {config.max_steps} steps")
    train_cfg = TrainConfig(output_dir=run_dir / "prm", max_steps=config.max_steps, batch_size=config.batch_size,
                            learning_rate=config.learning_rate, warmup_ratio=config.warmup_ratio, seed=config.seed,
                            balance_positions=config.balance_positions,
                            eval_every=max(1, config.max_steps // 4), progress=config.progress)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*inference-mode tensors.*")
        result = train_prm(prm, samples.train, train_cfg, samples.eval)
    return TrainedPRM(PRM.from_pretrained(run_dir / "prm"), run_dir / "prm", fmt, fmt_options, description,
                      parameters, result, stage_losses)


def training_report(config: PipelineConfig, trained: TrainedPRM, samples: Samples) -> dict:
    result, losses = trained.result, trained.stage_losses
    return {"pretrain_steps": config.pretrain_steps, "balance_positions": config.balance_positions,
            "pretrain_final_loss": _final_loss(losses.get("pretrain", []), 10),
            "verification_steps": config.verification_steps,
            "verification_final_loss": _final_loss(losses.get("verification", [])),
            "row_verification_steps": config.row_verification_steps,
            "row_verification_final_loss": _final_loss(losses.get("row_verification", [])),
            "verification_token_verdicts": config.verification_token_verdicts,
            "steps": result.steps, "epochs": result.epochs, "learning_rate": result.learning_rate,
            "first_loss": result.losses[0], "final_loss": _final_loss(result.losses, 10),
            "train_samples": len(samples.train), "verification_samples": samples.drills,
            "eval_samples": len(samples.eval or []), "eval_history": result.eval_history}


# --------------------------------------------------------------------------
# (d) held-out evaluation
# --------------------------------------------------------------------------
@dataclass
class Candidates:
    """The policy's samples for the held-out problems: the texts and each split into its steps."""

    texts: list[list[str]]
    steps: list[list[list[str]]]


def sample_candidates(policy, problems: Sequence[Problem], config: PipelineConfig) -> Candidates:
    """``config.n_candidates`` policy samples per problem."""
    log(f"(d) sampling {config.n_candidates} candidates for {len(problems)} held-out problems")
    text_only = config.model_kind == "text"
    prompts = [PolicyPrompt(p.prompt_question(text_only), [] if text_only else [p.image]) for p in problems]
    texts = policy.generate(prompts, n=config.n_candidates)
    return Candidates(texts, [[split_steps(c) for c in cands] for cands in texts])


def scoring_items(problems: Sequence[Problem], step_lists, config: PipelineConfig) -> list[ScoringItem]:
    """What the PRM reads: its question (with the picture's text when asked), the candidates, the image."""
    return [ScoringItem(prm_init.prm_question(p, config.with_image_text), cands,
                        None if config.model_kind == "text" else p.image) for p, cands in zip(problems, step_lists)]


def score_items(prm: PRM, items: list[ScoringItem], config: PipelineConfig,
                checkpoint: Path) -> list[list[list[float]]]:
    """Step rewards of every candidate, ``score_batch_questions`` problems per engine call
    (with ``config.ray``: the same calls on Ray actors that load ``checkpoint``)."""
    bs = config.score_batch_questions
    if config.ray is not None:
        return ray_score_items(items, str(checkpoint), batch_questions=bs, address=config.ray,
                               progress=config.progress)
    rewards: list[list[list[float]]] = []
    for start in progress_bar(range(0, len(items), bs), desc="score candidates", unit="batches",
                              disable=not config.progress):
        rewards.extend(prm.score_batch(items[start:start + bs]))
    return rewards


@dataclass
class Evaluation:
    """One PRM on the held-out candidates: per-problem cases, step-error F1, accuracy curves."""

    cases: list[dict]  # id, answers, correct, scores[aggregation], rewards
    step_error: dict
    accuracy: dict[str, dict[str, float]]
    best_aggregation: str
    score_s: float

    def summary(self, config: PipelineConfig) -> dict:
        """The headline numbers at the largest N (``report.json``'s ``summary``)."""
        n_max = str(max(config.ns))
        acc = self.accuracy
        return {"f1": self.step_error["f1"], "acc_error": self.step_error["acc_error"],
                "acc_correct": self.step_error["acc_correct"],
                **{f"prm_best_of_{n_max}/{a}": acc[f"prm_best_of_n/{a}"][n_max] for a in config.aggregations},
                f"prm_weighted_vote@{n_max}": acc["prm_weighted_vote"][n_max],
                f"majority@{n_max}": acc["majority_vote"][n_max], "random": acc["random"][n_max],
                f"pass@{n_max}": acc["pass"][n_max]}


def evaluate_candidates(prm: PRM, problems: Sequence[Problem], candidates: Candidates, config: PipelineConfig,
                 checkpoint: Path) -> Evaluation:
    """Score every candidate once and measure: the step-error F1 (first reward below ``config.threshold``
    against the checker's first error) and Best-of-N / vote / random / pass@N curves."""
    t0 = time.perf_counter()
    rewards = score_items(prm, scoring_items(problems, candidates.steps, config), config, checkpoint)
    score_s = time.perf_counter() - t0
    cases, preds, truths = [], [], []
    aggregations = dict.fromkeys([*config.aggregations, config.vote_aggregation])
    for p, texts, steps_list, rw in zip(problems, candidates.texts, candidates.steps, rewards):
        answers = [extract_answer(t) for t in texts]
        cases.append({"id": p.id, "answers": answers, "correct": [a == p.answer for a in answers],
                      "scores": {agg: [aggregate(r, agg) for r in rw] for agg in aggregations}, "rewards": rw})
        for steps, r in zip(steps_list, rw):
            first_error = p.first_error(steps)
            preds.append(r)
            truths.append(-1 if first_error is None else first_error)
    accuracy = selection_metrics(cases, config.ns, config.aggregations, config.vote_aggregation)
    n_max = str(max(config.ns))
    best = max(config.aggregations, key=lambda a: accuracy[f"prm_best_of_n/{a}"][n_max])
    return Evaluation(cases, step_error_f1(preds, truths, threshold=config.threshold), accuracy, best, score_s)


def set_threads(config: PipelineConfig) -> None:
    if config.threads:
        torch.set_num_threads(config.threads)
