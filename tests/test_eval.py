"""`mmprm eval`: benchmark layouts read as shipped, metrics worked out by hand, the reward cache."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mmprm_infer import PRM
from mmprm_infer.cli import main
from mmprm_infer.evaluation.best_of_n import BonQuestion, accuracy_curves, default_ns, matches_gold, question_accuracy
from mmprm_infer.evaluation.metrics import step_error_f1
from mmprm_infer.evaluation.processbench import ProcessBenchCase, split_metrics
from mmprm_infer.io.records import PRMSpec


# --- ProcessBench --------------------------------------------------------------------------------------
def test_processbench_metric_by_hand():
    cases = [ProcessBenchCase(None, label, None, "") for label in (1, 0, 2, -1, -1, -1)]
    rewards = [[0.9, 0.2, 0.1],   # first below 0.5 at 1 = label 1: hit
               [0.6, 0.1],        # predicted 1, label 0: miss
               [0.9, 0.8, 0.4],   # predicted 2 = label 2: hit
               [0.7, 0.5],        # 0.5 is not below 0.5: predicted -1, hit
               [0.2, 0.9],        # predicted 0: miss
               [0.99]]            # hit
    m = split_metrics(cases, rewards, threshold=0.5)
    assert (m["n"], m["num_error"], m["num_correct"]) == (6, 3, 3)
    assert m["acc_error"] == pytest.approx(2 / 3) and m["acc_correct"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    # at 0.65, case 1 becomes a hit (0.6 < 0.65 at step 0 = label 0) and case 3 a miss (0.5 at step 1)
    m = split_metrics(cases, rewards, threshold=0.65)
    assert m["acc_error"] == pytest.approx(1.0) and m["acc_correct"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(2 * 1.0 * (1 / 3) / (1.0 + 1 / 3))


def test_labels_may_be_numpy_integers():
    rewards = [[0.9, 0.1], [0.9, 0.9]]
    want = step_error_f1(rewards, [1, -1])
    assert step_error_f1(rewards, [np.int64(1), np.int64(-1)]) == want
    with pytest.raises(TypeError, match="label is a bool"):
        step_error_f1([[0.9]], [np.bool_(True)])


def _processbench_rows(n, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        steps = [f"Step {k}: {i} + {k} = {i + k}" for k in range(int(rng.integers(1, 4)))]
        rows.append({"id": f"x-{i}", "generator": "tiny", "problem": f"What is {i} plus a few?", "steps": steps,
                     "final_answer_correct": bool(i % 2), "label": int(rng.integers(-1, len(steps)))})
    return rows


def _by_hand_processbench(rewards, labels, threshold):
    pred = [next((k for k, r in enumerate(rs) if r < threshold), -1) for rs in rewards]
    err = [p == y for p, y in zip(pred, labels) if y != -1]
    cor = [p == -1 for p, y in zip(pred, labels) if y == -1]
    a1, a2 = sum(err) / len(err), sum(cor) / len(cor)
    return a1, a2, (2 * a1 * a2 / (a1 + a2) if a1 + a2 else 0.0)


def test_processbench_command_on_split_files(qwen_prm_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "ProcessBench"
    data.mkdir()
    splits = {"gsm8k": _processbench_rows(9, 0), "math": _processbench_rows(7, 1)}
    (data / "gsm8k.jsonl").write_text("\n".join(json.dumps(r) for r in splits["gsm8k"]) + "\n")
    (data / "math.json").write_text(json.dumps(splits["math"]))  # the JSON layout, too
    report = tmp_path / "pb.json"
    # a threshold inside the tiny PRM's reward range, so predictions are neither all -1 nor all 0
    prm = PRM.from_pretrained(qwen_prm_dir)
    rewards = {k: [prm.score(r["problem"], [r["steps"]])[0] for r in rows] for k, rows in splits.items()}
    threshold = float(np.median([x for rs in rewards.values() for r in rs for x in r]))
    args = ["eval", "processbench", "--prm", str(qwen_prm_dir), "--data", str(data), "--report", str(report),
            "--quiet"]
    assert main([*args, "--threshold", str(threshold)]) == 0
    got = json.loads(report.read_text())
    f1s = []
    for name, rows in splits.items():
        a1, a2, f1 = _by_hand_processbench(rewards[name], [r["label"] for r in rows], threshold)
        s = got["splits"][name]
        assert (s["acc_error"], s["acc_correct"], s["f1"], s["n"]) == pytest.approx((a1, a2, f1, len(rows)))
        f1s.append(f1)
    assert got["average_f1"] == pytest.approx(sum(f1s) / 2)
    assert "average F1" in capsys.readouterr().out

    # another threshold: the cached rewards are used, the model is not loaded
    monkeypatch.setattr(PRMSpec, "load", lambda *a, **k: pytest.fail("rescored instead of using the cache"))
    assert main([*args, "--threshold", "0.3"]) == 0
    a1, a2, f1 = _by_hand_processbench(rewards["gsm8k"], [r["label"] for r in splits["gsm8k"]], 0.3)
    assert json.loads(report.read_text())["splits"]["gsm8k"]["f1"] == pytest.approx(f1)


def test_processbench_bad_record_named_by_file_line_and_field(qwen_prm_dir, tmp_path):
    rows = _processbench_rows(3, 0)
    rows[1]["label"] = 7
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = ["eval", "processbench", "--prm", str(qwen_prm_dir), "--data", str(data), "--report",
            str(tmp_path / "r.json"), "--quiet"]
    with pytest.raises(SystemExit, match=r"gsm8k.jsonl line 2: field 'label' is 7"):
        main(args)
    assert main([*args, "--on-error", "skip"]) == 3
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["splits"]["gsm8k"]["n"] == 2 and "line 2" in report["errors"][0]


# --- Best-of-N -----------------------------------------------------------------------------------------
def test_multiple_choice_letters_and_math_answers():
    assert matches_gold("(B)", "B") and matches_gold("B. 12 cm", "B") and matches_gold("b", "(B)")
    assert not matches_gold("C", "B") and not matches_gold("12", "B")
    assert matches_gold("\\frac{1}{2}", "0.5") and not matches_gold("0.4", "0.5")


def test_default_ns():
    assert default_ns(16) == [1, 2, 4, 8, 16] and default_ns(6) == [1, 2, 4, 6] and default_ns(1) == [1]


def test_best_of_n_by_hand_on_every_subset():
    # 3 candidates: answers 5 (right, score .9), 7 (wrong, .8), 7 (wrong, .3); gold 5
    q = BonQuestion.from_candidates(["\\boxed{5}", "\\boxed{7}", "\\boxed{7}"], "5",
                                    [[0.9], [0.8], [0.3]])
    acc = question_accuracy(q, [1, 2, 3], ["min"], subsets=100)  # 3 subsets at most: exact
    assert acc["random"] == pytest.approx({1: 1 / 3, 2: 1 / 3, 3: 1 / 3})
    assert acc["pass"] == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})
    # pairs {0,1},{0,2}: 5 has the top score; {1,2}: wrong either way
    assert acc["best_of_n/min"] == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})
    # majority over pairs: a 1-1 tie goes to the group seen first (candidate 0) -> right in {0,1},{0,2};
    # over all 3: 7 wins 2-1
    assert acc["majority"] == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 0.0})
    # weighted: all 3 -> 5: .9 against 7: 1.1, wrong
    assert acc["weighted_vote/min"] == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 0.0})


def test_disjoint_groups_and_tie_split_votes_by_hand():
    # 4 candidates: 1 (right, .9), 2 (wrong, .2), 1 (right, .4), 3 (wrong, .8), none without an answer
    q = BonQuestion.from_candidates(["\\boxed{1}", "\\boxed{2}", "\\boxed{1}", "\\boxed{3}"], "1",
                                    [[0.9], [0.2], [0.4], [0.8]])
    acc = question_accuracy(q, [1, 2, 4], ["min"], groups="disjoint", tie_split=True)
    # n = 2: groups {0,1} and {2,3}; each a 1-1 tie of answers, split: 1/2 each
    assert acc["majority_tie_split"] == pytest.approx({1: 0.5, 2: 0.5, 4: 1.0})
    # the selection breaks the tie toward the first group seen: right in both pairs
    assert acc["majority"] == pytest.approx({1: 0.5, 2: 1.0, 4: 1.0})
    # weighted: {0,1} -> 1 (.9 > .2, right); {2,3} -> 3 (.8 > .4, wrong); all four -> 1 (1.3)
    assert acc["weighted_vote_tie_split/min"] == pytest.approx({1: 0.5, 2: 0.5, 4: 1.0})
    assert acc["best_of_n/min"] == pytest.approx({1: 0.5, 2: 0.5, 4: 1.0})
    assert acc["random"] == pytest.approx({1: 0.5, 2: 0.5, 4: 0.5})
    # a weighted tie is split too: equal scores on two answers give 1/2, not the first
    tied = BonQuestion.from_candidates(["\\boxed{2}", "\\boxed{1}"], "1", [[0.5], [0.5]])
    assert question_accuracy(tied, [2], ["min"], groups="disjoint", tie_split=True)[
        "weighted_vote_tie_split/min"] == {2: 0.5}
    # no tie_split: no such methods; disjoint groups need every n to divide the candidates
    assert "majority_tie_split" not in question_accuracy(q, [2], ["min"], groups="disjoint")
    with pytest.raises(ValueError, match="divide"):
        question_accuracy(q, [3], ["min"], groups="disjoint")
    with pytest.raises(ValueError, match="groups"):
        question_accuracy(q, [2], ["min"], groups="pairs")


def test_weighted_vote_counts_a_question_with_a_zero_reward():
    """A reward of exactly 0.0 is a probability like any other; only a negative score (a
    log-probability aggregation) keeps a question out of the weighted vote."""
    zero = BonQuestion.from_candidates(["\\boxed{1}", "\\boxed{2}", "\\boxed{2}"], "1", [[0.6], [0.0], [0.5]])
    acc = question_accuracy(zero, [1, 3], ["min"], subsets=100)
    # all three: 1 holds 0.6, 2 holds 0.0 + 0.5: the right answer wins
    assert acc["weighted_vote/min"] == pytest.approx({1: 1 / 3, 3: 1.0})
    wrong = BonQuestion.from_candidates(["\\boxed{2}"] * 3, "1", [[0.7]] * 3)
    curves = accuracy_curves([zero, wrong], ["min"])
    assert curves["accuracy"]["weighted_vote/min"]["3"] == pytest.approx(0.5)  # both questions counted
    logprob = question_accuracy(zero, [3], ["sum_logprob"], subsets=100)
    assert "weighted_vote/sum_logprob" not in logprob and "best_of_n/sum_logprob" in logprob


def test_step_macro_f1_a_reward_or_label_at_the_threshold_is_right():
    """"right" is reward >= threshold (and label >= label_threshold), the threshold included."""
    from mmprm_infer.evaluation.metrics import step_macro_f1

    m = step_macro_f1([[0.5, 0.2, 0.9]], [[1.0, 0.0, 0.5]])
    # steps: reward 0.5 at the threshold, right (label 1); 0.2 wrong (label 0); 0.9 right with a label of 0.5
    assert (m["f1_correct"], m["f1_incorrect"], m["macro_f1"], m["step_accuracy"]) == (1.0, 1.0, 1.0, 1.0)
    m = step_macro_f1([[0.5, 0.2]], [[1.0, 0.0]], threshold=0.50001)  # just above it: 0.5 becomes wrong
    assert m["f1_correct"] == 0.0 and m["f1_incorrect"] == pytest.approx(2 / 3)


def test_curves_average_questions_with_a_band_and_categories():
    right = BonQuestion.from_candidates(["\\boxed{1}", "\\boxed{1}"], "1", [[0.9], [0.8]], "easy")
    wrong = BonQuestion.from_candidates(["\\boxed{2}", "\\boxed{3}"], "1", [[0.9], [0.8]], "hard")
    c = accuracy_curves([right, wrong], ["min"])
    assert c["ns"] == [1, 2] and c["accuracy"]["pass"]["2"] == pytest.approx(0.5)
    # per-question values 1 and 0: standard error 0.5, band 1.96 * 0.5
    assert c["band"]["pass"]["2"] == pytest.approx(1.96 * 0.5)
    assert c["by_category"]["easy"]["accuracy"]["best_of_n/min"]["1"] == 1.0
    assert c["by_category"]["hard"]["accuracy"]["random"]["2"] == 0.0


def test_random_subsets_are_seeded():
    q = BonQuestion.from_candidates([f"\\boxed{{{i % 3}}}" for i in range(12)], "0",
                                    [[((i * 7) % 10) / 10] for i in range(12)])
    a = question_accuracy(q, [4], ["min"], subsets=50, seed=3)
    assert a == question_accuracy(q, [4], ["min"], subsets=50, seed=3)
    assert a["random"][4] == pytest.approx(4 / 12, abs=0.08)  # sampled, near the exact mean


def test_bon_command(qwen_prm_dir, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "pic.png")
    rows = []
    for i in range(6):
        cands = [f"{i} + {i} = {2 * i + k}.\n\nThe answer is \\boxed{{{2 * i + k}}}." for k in (0, 1, 0, 2)]
        rows.append({"question": f"What is {i} + {i}?", "answer": str(2 * i), "candidates": cands,
                     "category": "even" if i % 2 == 0 else "odd"})
    src = tmp_path / "cands.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = tmp_path / "bon.json"
    assert main(["eval", "bon", "--prm", str(qwen_prm_dir), "-i", str(src), "--report", str(report), "--quiet",
                 "--aggregations", "min,last"]) == 0
    got = json.loads(report.read_text())
    assert got["ns"] == [1, 2, 4]
    acc = got["accuracy"]
    # every question has 2 right of 4: random 0.5 at every N, pass@4 = 1, pass@2 = 1 - 1/6 (exact over 6 pairs)
    assert [acc["random"][n] for n in ("1", "2", "4")] == pytest.approx([0.5, 0.5, 0.5])
    assert acc["pass"]["2"] == pytest.approx(5 / 6) and acc["pass"]["4"] == 1.0
    assert acc["majority"]["4"] == 1.0  # the right answer holds 2 of 4, the others 1 each
    # best-of-4 by hand from the model's own rewards
    prm = PRM.from_pretrained(qwen_prm_dir)
    hits = []
    for r in rows:
        scores = [min(s) for s in prm.score(r["question"], r["candidates"])]
        hits.append(int(r["candidates"][scores.index(max(scores))].endswith(f"{{{r['answer']}}}.")))
    assert acc["best_of_n/min"]["4"] == pytest.approx(sum(hits) / len(hits))
    assert set(got["by_category"]) == {"even", "odd"}
    assert (tmp_path / "accuracy_vs_n.png").stat().st_size > 1000
    assert "best_of_n/min" in capsys.readouterr().out


def test_bon_missing_image_is_named(qwen_prm_dir, tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"question": "q", "answer": "1", "candidates": ["\\boxed{1}"], "image": "no.png"}) + "\n")
    with pytest.raises(SystemExit, match="c.jsonl line 1: image no.png of field 'image' not found"):
        main(["eval", "bon", "--prm", str(qwen_prm_dir), "-i", str(src), "--report", str(tmp_path / "r.json")])


# --- VisualProcessBench --------------------------------------------------------------------------------
def _vpb_case(labels, source):
    from mmprm_infer.evaluation.visualprocessbench import VisualProcessBenchCase

    return VisualProcessBenchCase(None, labels, source, "")


def test_visualprocessbench_metric_by_hand():
    from mmprm_infer.evaluation.visualprocessbench import metrics

    cases = [_vpb_case([1, -1, 0], "A"), _vpb_case([1, 1], "A"), _vpb_case([-1, -1], "B")]
    rewards = [[0.7, 0.4, 0.1], [0.5, 0.3], [0.9, 0.2]]
    m = metrics(cases, rewards)
    # A: TP 2 (0.7, 0.5 counts as right), FN 1, TN 1 -- the neutral step is left out
    a = m["by_source"]["A"]
    assert (a["tp"], a["fn"], a["tn"], a["fp"], a["steps"]) == (2, 1, 1, 0, 4)
    assert a["f1_correct"] == pytest.approx(0.8) and a["f1_incorrect"] == pytest.approx(2 / 3)
    assert a["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["by_source"]["B"]["macro_f1"] == pytest.approx((0 + 2 / 3) / 2)
    # overall pools the steps (2/3), it is not the mean of the sources (0.533)
    assert m["overall"]["macro_f1"] == pytest.approx(2 / 3) and m["neutral_steps"] == 1


def test_visualprocessbench_command_with_images(image_sensitive_mm_prm, tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for name, colour in (("red.png", (255, 0, 0)), ("blue.png", (0, 0, 255))):
        Image.new("RGB", (32, 32), colour).save(images / name)
    rows = [{"image": ["red.png"], "question": "How many bars?", "answer": "3", "data_source": "chart",
             "response": {"steps": ["There are 3 bars.", "So the answer is 3."], "process_correctness": [1, 1]}},
            {"image": ["blue.png"], "question": "How many bars?", "answer": "3", "data_source": "chart",
             "response": json.dumps({"steps": ["There are 4 bars.", "So 4."], "process_correctness": [-1, 0]})},
            {"image": ["blue.png"], "question": "What colour?", "answer": "blue", "data_source": "colour",
             "response": {"steps": ["It is red.", "So red."], "process_correctness": [-1, -1]}}]
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    prm_dir = tmp_path / "mm-prm"
    image_sensitive_mm_prm.save_pretrained(prm_dir)
    report = tmp_path / "vpb.json"
    assert main(["eval", "visualprocessbench", "--prm", str(prm_dir), "--data", str(data),
                 "--image-root", str(images), "--report", str(report), "--quiet", "--max-tiles", "1"]) == 0
    got = json.loads(report.read_text())
    prm = PRM.from_pretrained(prm_dir, max_tiles=1)
    rewards = [prm.score(r["question"], [json.loads(r["response"])["steps"] if isinstance(r["response"], str)
                                         else r["response"]["steps"]], image=str(images / r["image"][0]))[0]
               for r in rows]
    pairs = [(x, 1) for x in rewards[0]] + [(rewards[1][0], -1)] + [(x, -1) for x in rewards[2]]
    tp = sum(x >= 0.5 and y == 1 for x, y in pairs)
    tn = sum(x < 0.5 and y == -1 for x, y in pairs)
    assert (got["overall"]["tp"], got["overall"]["tn"], got["overall"]["steps"]) == (tp, tn, 5)
    assert set(got["by_source"]) == {"chart", "colour"} and got["neutral_steps"] == 1


# --- PRMBench ------------------------------------------------------------------------------------------
def test_prmbench_metric_by_hand():
    from mmprm_infer.evaluation.data import Record
    from mmprm_infer.evaluation.prmbench import metrics, read_case

    def case(classification, idx, n_steps, errors):
        return read_case(Record({"modified_question": "q", "modified_process": [f"s{k}" for k in range(n_steps)],
                                 "error_steps": errors, "classification": classification, "idx": idx}, "x"))

    cases = [case("circular", "1", 3, [2]), case("circular", "1", 2, []),  # a repeated idx: dropped
             case("redundency", "2", 2, [1, 5]),  # step 5 does not exist: ignored
             case("multi_solutions", "3", 2, [])]
    rewards = [[0.8, 0.5, 0.6], [0.1, 0.1], [0.9, 0.4], [0.7, 0.2]]
    m = metrics(cases, rewards)
    by = m["by_classification"]
    assert by["circular"]["prmscore"] == pytest.approx(1.0)  # 0.5 is not above 0.5: the error step is caught
    assert by["redundency"]["prmscore"] == pytest.approx(0.0)
    assert by["multi_solutions"]["prmscore"] == pytest.approx(2 / 3)  # F1 of right steps only
    # overall: TP 3, TN 1, FP 1, FN 2
    assert m["prmscore"] == pytest.approx((6 / 9 + 2 / 5) / 2)
    assert m["categories"] == pytest.approx({"simplicity": 0.5, "sensitivity": 2 / 3})
    assert (m["samples"], m["duplicates_dropped"], m["error_steps_out_of_range"]) == (3, 1, 1)


def test_prmbench_command(qwen_prm_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"original_question": "q", "modified_question": f"What is {i} + 1?", "original_process": ["a"],
             "modified_process": [f"{i} + 1 = {i + 1 + (i % 2)}", f"So {i + 1 + (i % 2)}."],
             "error_steps": [1, 2] if i % 2 else [], "classification": "counterfactual" if i % 2 else "multi_solutions",
             "idx": str(i), "reason": "", "modified_steps": [1]} for i in range(6)]
    (data / "counterfactual.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = tmp_path / "prmbench.json"
    assert main(["eval", "prmbench", "--prm", str(qwen_prm_dir), "--data", str(data), "--report", str(report),
                 "--quiet"]) == 0
    got = json.loads(report.read_text())
    prm = PRM.from_pretrained(qwen_prm_dir)
    tp = fn = fp = tn = 0
    for r in rows:
        for k, x in enumerate(prm.score(r["modified_question"], [r["modified_process"]])[0]):
            right = (k + 1) not in r["error_steps"]
            tp, fn, fp, tn = tp + (x > 0.5 and right), fn + (x <= 0.5 and right), fp + (x > 0.5 and not right), \
                tn + (x <= 0.5 and not right)
    f1 = lambda a, b, c: 2 * a / (2 * a + b + c) if a + b + c else math.nan  # noqa: E731
    assert got["prmscore"] == pytest.approx((f1(tp, fp, fn) + f1(tn, fn, fp)) / 2, nan_ok=True)
    assert set(got["by_classification"]) == {"counterfactual", "multi_solutions"}
