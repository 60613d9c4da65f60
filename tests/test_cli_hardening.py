"""Hardening, the command line's part: outputs that are devices, temp files of killed runs, lines that are
not text or too long, errors that were tracebacks, strict JSON reports.  Each test
failed against the code before the fix."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from mmprm_infer.cli import main
from mmprm_infer.io import files
from mmprm_infer.io.records import PRMSpec

GOOD = {"id": "a", "question": "1+1?", "candidates": ["1+1=2\n\n\\boxed{2}", "1+1=3\n\n\\boxed{3}"]}
OTHER = {"id": "b", "question": "2*3?", "candidates": [["2*3=6", "\\boxed{6}"]]}
EXIT_RECORDS_FAILED = 3


def _jsonl(path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def _score(prm_dir, src, dst, *extra):
    return main(["score", "--prm", str(prm_dir), "-i", str(src), "-o", str(dst), "--quiet", *extra])


def _leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if ".tmp-" in p.name)


@pytest.fixture()
def no_model_load(monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("the PRM was loaded before the problem was found")
    monkeypatch.setattr(PRMSpec, "load", refuse)


def _char_device(tmp_path) -> Path:
    """A character device to write to, whatever happens to it: a null device node of our own when root may make
    one (so a regression destroys only that), else a link to /dev/null (which a non-root run cannot replace)."""
    if os.geteuid() == 0:
        node = tmp_path / "mynull"
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        return node
    link = tmp_path / "to-dev-null"
    link.symlink_to("/dev/null")
    return link


def _is_char_device(path) -> bool:
    return stat.S_ISCHR(os.stat(path).st_mode)


# --------------------------------------------------------------------------
# 1. an output that is not a regular file is written in place, never renamed over
# --------------------------------------------------------------------------


def test_a_device_output_is_written_in_place(qwen_prm_dir, tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", [GOOD])
    device = _char_device(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(device)
    for out in (device, link):
        assert _score(qwen_prm_dir, src, out) == 0
        assert _is_char_device(device) and _is_char_device(out), f"{out} was replaced by a regular file"
    assert link.is_symlink() and _leftovers(tmp_path) == []


def test_a_fifo_output_is_written_in_place(qwen_prm_dir, tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", [GOOD, OTHER])
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = {}
    reader = threading.Thread(target=lambda: got.update(text=fifo.read_text()), daemon=True)
    reader.start()
    assert _score(qwen_prm_dir, src, fifo) == 0
    reader.join(60)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert [json.loads(line)["id"] for line in got["text"].splitlines()] == ["a", "b"]


def test_eval_report_onto_a_device_is_written_in_place(qwen_prm_dir, tmp_path):
    src = _jsonl(tmp_path / "cands.jsonl", [{"question": "What is 1 + 1?", "answer": "2",
                                             "candidates": ["1 + 1 = 2.\n\n\\boxed{2}", "\\boxed{3}"]}])
    device = _char_device(tmp_path)
    assert main(["eval", "bon", "--prm", str(qwen_prm_dir), "-i", str(src), "--report", str(device), "--quiet",
                 "--aggregations", "min"]) == 0
    assert _is_char_device(device)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cands.jsonl", device.name])  # no cache, no plot


def test_a_socket_output_is_refused_before_the_model_loads(qwen_prm_dir, tmp_path, no_model_load):
    src = _jsonl(tmp_path / "in.jsonl", [GOOD])
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        with pytest.raises(SystemExit, match="output .*sock is a socket; give a regular file path"):
            _score(qwen_prm_dir, src, path)
    assert stat.S_ISSOCK(os.stat(path).st_mode)


# --------------------------------------------------------------------------
# 6. a lone surrogate is one error record, not the end of the run
# --------------------------------------------------------------------------


def test_a_lone_surrogate_fails_its_own_line_only(qwen_prm_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([json.dumps(GOOD), '{"id": "x\\ud800", "question": "q", "candidates": ["a"]}',
                              '{"question": "q", "candidates": ["a"], "image": "pic\\udc00.png"}',
                              json.dumps(OTHER)]) + "\n")
    dst = tmp_path / "out.jsonl"
    assert _score(qwen_prm_dir, src, dst, "--on-error", "skip") == EXIT_RECORDS_FAILED
    out = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    assert [o["line"] for o in out] == [1, 2, 3, 4]
    assert "step_rewards" in out[0] and "step_rewards" in out[3]
    assert "field 'id' holds a lone UTF-16 surrogate" in out[1]["error"]
    assert "field 'image' holds a lone UTF-16 surrogate" in out[2]["error"]


# --------------------------------------------------------------------------
# 8. a line longer than the limit is refused before it is parsed or tokenized
# --------------------------------------------------------------------------


def test_a_line_over_the_limit_is_refused_before_tokenizing(qwen_prm_dir, tmp_path, monkeypatch):
    from mmprm_infer.io.data import LINE_CHARS_PER_CONTEXT_TOKEN
    from mmprm_infer.prm import PRM

    encoded = []
    encode = PRM.encode
    monkeypatch.setattr(PRM, "encode", lambda self, q, *a, **k: encoded.append(len(q)) or encode(self, q, *a, **k))
    context = json.loads((Path(qwen_prm_dir) / "config.json").read_text())["max_position_embeddings"]
    default = LINE_CHARS_PER_CONTEXT_TOKEN * context
    long = {"question": "so we compute x + y and " * (default // 24 + 1), "candidates": ["a"]}
    src = _jsonl(tmp_path / "in.jsonl", [GOOD, long, OTHER])
    dst = tmp_path / "out.jsonl"
    assert _score(qwen_prm_dir, src, dst, "--on-error", "skip") == EXIT_RECORDS_FAILED
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert "step_rewards" in out[0] and "step_rewards" in out[2]
    assert f"more than the limit of {default} (--max-line-chars; default" in out[1]["error"]
    assert all(n < 100 for n in encoded)  # the long question never reached the tokenizer
    # the limit is an option: raised, the line is read (and then fails on the model's context instead)
    assert _score(qwen_prm_dir, src, dst, "--on-error", "skip", "--max-line-chars", str(10 * default)) == 3
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert "--max-line-chars" not in out[1]["error"] and "context" in out[1]["error"]


# --------------------------------------------------------------------------
# 10. a killed run leaves no temp file behind for long
# --------------------------------------------------------------------------

GATED_SCORE = textwrap.dedent("""
    import pathlib, sys, time
    from mmprm_infer.cli import main
    from mmprm_infer.io import records  # mmprm score takes process_window from here when it runs
    gate, real = pathlib.Path(sys.argv[1]), records.process_window
    def gated(*args, **kwargs):  # the first window is scored, then the run waits: mid-way, its temp file open
        out = real(*args, **kwargs)
        (gate / "blocked").touch()
        while True:
            time.sleep(0.05)
    records.process_window = gated
    sys.exit(main(sys.argv[2:]))
""")


def _gated_run(prm_dir, src, dst, gate):
    proc = subprocess.Popen([sys.executable, "-c", GATED_SCORE, str(gate), "score", "--prm", str(prm_dir), "-i",
                             str(src), "-o", str(dst), "--quiet", "--batch-questions", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # only turns a hang into a failure
    while not (gate / "blocked").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the gated run never got mid-way"
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize("how", ["SIGTERM"])  # SIGHUP takes the same path (mmprm_infer.cli._termination_as_interrupt)
def test_a_terminated_run_removes_its_temp_file(qwen_prm_dir, tmp_path, how):
    src, dst, gate = _jsonl(tmp_path / "in.jsonl", [GOOD, OTHER]), tmp_path / "out.jsonl", tmp_path / "gate"
    gate.mkdir()
    dst.write_text("previous run\n")
    proc = _gated_run(qwen_prm_dir, src, dst, gate)
    assert _leftovers(tmp_path)  # mid-way: the temp file is there
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + getattr(signal, how) and "interrupted" in err and "Traceback" not in err, err
    assert _leftovers(tmp_path) == [] and dst.read_text() == "previous run\n"


def test_a_killed_runs_temp_file_is_removed_by_the_next_run(qwen_prm_dir, tmp_path):
    src, dst, gate = _jsonl(tmp_path / "in.jsonl", [GOOD, OTHER]), tmp_path / "out.jsonl", tmp_path / "gate"
    gate.mkdir()
    proc = _gated_run(qwen_prm_dir, src, dst, gate)
    proc.kill()  # kill -9: nothing of the run's own can clean up
    proc.communicate(timeout=120)
    stale = _leftovers(tmp_path)
    assert len(stale) == 1 and str(proc.pid) in stale[0]
    # another live process's temp file (a run beside this one) is not touched
    live = files.temp_name(dst.resolve()).with_name(f".{dst.name}.tmp-{files._host()}-1-1")
    live.write_text("a run of pid 1, alive")
    assert _score(qwen_prm_dir, src, dst) == 0
    assert _leftovers(tmp_path) == [live.name] and len(dst.read_text().splitlines()) == 2


# --------------------------------------------------------------------------
# 11. one-line messages instead of tracebacks
# --------------------------------------------------------------------------


def test_flush_and_close_failing_on_a_full_disk_is_one_message(qwen_prm_dir, tmp_path, monkeypatch):
    class FullAtFlush:  # writes are buffered; the disk fills when they are flushed, and the close flushes again
        def __init__(self, real):
            self.real = real

        def write(self, data):
            return len(data)

        def flush(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            self.real.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.real, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

    monkeypatch.setattr(files, "open", lambda *a, **k: FullAtFlush(open(*a, **k)), raising=False)
    src, dst = _jsonl(tmp_path / "in.jsonl", [GOOD]), tmp_path / "out.jsonl"
    dst.write_text("previous run\n")
    with pytest.raises(SystemExit) as exc:
        _score(qwen_prm_dir, src, dst)
    assert isinstance(exc.value.code, str) and "No space left on device" in exc.value.code
    assert dst.read_text() == "previous run\n" and _leftovers(tmp_path) == []


def test_a_file_size_limit_is_one_message(qwen_prm_dir, tmp_path):
    # the output (~4 KB) is over the limit and under the write buffer (8 KB): the flush fails, then the close
    src, dst = _jsonl(tmp_path / "in.jsonl", [GOOD] * 20), tmp_path / "out.jsonl"
    limit = 1024

    def small_files():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "mmprm_infer.cli", "score", "--prm", str(qwen_prm_dir), "-i",
                           str(src), "-o", str(dst), "--quiet"], preexec_fn=small_files, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert "mmprm score: cannot write" in proc.stderr and "File too large" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not dst.exists() and _leftovers(tmp_path) == []


def _read_only_folder(tmp_path) -> Path:
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
    else:  # root writes anywhere a permission bit forbids; sysfs refuses new files to root too
        folder = Path("/sys")
    try:
        with open(folder / ".probe", "w"):
            pass
    except OSError:
        return folder
    os.unlink(folder / ".probe")
    pytest.skip(f"no read-only folder here ({folder} is writable)")


def test_a_read_only_output_folder_is_refused_before_the_model_loads(qwen_prm_dir, tmp_path, no_model_load):
    src = _jsonl(tmp_path / "in.jsonl", [GOOD])
    folder = _read_only_folder(tmp_path)
    with pytest.raises(SystemExit, match=f"cannot write in the folder of output .*{folder}"):
        _score(qwen_prm_dir, src, folder / "out.jsonl")


@pytest.mark.parametrize("damage", ["misnamed", "truncated"])
def test_a_bad_parquet_file_is_one_message_before_the_model_loads(qwen_prm_dir, tmp_path, no_model_load,
                                                                        damage):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src = tmp_path / "in.parquet"
    if damage == "misnamed":
        _jsonl(src, [GOOD])
    else:
        pq.write_table(pa.Table.from_pylist([GOOD, {**GOOD, "id": "c"}]), src)
        src.write_bytes(src.read_bytes()[:-30])
    with pytest.raises(SystemExit, match=r"mmprm score: input .*in.parquet cannot be read as Parquet \("):
        _score(qwen_prm_dir, src, tmp_path / "out.jsonl")


# --------------------------------------------------------------------------
# 16. strict JSON reports: null where a metric is undefined, and why
# --------------------------------------------------------------------------


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_eval_report_writes_null_for_an_undefined_metric(qwen_prm_dir, tmp_path):
    rows = [{"id": f"x-{i}", "problem": f"What is {i} + 1?", "steps": [f"{i} + 1 = {i + 1}.", "Done."],
             "final_answer_correct": False, "label": 0} for i in range(3)]  # no case without an error
    data = _jsonl(tmp_path / "gsm8k.jsonl", rows)
    report = tmp_path / "pb.json"
    assert main(["eval", "processbench", "--prm", str(qwen_prm_dir), "--data", str(data), "--report", str(report),
                 "--quiet"]) == 0
    got = _strict(report.read_text())
    split = got["splits"]["gsm8k"]
    assert split["acc_correct"] is None and split["f1"] is None and got["average_f1"] is None
    assert {"splits.gsm8k.acc_correct", "average_f1"} <= set(got["undefined"]["fields"])
    assert "undefined" in got["undefined"]["why"]


def test_json_safe_names_what_it_replaced():
    data, replaced = files.json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}})
    assert data == {"a": None, "b": [1.0, None], "c": {"d": 2}} and replaced == ["a", "b[1]"]


# --------------------------------------------------------------------------
# 13. --ray ADDRESS where no cluster answers: a message, not a wait of minutes
# --------------------------------------------------------------------------


@pytest.mark.timeout(300)  # only turns the hang this fixes into a failure
def test_ray_address_where_nothing_listens_is_a_message(qwen_prm_dir, tmp_path, monkeypatch, capsys):
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh `mmprm` process
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    src = _jsonl(tmp_path / "in.jsonl", [GOOD])
    with pytest.raises(SystemExit, match=f"mmprm score: --ray 127.0.0.1:{port}: no Ray cluster answers at "
                                         f"127.0.0.1:{port} \\(.*\\); start one there"):
        _score(qwen_prm_dir, src, tmp_path / "out.jsonl", "--ray", f"127.0.0.1:{port}")
    assert not (tmp_path / "out.jsonl").exists()
    monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{port}")
    assert main(["annotate", "--num-problems", "1", "--k", "2", "--out-dir", str(tmp_path / "ann"), "--ray",
                 "--no-progress"]) == 1
    assert f"mmprm annotate: $RAY_ADDRESS ray://127.0.0.1:{port}: no Ray cluster answers" in capsys.readouterr().err
