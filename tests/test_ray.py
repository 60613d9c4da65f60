"""Ray scale-out on a local 2-CPU Ray cluster: same outputs as one machine, killed actors, killed drivers."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import kill_gate
import pytest
import ray  # in the dev extra: a missing Ray fails here rather than skipping
import torch

from mmprm_infer.cli import main
from mmprm_infer.integrations.ray_scoring import PRMSpec, score_file, score_items
from mmprm_infer.io.records import EXIT_RECORDS_FAILED
from mmprm_infer.prm import PRM, ScoringItem

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    # the kill tests' PRM wrapper and gate are defined here and in tests/kill_gate.py, so workers get them by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(kill_gate)
    yield ray
    ray.shutdown()


def _records(n_questions: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n_questions):
        cands = []
        for _ in range(rng.randint(1, 9)):
            steps = [f"{i}+{k}={i + k}" for k in range(rng.randint(1, 4))] + [f"\\boxed{{{i + rng.randint(0, 3)}}}"]
            cands.append("\n\n".join(steps))
        out.append({"id": f"q{i}", "question": f"What is {i}+{i % 7}?", "candidates": cands})
    return out


def _write_jsonl(path: Path, records: list[dict], extra_lines: dict[int, str | bytes] = ()) -> Path:
    lines = [json.dumps(r).encode() for r in records]
    for at, raw in sorted(dict(extra_lines).items(), reverse=True):
        lines.insert(at, raw if isinstance(raw, bytes) else raw.encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _single_machine(command: str, prm_dir, src: Path, dst: Path, *extra: str, status: int = 0) -> str:
    try:
        assert main([command, "--prm", str(prm_dir), "-i", str(src), "-o", str(dst), "--quiet", "--threads", "1",
                     *extra]) == status
    finally:
        torch.set_num_threads(2)  # conftest's setting for the other tests
    return dst.read_text()


def test_score_and_rerank_match_single_machine(cluster, qwen_prm_dir, tmp_path):
    records = _records(70)
    assert sum(len(r["candidates"]) for r in records) >= 300
    not_utf8 = b'{"question": "caf\xe9", "candidates": ["x"]}'  # Latin-1: must fail its own line only
    src = _write_jsonl(tmp_path / "in.jsonl", records,
                       {10: "", 33: "{not json", 50: json.dumps({"question": "x"}), 60: not_utf8})
    for command, extra in (("score", ["--aggregate", "mean"]), ("rerank", ["--strategy", "weighted_vote"])):
        want = _single_machine(command, qwen_prm_dir, src, tmp_path / f"{command}-one.jsonl", "--on-error", "skip",
                               *extra, status=EXIT_RECORDS_FAILED)
        assert main([command, "--prm", str(qwen_prm_dir), "-i", str(src), "-o", str(tmp_path / f"{command}-ray.jsonl"),
                     "--quiet", "--on-error", "skip", "--ray", "--ray-actors", "2", *extra]) == EXIT_RECORDS_FAILED
        got = (tmp_path / f"{command}-ray.jsonl").read_text()
        assert got == want
        out = [json.loads(line) for line in got.splitlines()]
        assert len(out) == len(records) + 4  # one record per line: the blank one and the three bad ones too
        assert [o.get("id") for o in out if "error" not in o and "skipped" not in o] == [r["id"] for r in records]
        assert [o["line"] for o in out if "skipped" in o] == [11]
        assert [o["line"] for o in out if "error" in o] == [35, 53, 64]  # lines after the inserted ones
        assert "not valid UTF-8" in out[63]["error"]


def test_bad_record_fails_the_ray_run_naming_its_line(cluster, qwen_prm_dir, tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", _records(12), {5: "[1, 2]"})
    with pytest.raises(SystemExit, match="line 6"):
        score_file(src, tmp_path / "out.jsonl", str(qwen_prm_dir), actors=1, progress=False)


def test_parquet_input_matches_single_machine(cluster, qwen_prm_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = _records(30, seed=1)
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(records), src, row_group_size=7)
    want = _single_machine("score", qwen_prm_dir, src, tmp_path / "one.jsonl")
    score_file(src, tmp_path / "ray.jsonl", str(qwen_prm_dir), actors=2, progress=False)
    assert (tmp_path / "ray.jsonl").read_text() == want
    assert [json.loads(line)["id"] for line in want.splitlines()] == [r["id"] for r in records]


def test_images_through_ray(cluster, image_sensitive_mm_prm, tmp_path):
    from PIL import Image

    prm_dir = tmp_path / "mm-prm"
    image_sensitive_mm_prm.save_pretrained(prm_dir)
    for i, color in enumerate(["red", "navy", "yellow"]):
        Image.new("RGB", (40 + 10 * i, 30), color).save(tmp_path / f"img{i}.png")
    records = [{"id": f"m{i}", "question": "What is shown?", "image": f"img{i % 3}.png",
                "candidates": ["It is a square.\n\n\\boxed{1}", "Two shapes.\n\n\\boxed{2}"]} for i in range(6)]
    src = _write_jsonl(tmp_path / "in.jsonl", records)
    want = _single_machine("rerank", prm_dir, src, tmp_path / "one.jsonl", "--batch-questions", "4", "--max-tiles", "1")
    score_file(src, tmp_path / "ray.jsonl", PRMSpec(str(prm_dir), max_tiles=1), command="rerank", batch_questions=4,
               actors=2, progress=False)
    got = (tmp_path / "ray.jsonl").read_text()
    assert got == want
    scores = [json.loads(line)["scores"] for line in got.splitlines()]
    assert scores[0] != scores[1]  # the images reached the model


class _BlockingPRM:
    """The real PRM; the first batch any actor scores blocks inside score_batch (a file named after the
    actor's pid says so) until that actor is killed, so the kill provably lands mid-batch."""

    def __init__(self, prm, gate_dir: str):
        self.prm, self.gate = prm, Path(gate_dir)

    def score_batch(self, items, engine=None):
        if kill_gate.claim(self.gate) == 0:
            kill_gate.block(self.gate, f"busy-{os.getpid()}")  # until this actor is killed
        return self.prm.score_batch(items, engine=engine)


@dataclass
class _BlockingSpec(PRMSpec):
    gate_dir: str = ""

    def load(self, device, threads):
        return _BlockingPRM(super().load(device, threads), self.gate_dir)


def test_killed_actor_is_restarted_and_every_record_written_once(cluster, qwen_prm_dir, tmp_path):
    records = _records(48, seed=2)
    src = _write_jsonl(tmp_path / "in.jsonl", records)
    want = _single_machine("score", qwen_prm_dir, src, tmp_path / "one.jsonl", "--batch-questions", "2")
    gate = tmp_path / "gate"
    gate.mkdir()
    killed: list[int] = []

    def kill_the_blocked_actor():
        deadline = time.monotonic() + 300  # a hang guard only
        while time.monotonic() < deadline:
            for marker in gate.glob("busy-*"):
                pid = int(marker.name.split("-")[1])
                os.kill(pid, signal.SIGKILL)  # it is blocked inside score_batch
                killed.append(pid)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_blocked_actor, daemon=True)
    killer.start()
    try:
        score_file(src, tmp_path / "ray.jsonl", _BlockingSpec(str(qwen_prm_dir), gate_dir=str(gate)),
                   batch_questions=2, actors=2, progress=False)
    finally:
        kill_gate.release(gate)
    killer.join()
    assert len(killed) == 1
    got = (tmp_path / "ray.jsonl").read_text()
    assert got == want  # nothing lost, nothing twice, same order and scores
    assert [json.loads(line)["id"] for line in got.splitlines()] == [r["id"] for r in records]


def test_score_items_matches_score_batch(cluster, qwen_prm_dir):
    records = _records(20, seed=3)
    items = [ScoringItem(r["question"], r["candidates"]) for r in records]
    prm = PRM.from_pretrained(qwen_prm_dir)
    want = [r for s in range(0, len(items), 3) for r in prm.score_batch(items[s:s + 3])]
    got = score_items(items, str(qwen_prm_dir), batch_questions=3, actors=2, progress=False)
    assert len(got) == len(items)
    for g, w in zip(got, want):
        assert [len(x) for x in g] == [len(x) for x in w]
        for gx, wx in zip(g, w):
            assert gx == pytest.approx(wx, abs=1e-6)


# --------------------------------------------------------------------------
# annotation
# --------------------------------------------------------------------------
ANNOTATE = ["--num-problems", "8", "--k", "8", "--rollout-budget", "40", "--no-progress"]


def _annotate_cmd(out_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mmprm_infer.cli", "annotate", *ANNOTATE, "--out-dir", str(out_dir), *extra]


def _trees(out_dir: Path) -> dict[str, dict]:
    trees = {}
    for p in sorted((out_dir / "trees").glob("*.json")):
        tree = json.loads(p.read_text())
        tree.pop("image_path")  # the folder differs between the two runs
        trees[p.name] = tree
    return trees


def test_ray_annotation_matches_single_machine_and_resumes_after_a_killed_driver(cluster, tmp_path):
    one = tmp_path / "one"
    subprocess.run(_annotate_cmd(one), check=True, capture_output=True, timeout=300)
    want = _trees(one)
    assert len(want) == 8

    out = tmp_path / "ray"
    # The first driver stops right after writing its 3rd tree (tests/kill_gate.py), so it is killed
    # with exactly 3 questions done, however fast the machine is.
    gate = tmp_path / "gate"
    gate.mkdir()
    first = subprocess.Popen(kill_gate.command(gate, 3, "annotate", *ANNOTATE, "--out-dir", str(out), "--ray",
                                               "--workers", "2"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        kill_gate.wait_until_blocked(first, gate)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        kill_gate.release(gate)
    done_before = {p.name: p.stat().st_mtime_ns for p in (out / "trees").glob("*.json")}
    assert len(done_before) == 3

    second = subprocess.run(_annotate_cmd(out, "--ray", "--workers", "2"), check=True, capture_output=True,
                            text=True, timeout=300)
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == len(done_before) and summary["annotated"] == 8 - len(done_before)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "trees").glob("*.json")
            if p.name in done_before} == done_before  # finished questions were not redone
    assert _trees(out) == want
    assert not list((out / "trees").glob(".*tmp*"))


@pytest.fixture()
def synthetic_endpoint():
    """The synthetic policy behind a stdlib chat-completions endpoint: (base url, problems, request log)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mmprm_infer.policy import PolicyPrompt, split_steps
    from mmprm_infer.train.synthetic.policy import SyntheticPolicy
    from mmprm_infer.train.synthetic.task import make_problems

    problems = make_problems(4, "train", 7)
    policy = SyntheticPolicy(problems)
    requests: list[int] = []

    class ChatCompletions(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            by_role = {m["role"]: m["content"] for m in body["messages"]}
            partial = split_steps(by_role["assistant"]) if "assistant" in by_role else []
            texts = policy.generate([PolicyPrompt(by_role["user"], [], partial)], n=body.get("n", 1))[0]
            requests.append(1)
            data = json.dumps({"choices": [{"index": i, "message": {"role": "assistant", "content": t}}
                                           for i, t in enumerate(texts)]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), ChatCompletions)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1", problems, requests
    server.shutdown()


def _check_trees(out_dir: Path, n: int) -> None:
    trees = [json.loads(p.read_text()) for p in sorted((out_dir / "trees").glob("*.json"))]
    assert len(trees) == n
    assert all(0.0 <= t["mc_value"] <= 1.0 and t["answer"] and "children" in t for t in trees)


def test_ray_annotation_with_rollouts_from_an_openai_endpoint(cluster, synthetic_endpoint, tmp_path):
    from mmprm_infer.integrations.ray_annotate import openai_policy_factory, ray_annotate
    from mmprm_infer.train.mcts import MCTSConfig
    from mmprm_infer.train.synthetic.task import annotation_items

    url, problems, requests = synthetic_endpoint
    factory = openai_policy_factory(url, "synthetic", max_new_tokens=256)
    stats = ray_annotate(annotation_items(problems, text_only=True), factory, tmp_path / "ann",
                         MCTSConfig(num_rollouts=4, rollout_budget=16), text_only=True, progress=False, workers=2)
    assert stats.annotated == 4 and not stats.failed and stats.rollouts > 0
    assert len(requests) > 0
    _check_trees(tmp_path / "ann", 4)


def test_annotate_cli_on_your_own_questions_through_an_endpoint(cluster, synthetic_endpoint, tmp_path):
    url, problems, requests = synthetic_endpoint
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"id": p.id, "question": p.prompt_question(True),
                                             "correct_answer": str(p.answer)}) + "\n" for p in problems))
    out = subprocess.run([sys.executable, "-m", "mmprm_infer.cli", "annotate", "--questions", str(questions),
                          "--out-dir", str(tmp_path / "ann"), "--policy-url", url, "--policy-model", "synthetic",
                          "--k", "4", "--rollout-budget", "16", "--no-progress", "--ray", "--workers", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["annotated"] == 4
    _check_trees(tmp_path / "ann", 4)
    bad = subprocess.run([sys.executable, "-m", "mmprm_infer.cli", "annotate", "--questions", str(questions),
                          "--out-dir", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--data needs a policy" in bad.stderr  # --questions: the old spelling of --data


def test_annotate_cli_builds_the_policy_it_is_asked_for():
    from mmprm_infer.cli import build_parser
    from mmprm_infer.cli.annotate import policy_factory
    from mmprm_infer.train.synthetic.policy import ErrorRates

    def factory(*argv):
        return policy_factory(build_parser().parse_args(["annotate", "--out-dir", "x", *argv]), ErrorRates())

    vllm = factory("--ray", "--policy-vllm", "--policy-model", "M", "--tensor-parallel-size", "2")
    assert vllm.args == ("M", 2, {"distributed_executor_backend": "ray"}, {"max_new_tokens": 1024})
    http = factory("--policy-url", "http://h:8000/v1", "--policy-model", "M", "--max-new-tokens", "64")
    assert http().url == "http://h:8000/v1/chat/completions" and http().sampling["max_new_tokens"] == 64
    assert factory("--num-problems", "3")().resolve  # the synthetic policy by default
    with pytest.raises(SystemExit, match="--policy-vllm needs --ray"):
        factory("--policy-vllm", "--policy-model", "M")
    with pytest.raises(SystemExit, match="--policy-url needs --policy-model"):
        factory("--policy-url", "http://h:8000/v1")


def test_pipeline_evaluation_on_ray_matches_one_machine(cluster, tmp_path):
    from mmprm_infer.train.synthetic.pipeline import preset_config, run_pipeline

    try:
        here = run_pipeline(preset_config("tiny", run_dir=str(tmp_path / "one")))
        there = run_pipeline(preset_config("tiny", run_dir=str(tmp_path / "ray"), ray="auto"))
    finally:
        torch.set_num_threads(2)
    assert there["summary"] == here["summary"]
    assert (tmp_path / "ray" / "test_cases.jsonl").read_text() == (tmp_path / "one" / "test_cases.jsonl").read_text()


def test_empty_input_gives_an_empty_output_without_a_cluster(tmp_path):
    (tmp_path / "in.jsonl").write_text("")
    stats = score_file(tmp_path / "in.jsonl", tmp_path / "out.jsonl", "no-checkpoint-needed", progress=False)
    assert (tmp_path / "out.jsonl").read_text() == "" and stats.questions == 0


@dataclass
class _DyingSpec(PRMSpec):
    """A PRM whose load kills its process, as an out-of-memory kill would."""

    def load(self, device, threads):
        os._exit(1)


def test_actors_that_keep_dying_stop_the_job_with_its_cause(cluster, qwen_prm_dir, tmp_path):
    from mmprm_infer.integrations.ray_scoring import RayJobError

    src = _write_jsonl(tmp_path / "in.jsonl", _records(3))
    (tmp_path / "out.jsonl").write_text("previous\n")
    # Ray Data's default restarts a dead actor forever: this job used to hang
    with pytest.raises(RayJobError, match="the Ray job failed after 0 of 1 windows: ActorDiedError"):
        score_file(src, tmp_path / "out.jsonl", _DyingSpec(str(qwen_prm_dir)), actors=1, progress=False,
                   actor_max_restarts=0)
    assert (tmp_path / "out.jsonl").read_text() == "previous\n"


def test_a_folder_that_is_no_checkpoint_is_refused_before_the_actors_start(tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", _records(2))
    with pytest.raises(ValueError, match="is not a checkpoint folder"):
        score_file(src, tmp_path / "out.jsonl", str(tmp_path), address=None, progress=False)


class _FakeRay:
    def __init__(self, resources):
        self.resources = resources

    def cluster_resources(self):
        return self.resources


@pytest.mark.parametrize("resources, kwargs, want", [
    ({"CPU": 16.0, "GPU": 4.0}, {}, (4, 1, 1.0, "cuda")),  # one actor per GPU
    ({"CPU": 16.0, "GPU": 4.0}, {"actor_gpus": 2.0}, (2, 1, 2.0, "cuda")),
    ({"CPU": 16.0, "GPU": 4.0}, {"actor_gpus": 0.0}, (16, 1, 0, "cpu")),  # GPUs declined: CPU actors
    ({"CPU": 16.0, "GPU": 4.0}, {"device": "cuda:1"}, (4, 1, 1.0, "cuda:1")),
    ({"CPU": 8.0}, {"actor_cpus": 3}, (2, 3, 0, "cpu")),
    ({"CPU": 2.0}, {"actor_cpus": 4}, (1, 4, 0, "cpu")),  # at least one actor
    ({"CPU": 8.0}, {"actors": 3}, (3, 1, 0, "cpu")),
])
def test_actor_plan(monkeypatch, resources, kwargs, want):
    from mmprm_infer.integrations import ray_cluster

    monkeypatch.setattr(ray_cluster, "require_ray", lambda: _FakeRay(resources))
    plan = ray_cluster.plan_actors(**kwargs)
    assert (plan.actors, plan.num_cpus, plan.num_gpus, plan.device) == want
    assert plan.remote_args()["max_restarts"] == ray_cluster.ACTOR_MAX_RESTARTS


class _RowsInOrder:
    def __init__(self, windows):
        self.windows = windows

    def iter_rows(self):
        return iter({"window": k} for k in self.windows)


@pytest.mark.parametrize("windows, message", [([0, 2, 1], "window 2 where window 1 was due"),
                                              ([0, 0, 1], "window 0 where window 1 was due"),
                                              ([0, 1], "returned 2 of 3 windows")])
def test_a_lost_or_repeated_window_is_an_error_not_a_wrong_file(windows, message):
    from mmprm_infer.integrations.ray_scoring import _ordered_stream

    with pytest.raises(RuntimeError, match=message):
        list(_ordered_stream(_RowsInOrder(windows), 3, False, "test"))
