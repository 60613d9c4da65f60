"""The built-in default job (``mmprm demo``): the library's main job with a trained PRM, and the pipeline that
makes one, in miniature.

1. Fresh held-out problems: ``test_problems`` synthetic problems of the test split, problem seed
   ``HELD_OUT_SEED_BASE + seed`` (never the problems the shipped PRM was trained or evaluated on), and
   16 candidates each from the synthetic policy (policy seed ``seed``).
2. The shipped PRM (``trained_prm/`` beside this file: the ``full`` preset's PRM, how it was built in its
   ``provenance.json``) scores them once and reranks them: step-error F1, Best-of-N with every aggregation,
   PRM-weighted vote, majority vote, random pick and pass@N.
3. The pipeline in miniature (the ``demo`` preset): OmegaPRM annotation of train problems, a tiny PRM built
   from scratch and trained for a few minutes, scored on the same candidates.
4. ``report.json`` (its ``summary``: the shipped PRM's numbers; ``trained_here``: the miniature run's),
   ``accuracy_vs_n.png`` (both PRMs' curves), a reranking example, and the claim checked against ``CLAIM``.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mmprm_infer.io.progress import quiet_transformers_progress
from mmprm_infer.prm import PRM
from mmprm_infer.train.synthetic import report as reports
from mmprm_infer.train.synthetic import stages
from mmprm_infer.train.synthetic.policy import SyntheticPolicy
from mmprm_infer.train.synthetic.presets import PipelineConfig, preset_config
from mmprm_infer.train.synthetic.task import make_problems

__all__ = ["SHIPPED_PRM", "HELD_OUT_SEED_BASE", "CLAIM", "check_claim", "run_demo"]

SHIPPED_PRM = Path(__file__).resolve().parent / "trained_prm"
HELD_OUT_SEED_BASE = 1000  # the shipped PRM saw the problems of seed 0 (train split) and was evaluated on seed 0's
# test split: the demo's held-out problems come from seeds 1000 and up


# What the demo shows on any machine (the shipped PRM, at N = 16, on >= 300 held-out problems).
CLAIM: dict[str, Any] = {"aggregation": "min", "n": 16, "min_problems": 300, "min_f1": 0.7, "over_majority": 0.05,
         "over_random": 0.15}


def check_claim(report: dict) -> list[tuple[str, bool, str]]:
    """(target, met, measured) for each target of ``CLAIM`` against a demo report's summary."""
    s, n, agg = report["summary"], CLAIM["n"], CLAIM["aggregation"]
    best, majority, rand = s[f"prm_best_of_{n}/{agg}"], s[f"majority@{n}"], s["random"]
    return [
        (f"held-out problems >= {CLAIM['min_problems']}", report["test"]["problems"] >= CLAIM["min_problems"],
         str(report["test"]["problems"])),
        (f"step-error F1 >= {CLAIM['min_f1']}", s["f1"] >= CLAIM["min_f1"], f"{s['f1']:.3f}"),
        (f"best-of-{n} ({agg}) >= majority vote + {100 * CLAIM['over_majority']:.0f}",
         best >= majority + CLAIM["over_majority"], f"{100 * best:.1f} vs {100 * majority:.1f}"),
        (f"best-of-{n} ({agg}) >= random pick + {100 * CLAIM['over_random']:.0f}",
         best >= rand + CLAIM["over_random"], f"{100 * best:.1f} vs {100 * rand:.1f}"),
    ]


def _evaluation_report(evaluation: stages.Evaluation, config: PipelineConfig) -> dict:
    return {"step_error": evaluation.step_error, "accuracy": evaluation.accuracy,
            "best_aggregation": evaluation.best_aggregation, "summary": evaluation.summary(config),
            "score_s": round(evaluation.score_s, 2)}


def _print_comparison(shipped: stages.Evaluation, trained: stages.Evaluation) -> None:
    agg = reports.SUMMARY_AGGREGATION
    ns = reports.summary_ns(shipped.accuracy)
    for name, ev in (("shipped PRM (full preset)", shipped), ("PRM trained here (demo preset)", trained)):
        s = ev.step_error
        print(f"step-error (ProcessBench), {name}: F1 {s['f1']:.3f} (acc on wrong {s['acc_error']:.3f}, "
              f"acc on right {s['acc_correct']:.3f})")
    acc, mini = shipped.accuracy, trained.accuracy
    reports.print_accuracy_table([
        (f"shipped PRM best-of-N ({agg})", acc[f"prm_best_of_n/{agg}"]),
        ("shipped PRM-weighted vote", acc["prm_weighted_vote"]),
        (f"PRM trained here, best-of-N ({agg})", mini[f"prm_best_of_n/{agg}"]),
        ("PRM trained here, weighted vote", mini["prm_weighted_vote"]),
        ("majority vote", acc["majority_vote"]), ("random pick", acc["random"]), ("pass@N (any right)", acc["pass"]),
    ], ns, width=36)


def run_demo(workdir: str | Path = "runs/demo", *, seed: int = 0, threads: int | None = 2, test_problems: int = 300,
             progress: bool = True, **mini_overrides) -> dict:
    """The demo (see the module docstring); returns the report it writes to ``workdir/report.json``.
    ``mini_overrides``: settings of the miniature pipeline run (``PipelineConfig`` fields)."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    quiet_transformers_progress()
    workdir = Path(workdir)
    config = preset_config("demo", run_dir=str(workdir), seed=seed, policy_seed=seed, threads=threads,
                           test_problems=test_problems, progress=progress, **mini_overrides)
    stages.set_threads(config)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    random.seed(seed)
    torch.manual_seed(seed)
    held_out = make_problems(test_problems, "test", HELD_OUT_SEED_BASE + seed)
    train_problems = make_problems(config.train_problems, "train", seed)
    policy = SyntheticPolicy(train_problems + held_out, seed=seed)
    candidates = stages.sample_candidates(policy, held_out, config)

    stages.log(f"(1) the shipped PRM ({SHIPPED_PRM.name}/, built by `mmprm pipeline --preset full`) scores "
               f"{len(held_out)} fresh held-out problems x {config.n_candidates} candidates")
    shipped = PRM.from_pretrained(SHIPPED_PRM)
    shipped_eval = stages.evaluate_candidates(shipped, held_out, candidates, config, SHIPPED_PRM)
    timings["shipped_prm_score_s"] = shipped_eval.score_s
    n, acc = str(max(config.ns)), shipped_eval.accuracy
    stages.log(f"(1) shipped PRM: step-error F1 {shipped_eval.step_error['f1']:.3f}; at N = {n} best-of-N "
               f"{100 * acc['prm_best_of_n/' + reports.SUMMARY_AGGREGATION][n]:.1f} %, PRM-weighted vote "
               f"{100 * acc['prm_weighted_vote'][n]:.1f} %, majority vote {100 * acc['majority_vote'][n]:.1f} %, "
               f"random pick {100 * acc['random'][n]:.1f} %")

    stages.log("(2) the pipeline in miniature: annotate, label and train a tiny PRM from scratch")
    t0 = time.perf_counter()
    ann = stages.annotate_problems(config, train_problems, policy, workdir / "annotation")
    samples = stages.labelled_samples(config, train_problems, workdir)
    trained = stages.train_task_prm(config, train_problems, samples, workdir)
    trained_eval = stages.evaluate_candidates(trained.prm, held_out, candidates, config, trained.checkpoint)
    timings["pipeline_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started

    provenance = json.loads((SHIPPED_PRM / "provenance.json").read_text())
    report = {
        "demo": {"seed": seed, "threads": threads, "held_out_problem_seed": HELD_OUT_SEED_BASE + seed},
        "model": {"checkpoint": str(SHIPPED_PRM), "format": shipped.format.name,
                  "description": provenance["model"], "inputs": "image + picture-as-text + question",
                  "built_by": provenance["command"], "commit": provenance["commit"]},
        "test": {"problems": len(held_out), "candidates_per_problem": config.n_candidates,
                 "candidates": sum(len(c) for c in candidates.texts), "split": "test",
                 "problem_seed": HELD_OUT_SEED_BASE + seed, "policy_seed": seed},
        **_evaluation_report(shipped_eval, config),
        "trained_here": {
            "config": asdict(config),
            "model": {"description": trained.description, "parameters": trained.parameters,
                      "checkpoint": str(trained.checkpoint)},
            "annotation": {"questions": ann.questions, "annotated": ann.annotated, "rollouts": ann.rollouts},
            "labels": samples.stats,
            "training": stages.training_report(config, trained, samples),
            **_evaluation_report(trained_eval, config),
        },
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    checks = check_claim(report)
    report["claim"] = {"targets": CLAIM, "checks": [{"target": t, "met": ok, "measured": m} for t, ok, m in checks],
                       "met": all(ok for _, ok, _ in checks)}
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    (workdir / "test_cases.jsonl").write_text("".join(
        json.dumps({**c, "rewards_trained_here": t["rewards"]}) + "\n"
        for c, t in zip(shipped_eval.cases, trained_eval.cases)))
    agg = reports.SUMMARY_AGGREGATION
    reports.plot_accuracy([
        reports.Curve(shipped_eval.accuracy, "pass", "pass@N", "k:"),
        reports.Curve(shipped_eval.accuracy, f"prm_best_of_n/{agg}", f"shipped PRM best-of-N ({agg})", "C0-o"),
        reports.Curve(shipped_eval.accuracy, "prm_weighted_vote", "shipped PRM-weighted vote", "C1-s"),
        reports.Curve(trained_eval.accuracy, f"prm_best_of_n/{agg}", f"PRM trained here, best-of-N ({agg})", "C0--"),
        reports.Curve(trained_eval.accuracy, "prm_weighted_vote", "PRM trained here, weighted vote", "C1--"),
        reports.Curve(shipped_eval.accuracy, "majority_vote", "majority vote", "C2-^"),
        reports.Curve(shipped_eval.accuracy, "random", "random", "C3-x"),
    ], f"Synthetic task, {len(held_out)} fresh held-out problems", workdir / "accuracy_vs_n.png")
    reports.rerank_example(shipped, stages.scoring_items(held_out, candidates.steps, config), held_out,
                           aggregate=agg, with_image_text=config.with_image_text)
    print(f"\n=== {len(held_out)} fresh held-out problems x {config.n_candidates} candidates "
          "(image + picture-as-text + question) ===")
    _print_comparison(shipped_eval, trained_eval)
    print("\nthe claim, on this machine:")
    for target, ok, measured in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {target}: {measured}")
    print(f"wall time {timings['total_s']:.0f} s (shipped PRM scoring {timings['shipped_prm_score_s']:.0f} s, "
          f"pipeline in miniature {timings['pipeline_s']:.0f} s)")
    print(f"report: {workdir / 'report.json'}\nplot: {workdir / 'accuracy_vs_n.png'}")
    print(f"shipped PRM: {SHIPPED_PRM}  (PRM.from_pretrained; how it was built: {SHIPPED_PRM / 'provenance.json'})")
    print(f"PRM trained here: {trained.checkpoint}", flush=True)
    return report
