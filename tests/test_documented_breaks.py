"""The breaks found by running the docs as a new user would, each fixed and pinned here."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmprm_infer.cli import main


# --- mmprm eval: shard names, its own report in the data folder, the reward cache said out loud ----------------
def _processbench_rows(offset: int, n: int = 3) -> list[dict]:
    return [{"id": f"p{offset + i}", "problem": f"What is {i} + {offset}?", "steps": [f"{i} + {offset} = {i + offset}.",
             f"So {i + offset}."], "label": -1 if i % 2 else 1} for i in range(n)]


def test_eval_reads_hf_shards_and_never_its_own_report(qwen_prm_dir, tmp_path, capsys):
    data = tmp_path / "ProcessBench" / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(_processbench_rows(0)), data / "gsm8k-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(_processbench_rows(10)), data / "gsm8k-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(_processbench_rows(20)), data / "math-00000-of-00001.parquet")
    report = data / "report.json"  # written into the data folder, then the same command again
    cmd = ["eval", "processbench", "--prm", str(qwen_prm_dir), "--data", str(data), "--report", str(report),
           "--device", "cpu", "--no-progress"]
    assert main(cmd) == 0
    first = json.loads(report.read_text())
    assert sorted(first["splits"]) == ["gsm8k", "math"] and first["splits"]["gsm8k"]["n"] == 6
    capsys.readouterr()
    assert main([*cmd, "--threshold", "0.7"]) == 0  # the report and its rewards cache are not read as data
    again = json.loads(report.read_text())
    assert sorted(again["splits"]) == ["gsm8k", "math"] and again["threshold"] == 0.7
    err = capsys.readouterr().err
    assert f"9 of 9 items' step rewards reused from {report}.rewards.json" in err and "--no-cache" in err


def test_eval_names_file_line_and_field(qwen_prm_dir, tmp_path):
    bad = tmp_path / "gsm8k.jsonl"
    rows = _processbench_rows(0, 2)
    rows[1]["steps"] = "one string"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match=r"gsm8k\.jsonl line 2: field 'steps' must be"):
        main(["eval", "processbench", "--prm", str(qwen_prm_dir), "--data", str(bad), "--report",
              str(tmp_path / "r.json"), "--device", "cpu"])


# --- mmprm train reads Parquet (and names the file when it cannot) ---------------------------------------------
def test_train_reads_parquet_and_names_bad_files(tmp_path):
    from mmprm_infer.cli.train import load_training_data
    from mmprm_infer.train.datasets import StepSample, to_stepwise_record

    rows = [to_stepwise_record(StepSample(f"q{i}?", ["a.", "b."], [1.0, 0.0]), soft=True) for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    samples = load_training_data([str(tmp_path / "x.parquet")])
    assert [s.labels for s in samples] == [[1.0, 0.0]] * 3 and samples[0].question == "q0?"
    (tmp_path / "y.parquet").write_bytes(b"\x00\xcc not parquet")
    with pytest.raises(ValueError, match=r"y\.parquet: not a Parquet file"):
        load_training_data([str(tmp_path / "y.parquet")])
    rows[2].pop("soft_labels")
    pq.write_table(pa.Table.from_pylist(rows[2:]), tmp_path / "z.parquet")
    with pytest.raises(ValueError, match=r"z\.parquet row 1: missing field 'labels'"):
        load_training_data([str(tmp_path / "z.parquet")])


# --- annotate --export writes image paths relative to the file, which is how train reads them ------------------
def test_annotate_export_then_train_reads_the_images(tmp_path, monkeypatch):
    from mmprm_infer.cli.train import load_training_data

    monkeypatch.chdir(tmp_path)  # relative paths, as the docs' command gives them
    assert main(["annotate", "--num-problems", "2", "--output-dir", "runs/ann", "--export", "runs/ann/samples.jsonl",
                 "--granularity", "step", "--k", "2", "--rollout-budget", "6", "--max-search-count", "2",
                 "--no-progress"]) in (0, 1)
    rows = [json.loads(line) for line in Path("runs/ann/samples.jsonl").read_text().splitlines()]
    assert rows and all(not str(img).startswith("runs/") for r in rows for img in ([r["image"]] if isinstance(
        r.get("image"), str) else r.get("image", [])))
    samples = load_training_data(["runs/ann/samples.jsonl"])
    assert samples and all(Path(p).is_file() for s in samples for p in s.image_paths)


# --- annotate --data with a policy that writes nothing: a warning and a failing status, not "samples: 0" -------
def test_annotate_own_questions_says_when_nothing_came_out(tmp_path, monkeypatch, capsys):
    from mmprm_infer.integrations import ray_annotate

    class Silent:
        def generate(self, prompts, n, **sampling):
            return [[""] * n for _ in prompts]

    monkeypatch.setattr(ray_annotate, "hf_policy_factory", lambda *a, **k: Silent)
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "config.json").write_text("{}")
    (tmp_path / "q.jsonl").write_text(json.dumps({"id": "a", "question": "1 + 1?", "correct_answer": "2"}) + "\n")
    status = main(["annotate", "--data", str(tmp_path / "q.jsonl"), "--policy-hf", str(tmp_path / "policy"),
                   "--method", "mc", "--output-dir", str(tmp_path / "ann"), "--export", str(tmp_path / "s.jsonl"),
                   "--no-progress"])
    out = capsys.readouterr()
    assert status == 1
    assert "the policy wrote no solution with steps for 1 question(s) (a)" in out.err
    assert "no labelled samples" in out.err
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert "policy_rates" not in summary and summary["samples"] == 0  # no synthetic policy ran


def test_annotate_help_names_every_policy_for_own_questions():
    from mmprm_infer.cli import build_parser

    parser = build_parser("annotate", only=True)
    text = parser._subparsers._group_actions[0].choices["annotate"].format_help()
    assert "--policy-hf, --policy-url or --policy-vllm" in " ".join(text.split())


# --- bench.ray_scaling builds `mmprm score`'s options with the command's own parser ---------------------------
def test_ray_scaling_single_machine_run(shepherd_dir, tmp_path):
    from bench.ray_scaling import single_machine

    src = tmp_path / "q.jsonl"
    src.write_text(json.dumps({"question": "2 + 2?", "candidates": ["2 + 2 = 4.\n\nSo 4."]}) + "\n")
    seconds = single_machine(shepherd_dir, src, tmp_path / "out.jsonl", threads=1, batch_questions=1)
    assert seconds > 0 and len(json.loads((tmp_path / "out.jsonl").read_text())["step_rewards"][0]) == 2


def test_score_names_the_file_line_and_field(shepherd_dir, tmp_path):
    data = tmp_path / "in.jsonl"
    rows = [{"question": "q?", "candidates": ["a."]}, {"question": 3, "candidates": ["a."]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match=r"mmprm score: .*in\.jsonl: line 2: 'question' must be a string, got int"):
        main(["score", "--prm", str(shepherd_dir), "--format", "math-shepherd", "--data", str(data), "--output",
              str(tmp_path / "out.jsonl"), "--device", "cpu", "--no-progress"])
