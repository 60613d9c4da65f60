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
floating-point nondeterminism of multi-threaded CPU kernels).  Settings and presets: ``presets``;
each stage: ``stages``; the curves, plot and summary: ``report``.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mmprm_infer.io.progress import quiet_transformers_progress
from mmprm_infer.train.synthetic import report as reports
from mmprm_infer.train.synthetic import stages
from mmprm_infer.train.synthetic.policy import SyntheticPolicy
from mmprm_infer.train.synthetic.presets import PRESETS, PipelineConfig, ReadingStages, preset_config
from mmprm_infer.train.synthetic.task import make_problems

__all__ = ["PipelineConfig", "ReadingStages", "PRESETS", "preset_config", "run_pipeline"]


def model_inputs(config: PipelineConfig) -> str:
    if config.model_kind == "text":
        return "text-only (picture as text)"
    return "image + picture-as-text + question" if config.with_image_text else "image + question"


def run_pipeline(config: PipelineConfig) -> dict:
    """Annotate, label, train and evaluate; writes ``report.json`` and ``accuracy_vs_n.png`` under
    ``config.run_dir`` and returns the report."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    quiet_transformers_progress()
    stages.set_threads(config)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    kinds = {} if config.templates is None else {"templates": config.templates}
    train_problems = make_problems(config.train_problems, "train", config.seed, **kinds)
    test_problems = make_problems(config.test_problems, "test", config.seed, **kinds)
    policy = SyntheticPolicy(train_problems + test_problems, seed=config.policy_seed)

    t0 = time.perf_counter()
    ann = stages.annotate_problems(config, train_problems, policy, run_dir / "annotation")
    timings["annotate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = stages.labelled_samples(config, train_problems, run_dir)
    timings["labels_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    trained = stages.train_task_prm(config, train_problems, samples, run_dir)
    timings["train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    candidates = stages.sample_candidates(policy, test_problems, config)
    evaluation = stages.evaluate_candidates(trained.prm, test_problems, candidates, config, trained.checkpoint)
    timings["score_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started
    report = {
        "preset": config.preset,
        "config": asdict(config),
        "model": {"kind": config.model_kind, "format": trained.format, "format_options": trained.format_options,
                  "description": trained.description, "inputs": model_inputs(config),
                  "parameters": trained.parameters, "checkpoint": str(trained.checkpoint)},
        "annotation": {"questions": ann.questions, "annotated": ann.annotated, "skipped": ann.skipped,
                       "rollouts": ann.rollouts, "rollouts_per_s": round(ann.rollouts_per_s, 1),
                       "trees": len(samples.trees)},
        "labels": samples.stats,
        "training": stages.training_report(config, trained, samples),
        "test": {"problems": len(test_problems), "candidates_per_problem": config.n_candidates,
                 "candidates": sum(len(c) for c in candidates.texts), "split": "test"},
        "step_error": evaluation.step_error,
        "accuracy": evaluation.accuracy,
        "best_aggregation": evaluation.best_aggregation,
        "summary": evaluation.summary(config),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    (run_dir / "test_cases.jsonl").write_text("".join(json.dumps(c) + "\n" for c in evaluation.cases))
    reports.plot_accuracy(reports.pipeline_curves(report), f"Synthetic task, {len(test_problems)} held-out problems, "
                          f"F1 {evaluation.step_error['f1']:.2f}", run_dir / "accuracy_vs_n.png")
    if config.example:
        reports.rerank_example(trained.prm, stages.scoring_items(test_problems, candidates.steps, config),
                               test_problems, with_image_text=config.with_image_text)
    reports.print_summary(report, run_dir)
    return report
