"""The end-to-end pipeline (annotate -> label -> train -> evaluate), on a tiny preset.

Asserts structure and consistency of the report, not the accuracy targets
(the tiny preset trains for a handful of steps).
"""

from __future__ import annotations

import json
import math

import pytest

from mmprm_infer.prm import PRM
from mmprm_infer.train.synthetic.pipeline import PRESETS, preset_config, run_pipeline
from mmprm_infer.train.synthetic.presets import REPORTED_AGGREGATIONS


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline")
    config = preset_config("tiny", run_dir=str(run_dir), test_problems=5)
    report = run_pipeline(config)
    return run_dir, report


def test_report_has_every_metric(tiny_run):
    run_dir, report = tiny_run
    saved = json.loads((run_dir / "report.json").read_text())
    assert saved["summary"] == pytest.approx(report["summary"], nan_ok=True)
    for key in ("f1", "acc_error", "acc_correct", "num_error", "num_correct", "num_cases"):
        assert key in report["step_error"]
    acc = report["accuracy"]
    methods = {"random", "pass", "majority_vote", "prm_weighted_vote",
               *(f"prm_best_of_n/{a}" for a in REPORTED_AGGREGATIONS)}
    assert methods <= set(acc)
    for m in methods:
        assert sorted(acc[m], key=int) == ["1", "2", "4", "8", "16"]
        assert all(0.0 <= v <= 1.0 for v in acc[m].values())
    assert report["test"]["problems"] == 5
    assert report["test"]["candidates"] == 5 * 16
    assert report["step_error"]["num_cases"] == 5 * 16
    assert report["model"]["format"] == "mm-prm" and report["model"]["kind"] == "internvl"
    assert report["labels"]["samples"] > 0 and report["training"]["steps"] == PRESETS["tiny"]["max_steps"]


def test_accuracies_are_consistent(tiny_run):
    run_dir, report = tiny_run
    acc = report["accuracy"]
    cases = [json.loads(line) for line in (run_dir / "test_cases.jsonl").read_text().splitlines()]
    assert len(cases) == 5
    mean_correct = sum(sum(c["correct"]) / len(c["correct"]) for c in cases) / len(cases)
    for n in acc["random"]:
        # random = expected accuracy of a uniform pick = mean single-sample correctness, for every N
        assert acc["random"][n] == pytest.approx(mean_correct)
        for method, values in acc.items():
            assert values[n] <= acc["pass"][n] + 1e-9, (method, n)
    # with one candidate every method picks it
    for method, values in acc.items():
        if method != "pass":
            assert values["1"] == pytest.approx(mean_correct), method
    assert acc["pass"]["1"] == pytest.approx(mean_correct)
    # pass@N never decreases with N
    passes = [acc["pass"][n] for n in sorted(acc["pass"], key=int)]
    assert passes == sorted(passes)
    s = report["step_error"]
    if not (math.isnan(s["acc_error"]) or math.isnan(s["acc_correct"])):
        denom = s["acc_error"] + s["acc_correct"]
        assert s["f1"] == pytest.approx(0.0 if denom == 0 else 2 * s["acc_error"] * s["acc_correct"] / denom)


def test_checkpoint_reloads_without_arguments(tiny_run):
    run_dir, report = tiny_run
    prm = PRM.from_pretrained(run_dir / "prm")
    assert prm.format.name == "mm-prm"
    cases = [json.loads(line) for line in (run_dir / "test_cases.jsonl").read_text().splitlines()]
    assert all(len(c["rewards"]) == 16 for c in cases)


def test_plot_and_outputs_exist(tiny_run):
    run_dir, _ = tiny_run
    png = run_dir / "accuracy_vs_n.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "samples.jsonl").is_file()
    assert any((run_dir / "annotation" / "trees").glob("*.json"))


def test_cli_text_fallback_runs(tmp_path, capsys):
    from mmprm_infer.cli import main

    rc = main(["pipeline", "--preset", "tiny", "--run-dir", str(tmp_path), "--model-kind", "text",
                        "--train-problems", "8", "--test-problems", "2", "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"]["format"] == "custom"
    assert PRM.from_pretrained(tmp_path / "prm").format.name == "custom"
    assert "held-out evaluation" in capsys.readouterr().out


def test_bad_preset_config():
    with pytest.raises(ValueError):
        preset_config("nope")
    with pytest.raises(ValueError):
        preset_config("tiny", ns=(1, 3))


def test_cli_annotate_dispatch(tmp_path, capsys):
    from mmprm_infer.cli import main

    rc = main(["annotate", "--num-problems", "2", "--out-dir", str(tmp_path), "--rollout-budget", "32",
               "--max-search-count", "4", "--no-progress"])
    assert rc == 0
    assert len(list((tmp_path / "trees").glob("*.json"))) == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["annotated"] == 2


def test_pretrain_reading_option(tmp_path):
    report = run_pipeline(preset_config("tiny", run_dir=str(tmp_path), train_problems=6, test_problems=2,
                                        pretrain_steps=2, verification_steps=3, row_verification_steps=2,
                                        verification_token_verdicts=1.0, verification_mix=0.5,
                                        balance_positions=True))
    assert report["training"]["pretrain_steps"] == 2 and report["training"]["balance_positions"]
    assert report["training"]["pretrain_final_loss"] > 0
    assert report["training"]["verification_steps"] == 3 and report["training"]["verification_final_loss"] > 0
    assert report["training"]["row_verification_steps"] == 2
    assert report["training"]["row_verification_final_loss"] > 0
    assert report["training"]["verification_token_verdicts"] == 1.0
    # the drills joined the MCTS samples in the PRM's training set
    assert report["training"]["verification_samples"] > 0
    assert report["training"]["train_samples"] > report["training"]["verification_samples"]
    assert PRM.from_pretrained(tmp_path / "prm").format.name == "mm-prm"


def test_step_verification_options_are_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="with_image_text"):
        preset_config("tiny", run_dir=str(tmp_path), verification_steps=3, with_image_text=False)
    with pytest.raises(ValueError, match="verification_arithmetic"):
        preset_config("tiny", run_dir=str(tmp_path), verification_arithmetic=1.5)
    with pytest.raises(ValueError, match="verification_token_verdicts"):
        preset_config("tiny", run_dir=str(tmp_path), verification_token_verdicts=-1.0)
    with pytest.raises(ValueError, match="verification_mix"):
        preset_config("tiny", run_dir=str(tmp_path), verification_mix=-1)
    with pytest.raises(ValueError, match="with_image_text"):
        preset_config("tiny", run_dir=str(tmp_path), row_verification_steps=3, with_image_text=False)
    with pytest.raises(ValueError, match="row_verification_steps"):
        preset_config("tiny", run_dir=str(tmp_path), row_verification_steps=-1)


def test_summary_is_a_small_table_with_the_paths(tiny_run, capsys):
    from mmprm_infer.train.synthetic.report import print_summary

    run_dir, report = tiny_run
    print_summary(report, run_dir)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("accuracy (%)"))
    assert header.split()[2:] == ["N=1", "N=4", "N=16"]  # only these of the measured 1, 2, 4, 8, 16
    rows = {line[:24].strip(): line[24:].split() for line in out.splitlines() if line[:24].strip() in (
        "PRM best-of-N (min)", "PRM-weighted vote", "majority vote", "random pick", "pass@N (any right)")}
    assert len(rows) == 5
    acc = report["accuracy"]
    assert [float(v) for v in rows["PRM best-of-N (min)"]] == pytest.approx(
        [100 * acc["prm_best_of_n/min"][n] for n in ("1", "4", "16")], abs=0.051)
    assert [float(v) for v in rows["pass@N (any right)"]] == pytest.approx(
        [100 * acc["pass"][n] for n in ("1", "4", "16")], abs=0.051)
    for name in ("report.json", "accuracy_vs_n.png", "prm"):
        assert str(run_dir / name) in out


def test_templates_are_checked():
    from mmprm_infer.train.synthetic.task import TEMPLATES

    with pytest.raises(ValueError, match="templates"):
        preset_config("tiny", templates=("bars_pair_times_bar", "nope"))
    with pytest.raises(ValueError, match="templates"):
        preset_config("tiny", templates=())
    config = preset_config("tiny", templates=["bars_pair_times_bar"])
    assert config.templates == ("bars_pair_times_bar",) and set(config.templates) <= set(TEMPLATES)
