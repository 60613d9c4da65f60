"""The demo (`mmprm demo`): the shipped PRM scores fresh held-out problems, the pipeline runs in miniature
beside it, and the report carries the shipped PRM's numbers and the claim checked against them.

Runs on few problems with the tiny preset's miniature run (seconds), so it checks the wiring and the
report's consistency; the claim's numbers themselves are checked by `.ci/run` on the full demo.
"""

from __future__ import annotations

import json

import pytest

from mmprm_infer.cli import main
from mmprm_infer.prm import PRM
from mmprm_infer.train.synthetic import demo
from mmprm_infer.train.synthetic.presets import PRESETS
from mmprm_infer.train.synthetic.task import make_problems, problem_seeds

# the miniature run at the tiny preset's sizes, its reading stages a few steps each (the demo preset runs them)
TINY = {**{k: v for k, v in PRESETS["tiny"].items() if k not in ("test_problems", "progress", "example")},
        "pretrain_steps": 2, "verification_steps": 2, "row_verification_steps": 2}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    report = demo.run_demo(workdir, seed=1, threads=1, test_problems=6, progress=False, **TINY)
    return workdir, report


def test_the_shipped_prm_loads_with_no_arguments_and_says_how_it_was_built():
    prm = PRM.from_pretrained(demo.SHIPPED_PRM)
    assert prm.format.name == "mm-prm"
    provenance = json.loads((demo.SHIPPED_PRM / "provenance.json").read_text())
    assert provenance["command"].startswith("mmprm pipeline --preset full")
    assert len(provenance["commit"]) == 40 and provenance["config"]["preset"] == "full"
    assert provenance["summary"]["f1"] >= demo.CLAIM["min_f1"]


def test_held_out_problems_are_fresh():
    """Never a problem the shipped PRM was trained on (train split, its seed) or evaluated on (its test split)."""
    provenance = json.loads((demo.SHIPPED_PRM / "provenance.json").read_text())
    cfg = provenance["config"]
    seen = set(problem_seeds(cfg["train_problems"], "train", cfg["seed"])) | set(
        problem_seeds(cfg["test_problems"], "test", cfg["seed"]))
    for seed in (0, 1, 2):
        held_out = {p.seed for p in make_problems(300, "test", demo.HELD_OUT_SEED_BASE + seed)}
        assert len(held_out) == 300 and not held_out & seen


def test_report_carries_the_shipped_prm_and_the_run_in_miniature(demo_run):
    workdir, report = demo_run
    saved = json.loads((workdir / "report.json").read_text())
    assert saved["summary"] == pytest.approx(report["summary"])
    s = report["summary"]
    for key in ("f1", "acc_error", "acc_correct", "prm_best_of_16/min", "prm_weighted_vote@16", "majority@16",
                "random", "pass@16"):
        assert 0.0 <= s[key] <= 1.0, key
    assert report["test"]["problems"] == 6 and report["test"]["candidates"] == 6 * 16
    assert report["model"]["checkpoint"] == str(demo.SHIPPED_PRM)
    mini = report["trained_here"]
    assert mini["training"]["steps"] == TINY["max_steps"] and mini["labels"]["samples"] > 0
    assert set(mini["summary"]) == set(s)
    # both PRMs scored the very same candidates: same answers, so the same majority, random and pass@N
    for key in ("majority@16", "random", "pass@16"):
        assert mini["summary"][key] == s[key]
    for name in ("accuracy_vs_n.png", "prm/config.json", "test_cases.jsonl"):
        assert (workdir / name).is_file(), name
    cases = [json.loads(line) for line in (workdir / "test_cases.jsonl").read_text().splitlines()]
    assert len(cases) == 6 and all(len(c["rewards"]) == len(c["rewards_trained_here"]) == 16 for c in cases)


def test_the_claim_is_judged_from_the_numbers(demo_run):
    _, report = demo_run
    checks = {c["target"]: c["met"] for c in report["claim"]["checks"]}
    s = report["summary"]
    assert checks["held-out problems >= 300"] is False  # 6 problems here
    assert checks["step-error F1 >= 0.7"] == (s["f1"] >= 0.7)
    assert checks["best-of-16 (min) >= majority vote + 5"] == (s["prm_best_of_16/min"] >= s["majority@16"] + 0.05)
    assert report["claim"]["met"] is False
    raised = dict(report, summary=dict(s, f1=0.9, **{"prm_best_of_16/min": 0.9, "majority@16": 0.6, "random": 0.4}),
                  test=dict(report["test"], problems=300))
    assert all(ok for _, ok, _ in demo.check_claim(raised))
    assert not all(ok for _, ok, _ in demo.check_claim(dict(raised, summary=dict(raised["summary"], f1=0.69))))


def test_demo_command_passes_its_options(tmp_path, monkeypatch):
    calls = {}
    monkeypatch.setattr(demo, "run_demo", lambda workdir, **kw: calls.update(workdir=workdir, **kw) or {})
    assert main(["demo", "--workdir", str(tmp_path), "--seed", "2", "--threads", "1", "--test-problems", "7"]) == 0
    assert calls == {"workdir": str(tmp_path), "seed": 2, "threads": 1, "test_problems": 7, "progress": True}
