"""The mmprm command line over JSONL: order, streaming errors, --on-error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mmprm_infer import PRM
from mmprm_infer.cli import main
from mmprm_infer.io.records import EXIT_RECORDS_FAILED


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture()
def records():
    return [
        {"id": "a", "question": "1+1?", "candidates": ["1+1=2\n\n\\boxed{2}", "1+1=3\n\n\\boxed{3}"]},
        {"id": "b", "question": "2*3?", "candidates": [["2*3=6", "\\boxed{6}"]]},
        {"id": "c", "question": "5-1?", "candidates": ["\\boxed{4}", "\\boxed{4}", "5-1=3\n\n\\boxed{3}"]},
    ]


def test_score_writes_one_record_per_line_in_order(qwen_prm_dir, tmp_path, records):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, [json.dumps(r) for r in records])
    assert main(["score", "--prm", str(qwen_prm_dir), "-i", str(src), "-o", str(dst), "--quiet",
                 "--batch-questions", "2"]) == 0
    out = _read(dst)
    assert [o["id"] for o in out] == ["a", "b", "c"]
    prm = PRM.from_pretrained(qwen_prm_dir)
    for rec, o in zip(records, out):
        want = prm.score(rec["question"], rec["candidates"])
        assert [len(r) for r in o["step_rewards"]] == [len(r) for r in want]
        for got_r, want_r in zip(o["step_rewards"], want):
            assert got_r == pytest.approx(want_r, abs=1e-5)
        assert o["scores"] == pytest.approx([min(r) for r in want], abs=1e-5)


def test_rerank_cli(qwen_prm_dir, tmp_path, records):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, [json.dumps(r) for r in records])
    assert main(["rerank", "--prm", str(qwen_prm_dir), "-i", str(src), "-o", str(dst), "--quiet",
                 "--strategy", "weighted_vote", "--aggregate", "mean"]) == 0
    out = _read(dst)
    assert [o["id"] for o in out] == ["a", "b", "c"]
    assert out[2]["answers"] == ["4", "4", "3"]
    assert all(o["strategy"] == "weighted_vote" and o["best"] == records[i]["candidates"][o["best_index"]]
               for i, o in enumerate(out))


def test_bad_line_fails_naming_its_line(qwen_prm_dir, tmp_path, records):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    bad = {"question": "x", "candidates": ["fine", ""]}
    _write(src, [json.dumps(records[0]), "{not json", json.dumps(bad)])
    with pytest.raises(SystemExit, match="line 2: not valid JSON"):
        main(["score", "--prm", str(qwen_prm_dir), "-i", str(src), "-o", str(dst), "--quiet"])


def test_on_error_skip_keeps_count_and_order(qwen_prm_dir, tmp_path, records):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [json.dumps(records[0]), "{not json", json.dumps({"question": "x", "candidates": ["ok", ""]}),
             json.dumps({"question": "y"}), json.dumps({"question": "z", "candidates": ["a"], "image": "missing.png"}),
             json.dumps(records[1])]
    _write(src, lines)
    assert main(["score", "--prm", str(qwen_prm_dir), "-i", str(src), "-o", str(dst), "--quiet",
                 "--on-error", "skip"]) == EXIT_RECORDS_FAILED  # finished, with error records
    out = _read(dst)
    assert [o["line"] for o in out] == [1, 2, 3, 4, 5, 6]
    assert "step_rewards" in out[0] and "step_rewards" in out[5]
    assert "not valid JSON" in out[1]["error"]
    assert "candidate 1 has an empty step" in out[2]["error"] or "candidate 1 has no steps" in out[2]["error"]
    assert "missing field" in out[3]["error"]
    assert "missing.png" in out[4]["error"]


def test_console_script_runs_majority_vote_without_prm(tmp_path, records):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, [json.dumps(r) for r in records])
    proc = subprocess.run([sys.executable, "-m", "mmprm_infer.cli", "rerank", "--strategy", "majority_vote",
                           "-i", str(src), "-o", str(dst), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = _read(dst)
    assert [o["answers"][o["best_index"]] for o in out] == ["2", "6", "4"]
