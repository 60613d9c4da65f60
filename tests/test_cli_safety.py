"""Nothing lost: output files, bad lines, exit codes, options
checked before the model loads, annotation on a broken disk, Ctrl-C, byte-order marks."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch

from mmprm_infer.cli import main
from mmprm_infer.io import records
from mmprm_infer.io.records import PRMSpec

EXIT_RECORDS_FAILED = 3  # README: the run finished and some records are error records
BLANK_LINE = "blank line"  # README: a blank input line's record is {"line": N, "skipped": "blank line"}

GOOD = {"id": "a", "question": "1+1?", "candidates": ["1+1=2\n\n\\boxed{2}", "1+1=3\n\n\\boxed{3}"]}
OTHER = {"id": "b", "question": "2*3?", "candidates": [["2*3=6", "\\boxed{6}"]]}


def _lines(path, lines: list[bytes | str]) -> bytes:
    data = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    path.write_bytes(data)
    return data


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _score(prm_dir, src, dst, *extra):
    return main(["score", "--prm", str(prm_dir), "-i", str(src), "-o", str(dst), "--quiet", *extra])


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


@pytest.fixture()
def no_model_load(monkeypatch):
    """Option errors must surface before the (slow) checkpoint load: loading fails the test."""
    def refuse(*_, **__):
        raise AssertionError("the PRM was loaded before the options were checked")
    monkeypatch.setattr(PRMSpec, "load", refuse)


# --- 1. input equal to output --------------------------------------------------------------------
def test_output_onto_the_input_is_refused_and_the_input_kept(qwen_prm_dir, tmp_path, no_model_load):
    src = tmp_path / "a.jsonl"
    data = _lines(src, [json.dumps(GOOD)])
    link = tmp_path / "link.jsonl"
    link.symlink_to(src)
    for out in (src, link, tmp_path / "." / "a.jsonl"):
        with pytest.raises(SystemExit, match="is the input file"):
            _score(qwen_prm_dir, src, out)
    assert src.read_bytes() == data


def test_ray_score_file_refuses_its_input_as_output(qwen_prm_dir, tmp_path):
    from mmprm_infer.integrations.ray_scoring import score_file

    src = tmp_path / "a.jsonl"
    data = _lines(src, [json.dumps(GOOD)])
    with pytest.raises(ValueError, match="is the input file"):
        score_file(src, src, qwen_prm_dir, address=None)  # refused before any cluster starts
    assert src.read_bytes() == data


# --- 2. atomic output ----------------------------------------------------------------------------
def test_a_failed_run_keeps_the_previous_output(qwen_prm_dir, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    dst.write_text("previous run\n")
    _lines(src, [json.dumps(GOOD), "{not json", json.dumps(OTHER)])
    with pytest.raises(SystemExit, match="line 2: not valid JSON"):
        _score(qwen_prm_dir, src, dst, "--batch-questions", "1")
    assert dst.read_text() == "previous run\n"
    assert _leftovers(tmp_path) == []


def test_a_full_disk_is_one_clear_error_and_the_previous_output_stays(qwen_prm_dir, tmp_path, monkeypatch):
    import mmprm_infer.io.files as files

    class FullDisk:  # a file on a disk that fills after 10 bytes
        def __init__(self, real):
            self.real, self.room = real, 10

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(data)
            return self.real.write(data)

        def __getattr__(self, name):
            return getattr(self.real, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.real.__exit__(*exc)

    monkeypatch.setattr(files, "open", lambda *a, **k: FullDisk(open(*a, **k)), raising=False)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    dst.write_text("previous run\n")
    _lines(src, [json.dumps(GOOD), json.dumps(OTHER)])
    with pytest.raises(SystemExit, match="No space left on device.*untouched"):
        _score(qwen_prm_dir, src, dst)
    assert dst.read_text() == "previous run\n"
    assert _leftovers(tmp_path) == []


def test_an_interrupted_run_writes_nothing(qwen_prm_dir, tmp_path, monkeypatch, capsys):
    def interrupt(*_, **__):
        raise KeyboardInterrupt
    monkeypatch.setattr(records, "process_window", interrupt)  # run_jsonl imports it at run time
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    dst.write_text("previous run\n")
    _lines(src, [json.dumps(GOOD)])
    assert _score(qwen_prm_dir, src, dst) == 130
    assert "interrupted" in capsys.readouterr().err
    assert dst.read_text() == "previous run\n" and _leftovers(tmp_path) == []


# --- 3. lines decoded one at a time; bad types fail their own line --------------------------------
def test_a_line_that_is_not_utf8_fails_alone(qwen_prm_dir, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    bad = b'{"question": "caf\xe9?", "candidates": ["x"]}'  # Latin-1, not UTF-8
    _lines(src, [json.dumps(GOOD), bad, json.dumps(OTHER)])
    # one window holding all three lines: the bad byte must not take its neighbours down
    assert _score(qwen_prm_dir, src, dst, "--on-error", "skip") == EXIT_RECORDS_FAILED
    out = _read(dst)
    assert [o["line"] for o in out] == [1, 2, 3]
    assert "step_rewards" in out[0] and "step_rewards" in out[2]
    assert "line 2: not valid UTF-8 (byte 0xe9 at column 18)" in out[1]["error"]


@pytest.mark.parametrize("image", [5, {"path": "x.png"}, [], ["ok.png", 3], ""])
def test_an_image_of_the_wrong_type_fails_alone(qwen_prm_dir, tmp_path, image):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _lines(src, [json.dumps(GOOD), json.dumps({**OTHER, "image": image}), json.dumps(OTHER)])
    assert _score(qwen_prm_dir, src, dst, "--on-error", "skip") == EXIT_RECORDS_FAILED
    out = _read(dst)
    assert "step_rewards" in out[0] and "step_rewards" in out[2]
    assert "'image' must be a path or a non-empty list of paths" in out[1]["error"]


def test_a_question_that_is_not_text_fails_alone(qwen_prm_dir, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _lines(src, [json.dumps({**GOOD, "question": ["1+1?"]}), json.dumps(OTHER)])
    assert _score(qwen_prm_dir, src, dst, "--on-error", "skip") == EXIT_RECORDS_FAILED
    out = _read(dst)
    assert "'question' must be a string, got list" in out[0]["error"] and "step_rewards" in out[1]


# --- 4. blank lines --------------------------------------------------------------------------------
def test_every_input_line_has_its_output_line_blank_ones_too(qwen_prm_dir, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _lines(src, [json.dumps(GOOD), "", "   ", json.dumps(OTHER)])
    assert _score(qwen_prm_dir, src, dst) == 0  # a blank line is not a failure
    out = _read(dst)
    assert len(dst.read_text().splitlines()) == 4
    assert out[1] == {"line": 2, "skipped": BLANK_LINE} and out[2] == {"line": 3, "skipped": BLANK_LINE}
    assert out[0]["id"] == "a" and out[3]["id"] == "b"


# --- 5. exit status and the engine checked up front ------------------------------------------------
def test_exit_status_says_records_failed(qwen_prm_dir, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _lines(src, ["{bad", "[]"])
    assert _score(qwen_prm_dir, src, dst, "--on-error", "skip") == EXIT_RECORDS_FAILED
    assert all("error" in o for o in _read(dst))
    _lines(src, [json.dumps(GOOD)])
    assert _score(qwen_prm_dir, src, dst, "--on-error", "skip") == 0


def test_max_errors_stops_the_run_and_writes_nothing(qwen_prm_dir, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _lines(src, ["{bad", json.dumps(GOOD), "{bad", "{bad"])
    with pytest.raises(SystemExit, match="line 3: .*more than --max-errors 1"):
        _score(qwen_prm_dir, src, dst, "--on-error", "skip", "--max-errors", "1")
    assert not dst.exists() and _leftovers(tmp_path) == []
    assert _score(qwen_prm_dir, src, dst, "--on-error", "skip", "--max-errors", "3") == EXIT_RECORDS_FAILED


def test_unknown_engine_is_refused_before_the_model_loads(qwen_prm_dir, tmp_path, no_model_load):
    src = tmp_path / "in.jsonl"
    _lines(src, [json.dumps(GOOD)])
    with pytest.raises(SystemExit, match="unknown --engine 'bogus'; choose one of .*'fast'"):
        _score(qwen_prm_dir, src, tmp_path / "out.jsonl", "--engine", "bogus", "--on-error", "skip")
    assert not (tmp_path / "out.jsonl").exists()


# --- 14. options checked before the model loads, messages instead of tracebacks ---------------------
@pytest.mark.parametrize("case", ["missing-folder", "onto-folder", "batch-0", "dtype", "device", "no-checkpoint",
                                  "max-errors-without-skip"])
def test_bad_options_are_messages_before_loading(qwen_prm_dir, tmp_path, no_model_load, capsys, case):
    src = tmp_path / "in.jsonl"
    _lines(src, [json.dumps(GOOD)])
    out, extra, prm = tmp_path / "out.jsonl", [], qwen_prm_dir
    expected = {
        "missing-folder": "folder of output .* does not exist",
        "onto-folder": "is a folder",
        "batch-0": "--batch-questions: must be >= 1",
        "dtype": "--dtype: invalid choice: 'fp64'",
        "device": "--device cuda, but this torch sees no CUDA device",
        "no-checkpoint": "is not a checkpoint folder",
        "max-errors-without-skip": "--max-errors goes with --on-error skip",
    }[case]
    if case == "missing-folder":
        out = tmp_path / "nowhere" / "out.jsonl"
    elif case == "onto-folder":
        out = tmp_path
    elif case == "batch-0":
        extra = ["--batch-questions", "0"]
    elif case == "dtype":
        extra = ["--dtype", "fp64"]
    elif case == "device":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        extra = ["--device", "cuda"]
    elif case == "no-checkpoint":
        prm = tmp_path
    else:
        extra = ["--max-errors", "2"]
    with pytest.raises(SystemExit) as info:
        _score(prm, src, out, *extra)
    message = str(info.value.code) + capsys.readouterr().err  # argparse prints, then exits with 2
    assert __import__("re").search(expected, message), message


def test_a_broken_checkpoint_config_is_a_message(qwen_prm_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(qwen_prm_dir, broken)
    (broken / "config.json").write_text('{"architectures": ["Qwen2ForProcessRewardModel"], ')
    src = tmp_path / "in.jsonl"
    _lines(src, [json.dumps(GOOD)])
    with pytest.raises(SystemExit, match=f"cannot load the PRM from {broken}: .*Error"):
        _score(broken, src, tmp_path / "out.jsonl")


# --- 15. byte-order mark -----------------------------------------------------------------------------
def test_a_utf8_byte_order_mark_is_not_part_of_line_1(qwen_prm_dir, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _lines(src, [b"\xef\xbb\xbf" + json.dumps(GOOD).encode(), json.dumps(OTHER)])
    assert _score(qwen_prm_dir, src, dst) == 0
    assert [o["id"] for o in _read(dst)] == ["a", "b"]


# --- 14/15. annotate: an unwritable folder, a full disk, Ctrl-C, a byte-order mark ---------------------
def _annotate(out_dir, *extra):

    return main(["annotate", "--num-problems", "3", "--k", "4", "--rollout-budget", "8", "--max-search-count", "2",
                          "--out-dir", str(out_dir), "--no-progress", *extra])


def test_annotate_into_a_folder_it_cannot_create_is_a_message(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert _annotate(blocker / "out") == 1
    assert "mmprm annotate: cannot write under" in capsys.readouterr().err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_annotate_stops_at_a_full_disk_instead_of_failing_every_question(tmp_path, monkeypatch, capsys, workers):
    import mmprm_infer.train.mcts as mcts

    real, tree_writes = mcts.write_json_atomic, []

    def full_disk(path, data):
        if "trees" in str(path):
            tree_writes.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(mcts, "write_json_atomic", full_disk)
    assert _annotate(tmp_path / "out", "--workers", workers) == 1
    assert "No space left on device" in capsys.readouterr().err
    # one worker: the first failed write stops the run; two: at most the one running beside it
    assert 1 <= len(tree_writes) <= int(workers)


def test_annotate_ctrl_c_is_a_message_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    import mmprm_infer.train.mcts as mcts

    real, calls = mcts.search_question, []

    def interrupted_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(mcts, "search_question", interrupted_on_the_second)
    assert _annotate(tmp_path / "out") == 130
    assert "interrupted; finished questions are kept" in capsys.readouterr().err
    monkeypatch.setattr(mcts, "search_question", real)
    assert _annotate(tmp_path / "out") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["skipped"], summary["annotated"]) == (1, 2)


def test_annotate_questions_with_a_byte_order_mark(tmp_path):
    from mmprm_infer.cli.annotate import load_questions

    path = tmp_path / "q.jsonl"
    _lines(path, [b"\xef\xbb\xbf" + json.dumps({"question": "1+1?", "answer": "2"}).encode(),
                  json.dumps({"question": "2+2?", "answer": "4"})])
    assert [q["question"] for q in load_questions(str(path))] == ["1+1?", "2+2?"]
    _lines(path, [json.dumps({"question": "1+1?", "answer": "2"}), b'{"question": "\xff", "answer": "1"}'])
    with pytest.raises(ValueError, match="line 2: not valid UTF-8"):
        load_questions(str(path))


# --- the CLI paths that had no test ----------------------------------------------------------------
def test_a_missing_input_file_is_named(tmp_path, no_model_load):
    with pytest.raises(SystemExit, match="input file .*nope.jsonl does not exist"):
        main(["score", "--prm", str(tmp_path), "-i", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o.jsonl")])


def test_rerank_needs_a_prm_unless_majority_vote(tmp_path):
    src = tmp_path / "in.jsonl"
    _lines(src, [json.dumps(GOOD)])
    with pytest.raises(SystemExit, match="--prm is required unless --strategy majority_vote"):
        main(["rerank", "-i", str(src), "-o", str(tmp_path / "o.jsonl"), "--strategy", "weighted_vote"])
    with pytest.raises(SystemExit, match="--ray needs --prm"):
        main(["rerank", "-i", str(src), "-o", str(tmp_path / "o.jsonl"), "--strategy", "majority_vote", "--ray"])
