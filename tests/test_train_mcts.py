"""OmegaPRM MCTS annotation: tree invariants, binary search, selection, files, kill and resume."""

from __future__ import annotations

import json
import math
import signal
import subprocess
from pathlib import Path

import kill_gate
import pytest

from mmprm_infer.answers import AnswerVerifier
from mmprm_infer.train.mcts import (
    MCTSConfig,
    Node,
    OmegaPRMSearch,
    annotate,
    iter_nodes,
    load_tree,
    load_trees,
    tree_path,
)
from mmprm_infer.train.synthetic.policy import ErrorRates, SyntheticPolicy
from mmprm_infer.train.synthetic.task import annotation_items, make_problems, parse_step

SMALL = MCTSConfig(num_rollouts=8, rollout_budget=64, max_search_count=6)
NO_ERRORS = ErrorRates(misread=0, trap_range=(0, 0), wrong_line=0, slip=0, drop_term=0, dup_term=0, skip_op=0,
                       dup_op=0)


@pytest.fixture(scope="module")
def problems():
    return make_problems(8, "train", seed=0)


def check_tree_invariants(tree, problem=None, num_rollouts=None):
    """``num_rollouts``: the search's k (default: the tree's recorded config)."""
    k = num_rollouts or tree["config"]["num_rollouts"]
    nodes = list(iter_nodes(tree))
    assert sum(n["visit_count"] for n, _ in nodes) == tree["search_count"]
    for node, prefix in nodes:
        c, i = len(node["correct_rollouts"]), len(node["incorrect_rollouts"])
        # every rollout counts, repeats included: k of them per estimate, or the one direct check ([]) of a
        # complete solution; counting a repeated rollout once would leave c + i < k and a wrong mc_value
        if node["correct_rollouts"] + node["incorrect_rollouts"] != [[]]:
            assert c + i == k, (prefix, c, i)
        assert node["mc_value"] == pytest.approx(c / (c + i))
        for child in node["children"]:
            assert child["partial_solution"], "a child adds at least one step"
        if node is not tree:
            assert node["partial_solution"] == prefix[len(prefix) - len(node["partial_solution"]):]
        if problem is not None:
            for r in node["correct_rollouts"]:
                assert problem.is_correct_solution(prefix + r)
            for r in node["incorrect_rollouts"]:
                assert not problem.is_correct_solution(prefix + r)
            if node is not tree and node["mc_value"] > 0:
                assert problem.first_error(prefix) is None, prefix  # a solvable prefix has no error
            if node is not tree and prefix and parse_step(prefix[-1]).kind == "answer":
                assert node["mc_value"] == float(problem.is_correct_solution(prefix))
    # children extend their parent's prefix
    def walk(node, prefix):
        for child in node["children"]:
            full = prefix + child["partial_solution"]
            assert full[:len(prefix)] == prefix and len(full) > len(prefix)
            walk(child, full)
    walk(tree, [])


def test_search_on_a_few_problems_keeps_tree_invariants(problems):
    pol = SyntheticPolicy(problems, seed=0)
    mixed = 0
    for p in problems[:5]:
        search = OmegaPRMSearch(p.question, p.answer, pol, SMALL, images=[p.image])
        tree = search.run()
        check_tree_invariants(tree, p, SMALL.num_rollouts)
        assert tree["question"] == p.question and tree["answer"] == p.answer
        assert tree["total_rollouts"] <= SMALL.rollout_budget + 8 * 8  # one search may overrun
        assert tree["search_count"] <= SMALL.max_search_count
        mixed += 0 < tree["mc_value"] < 1
        json.dumps(tree)  # JSON-able
    assert mixed >= 2


def _gold_continuation_policy(problems):
    """Error-free continuation of the (re-derived) state: MC = 1 iff the prefix has no error."""
    return SyntheticPolicy(problems, rates=NO_ERRORS, seed=0)


@pytest.mark.parametrize("error_at", [0, 1, 2, 3, 4])
def test_binary_search_finds_the_first_error(problems, error_at):
    p = next(q for q in problems if q.template == "grid_sum_times_cell")
    gold = p.gold_steps
    # the constructed rollout: gold up to error_at, then an error that carries to the answer
    steps = list(gold[:error_at])
    if error_at in (0, 2):  # misread
        r = parse_step(gold[error_at])
        vals = list(r.values)
        vals[0] = vals[0] % 9 + 1
        steps.append(f"{r.target.describe()} is {', '.join(map(str, vals))}.")
    else:  # arithmetic slip (or a wrong final answer)
        steps.append(gold[error_at].replace("= ", "= 1", 1) if error_at < 4 else
                     f"The answer is \\boxed{{{p.answer_value + 1}}}.")
    policy = _gold_continuation_policy(problems)
    steps += [s for s in _continue(policy, p, steps)]
    assert p.first_error(steps) == error_at

    search = OmegaPRMSearch(p.question, p.answer, policy, MCTSConfig(num_rollouts=4), images=[p.image])
    search.root.mc_value = 1.0
    calls_before = search.total_rollouts
    search.binary_search(search.root, tuple(steps), 0, len(steps) - 1)
    tree = search.tree()
    by_prefix = {tuple(pre): n["mc_value"] for n, pre in iter_nodes(tree) if pre}
    # the step before the error is positive (or it is the question), the error step is zero
    if error_at > 0:
        assert by_prefix[tuple(steps[:error_at])] == 1.0
    assert by_prefix[tuple(steps[:error_at + 1])] == 0.0
    # log2 many estimates, not one per step
    estimates = (search.total_rollouts - calls_before) // 4
    assert estimates <= math.ceil(math.log2(len(steps))) + 1


def _continue(policy, p, steps):
    from mmprm_infer.policy import PolicyPrompt, split_steps

    return split_steps(policy.generate([PolicyPrompt(p.question, [p.image], steps)], n=1)[0][0])


def test_selection_score_and_verifier_are_pluggable(problems):
    p = problems[0]
    cfg = MCTSConfig(num_rollouts=4, c_puct=0.5, alpha=0.5, beta=0.9, length_scale=10)
    calls = []

    def judge(pred, ref):
        calls.append((pred, ref))
        return pred == ref

    search = OmegaPRMSearch(p.question, p.answer, SyntheticPolicy(problems, seed=0), cfg, images=[p.image],
                            verifier=AnswerVerifier(judge=judge))
    node = Node(["a"], mc_value=0.25, visit_count=3)
    rollout = ("one two three", "four five")
    assert search.q_value(node, rollout) == pytest.approx(0.5 ** 0.75 * 0.9 ** (5 / 10))
    assert search.u_value(node, total_visits=16) == pytest.approx(0.5 * 4 / 4)
    search.run()
    assert calls and all(ref == p.answer for _, ref in calls)

    # selection takes the largest Q + U
    s2 = OmegaPRMSearch(p.question, p.answer, SyntheticPolicy(problems, seed=0), cfg)
    a = s2.root.add_child(["x"])
    a.mc_value, a.pending = 0.9, [("short",)]
    b = s2.root.add_child(["y"])
    b.mc_value, b.pending = 0.2, [("short",)]
    s2.root.mc_value = 0.5
    for n, r in ((a, ("short",)), (b, ("short",))):
        s2._order[(id(n), r)] = len(s2._order)
    assert s2.select() == (a, ("short",))
    assert a.pending == []
    assert s2.select() == (b, ("short",))
    assert s2.select() is None


def test_annotate_writes_trees_images_and_skips_finished(tmp_path, problems):
    pol = SyntheticPolicy(problems, seed=0)
    stats = annotate(annotation_items(problems[:4]), pol, tmp_path, SMALL, progress=False)
    assert stats.annotated == 4 and stats.skipped == 0 and not stats.failed and stats.rollouts > 0
    trees = load_trees(tmp_path)
    assert len(trees) == 4
    for p in problems[:4]:
        tree = load_tree(tree_path(tmp_path, p.id))
        assert tree["id"] == p.id
        assert Path(tree["image_path"]).is_file()
        assert tree["config"]["num_rollouts"] == 8
        check_tree_invariants(tree, p)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "trees").iterdir()}
    again = annotate(annotation_items(problems[:4]), pol, tmp_path, SMALL, progress=False)
    assert again.skipped == 4 and again.annotated == 0 and again.rollouts == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "trees").iterdir()} == mtimes
    # a tree of another question under the same id is stale: redone
    stale = dict(load_tree(tree_path(tmp_path, problems[0].id)), question="something else")
    tree_path(tmp_path, problems[0].id).write_text(json.dumps(stale))
    redo = annotate(annotation_items(problems[:4]), SyntheticPolicy(problems, seed=0), tmp_path, SMALL, progress=False)
    assert redo.skipped == 3 and redo.annotated == 1
    assert load_tree(tree_path(tmp_path, problems[0].id))["question"] == problems[0].question
    # threads: the same trees (the policy's samples depend only on the question)
    annotate(annotation_items(problems[:4]), SyntheticPolicy(problems, seed=0), tmp_path / "threads", SMALL,
             progress=False, workers=3)
    for p in problems[:4]:
        a, b = load_tree(tree_path(tmp_path, p.id)), load_tree(tree_path(tmp_path / "threads", p.id))
        a.pop("image_path"), b.pop("image_path")
        assert a == b
    # text-only: no image, the picture's content in the question
    t = annotate(annotation_items(problems[4:6], text_only=True), SyntheticPolicy(problems, seed=0), tmp_path / "text",
                 SMALL, text_only=True, progress=False)
    assert t.annotated == 2
    for tree in load_trees(tmp_path / "text"):
        assert tree["image_path"] is None and tree["question"].startswith("The ")
    # MM-PRM input dicts work too
    d = annotate([{"id": "q/1", "question": problems[0].question, "correct_answer": problems[0].answer,
                   "image_path": tree_path(tmp_path, "x").parent.parent / "images" / f"{problems[0].id}.png"}],
                 pol, tmp_path / "dicts", SMALL, progress=False)
    assert d.annotated == 1 and len(load_trees(tmp_path / "dicts")) == 1


def test_a_failing_question_is_reported_and_the_rest_go_on(tmp_path, problems):
    class Flaky(SyntheticPolicy):
        def generate(self, prompts, n=1, **kw):
            if prompts[0].question == problems[1].question:
                raise RuntimeError("server down")
            return super().generate(prompts, n, **kw)

    stats = annotate(annotation_items(problems[:3]), Flaky(problems, seed=0), tmp_path, SMALL, progress=False)
    assert stats.failed == [problems[1].id] and stats.annotated == 2
    assert not tree_path(tmp_path, problems[1].id).exists()
    # the rerun redoes only the failed one
    stats = annotate(annotation_items(problems[:3]), SyntheticPolicy(problems, seed=0), tmp_path, SMALL, progress=False)
    assert stats.skipped == 2 and stats.annotated == 1


def test_kill_and_resume(tmp_path, capsys):
    from mmprm_infer.cli import main

    out = tmp_path / "run"
    n, done_first = 8, 3
    args = ["--num-problems", str(n), "--out-dir", str(out), "--k", "4", "--rollout-budget", "24",
            "--max-search-count", "4", "--no-progress"]
    # The first run stops right after writing its `done_first`-th tree (tests/kill_gate.py), so the
    # kill lands mid-run whatever the machine's speed.
    gate = tmp_path / "gate"
    gate.mkdir()
    proc = subprocess.Popen(kill_gate.command(gate, done_first, "annotate", *args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        kill_gate.wait_until_blocked(proc, gate)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kill_gate.release(gate)
    trees = out / "trees"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in trees.glob("*.json")}
    assert len(before) == done_first

    # the same command again (in this process: one interpreter start less)
    capsys.readouterr()
    assert main(["annotate", *args]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped"] == len(before) and summary["annotated"] == n - len(before)

    files = sorted(trees.glob("*.json"))
    assert len(files) == n
    assert not [p for p in trees.iterdir() if p.name.startswith(".")], "no temp files left"
    ids = [load_tree(p)["id"] for p in files]
    assert len(set(ids)) == n
    for name, (mtime, data) in before.items():
        p = trees / name
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data, f"{name} was redone"

    # nothing lost: the resumed trees equal an uninterrupted run's
    ref = tmp_path / "ref"
    problems = make_problems(n, "train", 0)
    annotate(annotation_items(problems), SyntheticPolicy(problems, seed=0), ref,
             MCTSConfig(num_rollouts=4, rollout_budget=24, max_search_count=4), progress=False)
    for p in files:
        a, b = load_tree(p), load_tree(ref / "trees" / p.name)
        a.pop("image_path"), b.pop("image_path")
        assert a == b
