"""Tree -> labelled samples (MM-PRM's traverse rules) and dataset import/export round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmprm_infer.train.datasets import (
    DatasetFormatError,
    StepSample,
    detect_layout,
    from_mmprm_record,
    load_samples,
    save_samples,
    to_mmprm_record,
    to_stepwise_record,
    to_visualprm_record,
)
from mmprm_infer.train.labels import (
    LabelConfig,
    is_negative,
    label_stats,
    tree_paths,
    tree_to_samples,
    trees_to_samples,
)


def node(steps, mc, *children):
    return {"partial_solution": list(steps), "mc_value": mc, "visit_count": 0, "correct_rollouts": [],
            "incorrect_rollouts": [], "children": list(children)}


def handmade_tree(root_mc=0.5):
    return {
        "id": "q1", "question": "What is it?", "answer": "4", "image_path": "img/q1.png", "mc_value": root_mc,
        "visit_count": 1, "correct_rollouts": [], "incorrect_rollouts": [],
        "children": [
            node(["s1"], 0.5,
                 node(["s2", "s3"], 0.0, node(["s4"], 1.0)),  # below a zero node: never reached
                 node(["s2"], 0.75,
                      node(["s3b", "s4b"], 1.0),
                      node(["s3"], 0.0))),
            node(["t1", "t2", "t3"], 1.0),
            node(["u1"], 0.0),
            node(["v1", "v2"], 0.25),
            node(["w1"], 1.0),
            node(["x1"], 0.5),
            node(["y1", "y2"], 0.0),
        ],
    }


NODE_NEGATIVES = [
    (["s1", "s2\n\ns3"], [0.5, 0.0]),
    (["s1", "s2", "s3"], [0.5, 0.75, 0.0]),
    (["u1"], [0.0]),
    (["y1\n\ny2"], [0.0]),
]
NODE_POSITIVES = [
    (["s1", "s2", "s3b\n\ns4b"], [0.5, 0.75, 1.0]),
    (["t1\n\nt2\n\nt3"], [1.0]),
    (["v1\n\nv2"], [0.25]),
    (["w1"], [1.0]),
    (["x1"], [0.5]),
]


def test_paths_follow_mmprm_traverse():
    neg, pos = tree_paths(handmade_tree())
    assert neg == NODE_NEGATIVES
    assert pos == NODE_POSITIVES


def test_negatives_kept_positives_downsampled_seeded():
    samples = tree_to_samples(handmade_tree())
    negs = [s for s in samples if is_negative(s)]
    poss = [s for s in samples if not is_negative(s)]
    assert [(s.steps, s.labels) for s in negs] == NODE_NEGATIVES
    assert len(poss) == len(negs) == 4
    assert all((s.steps, s.labels) in NODE_POSITIVES for s in poss)
    assert all(s.question == "What is it?" and s.image_paths == ["img/q1.png"] and s.answer == "4" and s.id == "q1"
               for s in samples)
    again = tree_to_samples(handmade_tree())
    assert [s.steps for s in again] == [s.steps for s in samples]
    picks = {tuple(tuple(s.steps) for s in tree_to_samples(handmade_tree(), LabelConfig(seed=k))) for k in range(8)}
    assert len(picks) > 1  # the seed chooses which positives
    unbalanced = tree_to_samples(handmade_tree(), LabelConfig(balance=False))
    assert len(unbalanced) == 9
    stats = label_stats(samples)
    assert stats["negatives"] == 4 and stats["fraction_negative"] == 0.5


def test_root_must_be_mixed():
    assert tree_to_samples(handmade_tree(root_mc=1.0)) == []
    assert tree_to_samples(handmade_tree(root_mc=0.0)) == []
    assert len(tree_to_samples(handmade_tree(root_mc=1.0), LabelConfig(require_mixed_root=False))) == 8
    assert len(trees_to_samples([handmade_tree(), handmade_tree(0.0), handmade_tree()])) == 16


def test_fewer_positives_than_negatives_keeps_all_and_no_negatives_keeps_none():
    t = handmade_tree()
    t["children"] = t["children"][:3]  # s1 subtree, t (positive), u (negative)
    samples = tree_to_samples(t)
    assert sum(is_negative(s) for s in samples) == 3 and sum(not is_negative(s) for s in samples) == 2
    t["children"] = [node(["a"], 1.0), node(["b"], 0.5)]
    assert tree_to_samples(t) == []  # MM-PRM: as many positives as negatives, i.e. none


def test_hard_labels_threshold_dedupe_and_min_words():
    hard = tree_to_samples(handmade_tree(), LabelConfig(hard_labels=True, balance=False))
    assert {tuple(s.labels) for s in hard} >= {(1.0, 0.0), (1.0, 1.0, 0.0), (0.0,), (1.0,), (1.0, 1.0, 1.0)}
    assert all(x in (0.0, 1.0) for s in hard for x in s.labels)
    # a higher threshold makes 0.25 and 0.5 nodes negatives (and stops paths there)
    strict = tree_to_samples(handmade_tree(), LabelConfig(threshold=0.5, balance=False))
    assert (["s1"], [0.5]) in [(s.steps, s.labels) for s in strict]
    assert (["v1\n\nv2"], [0.25]) in [(s.steps, s.labels) for s in strict]
    t = handmade_tree()
    t["children"].append(node(["u1"], 0.0))  # the same negative twice
    assert sum(s.steps == ["u1"] for s in tree_to_samples(t)) == 1
    assert sum(s.steps == ["u1"] for s in tree_to_samples(t, LabelConfig(dedupe=False))) == 2
    long_only = tree_to_samples(handmade_tree(), LabelConfig(min_words=1, balance=False))
    assert all(len(s.steps) > 1 or "\n\n" in s.steps[0] for s in long_only)


def test_step_granularity_labels_each_step():
    samples = tree_to_samples(handmade_tree(), LabelConfig(granularity="step", balance=False))
    got = [(s.steps, s.labels) for s in samples]
    assert got[:3] == [
        (["s1", "s2", "s3"], [0.5, 0.75, 0.0]),  # s2 inside the chunk: from the node with that prefix
        (["u1"], [0.0]),
        (["y1", "y2"], [0.5, 0.0]),  # unknown step before an error: the label before it
    ]
    assert got[3:] == [
        (["s1", "s2", "s3b", "s4b"], [0.5, 0.75, 1.0, 1.0]),  # inside a solvable chunk: its value
        (["t1", "t2", "t3"], [1.0, 1.0, 1.0]),
        (["v1", "v2"], [0.25, 0.25]),
        (["w1"], [1.0]),
        (["x1"], [0.5]),
    ]


def test_step_granularity_stops_at_a_known_zero_inside_a_chunk():
    t = handmade_tree()
    # a chunk whose middle prefix is known to be 0 from another node
    t["children"] = [node(["a", "b", "c"], 0.0), node(["a", "b"], 0.0), node(["a"], 1.0), node(["z"], 1.0)]
    got = [(s.steps, s.labels) for s in tree_to_samples(t, LabelConfig(granularity="step", balance=False))]
    assert got == [(["a", "b"], [1.0, 0.0]), (["a"], [1.0]), (["z"], [1.0])]


# --------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------

SAMPLES = [
    StepSample("Q one?", ["Row 1 is 1, 2, 3.", "1 + 2 + 3 = 6."], [0.5, 0.0], ["imgs/a.png"], "6", "a"),
    StepSample("Q two\nwith lines", ["x\n\ny", "The answer is \\boxed{4}."], [1.0, 0.875], [], "4", "b"),
    StepSample("Q three", ["only"], [0.25], ["p1.png", "p2.png"], None, "c"),
]


def test_mmprm_record_layout():
    rec = to_mmprm_record(SAMPLES[0], 0)
    assert rec == {
        "id": "a",
        "image": "imgs/a.png",
        "conversations": [
            {"from": "human", "value": "Question: Q one?\nProcess: Row 1 is 1, 2, 3.<prm>\n\n1 + 2 + 3 = 6.<prm>"},
            {"from": "gpt", "value": [0.5, 0.0]},
        ],
    }
    assert "image" not in to_mmprm_record(SAMPLES[1])
    assert to_mmprm_record(SAMPLES[2])["image"] == ["p1.png", "p2.png"]
    # MM-PRM's trainer adds "<image>\n"; a record carrying it reads the same
    rec["conversations"][0]["value"] = "<image>\n" + rec["conversations"][0]["value"]
    back = from_mmprm_record(rec)
    assert back.question == "Q one?" and back.steps == SAMPLES[0].steps and back.labels == [0.5, 0.0]


@pytest.mark.parametrize("fmt", ["mm-prm", "mm-prm-traverse", "visualprm", "stepwise"])
def test_round_trip(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    assert save_samples(SAMPLES, path, fmt) == 3
    back = load_samples(path)
    # stepwise writes TRL's bool labels (MC > 0) unless asked for the soft values
    want = [[float(x > 0) for x in s.labels] if fmt == "stepwise" else s.labels for s in SAMPLES]
    assert [(s.question, s.steps, s.labels, s.image_paths) for s in back] == \
        [(s.question, s.steps, w, s.image_paths) for s, w in zip(SAMPLES, want)]
    if fmt != "mm-prm":
        assert [s.answer for s in back] == [s.answer for s in SAMPLES]
    assert load_samples(path, fmt)[0].steps == SAMPLES[0].steps
    # the written file is what the format's users read
    first = path.read_text().lstrip()
    if fmt == "mm-prm-traverse":
        assert first.startswith("[") and json.loads(first)[0]["process"].endswith("<prm>")
    else:
        rec = json.loads(first.splitlines()[0])
        assert detect_layout(rec) == fmt


def test_visualprm_and_stepwise_layouts(tmp_path):
    v = to_visualprm_record(SAMPLES[0])
    assert v["image"] == ["imgs/a.png"] and v["response"] == "Row 1 is 1, 2, 3.\n\n1 + 2 + 3 = 6."
    assert v["steps_with_score"] == [{"step": "Row 1 is 1, 2, 3.", "score": 0.5},
                                     {"step": "1 + 2 + 3 = 6.", "score": 0.0}]
    s = to_stepwise_record(SAMPLES[0], hard_threshold=0.0)
    assert s["prompt"] == "Q one?" and s["completions"] == SAMPLES[0].steps and s["labels"] == [True, False]
    assert s["images"] == ["imgs/a.png"]
    save_samples(SAMPLES, tmp_path / "trl.jsonl", "stepwise", hard_threshold=0.0)
    back = load_samples(tmp_path / "trl.jsonl")
    assert [b.labels for b in back] == [[1.0, 0.0], [1.0, 1.0], [1.0]]
    # the default is TRL's layout (bools by MC > 0); soft values only when asked, under their own key
    save_samples(SAMPLES, tmp_path / "default.jsonl", "stepwise")
    first = json.loads((tmp_path / "default.jsonl").read_text().splitlines()[0])
    assert first["labels"] == [True, False] and "soft_labels" not in first
    save_samples(SAMPLES, tmp_path / "soft.jsonl", "stepwise", soft_labels=True)
    first = json.loads((tmp_path / "soft.jsonl").read_text().splitlines()[0])
    assert first["soft_labels"] == SAMPLES[0].labels and "labels" not in first
    assert [b.labels for b in load_samples(tmp_path / "soft.jsonl")] == [s.labels for s in SAMPLES]
    save_samples(SAMPLES, tmp_path / "hard.jsonl", "mm-prm", hard_threshold=0.5)
    assert [b.labels for b in load_samples(tmp_path / "hard.jsonl")] == [[0.0, 0.0], [1.0, 1.0], [0.0]]


def test_bad_inputs_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="2 steps but 1 labels"):
        StepSample("q", ["a", "b"], [1.0])
    with pytest.raises(DatasetFormatError, match="step tag"):
        to_mmprm_record(StepSample("q", ["a<prm>b"], [1.0]))
    bad = {"id": 0, "conversations": [{"from": "human", "value": "Question: q\nProcess: a<prm>\n\nb<prm>"},
                                      {"from": "gpt", "value": [1.0]}]}
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(DatasetFormatError, match="record 0: .*2 <prm> steps but 1 labels"):
        load_samples(tmp_path / "bad.jsonl")
    (tmp_path / "odd.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DatasetFormatError, match="unknown sample layout"):
        load_samples(tmp_path / "odd.jsonl")
    with pytest.raises(ValueError, match="unknown format"):
        save_samples(SAMPLES, tmp_path / "x", "parquet")


def test_annotation_to_training_file_end_to_end(tmp_path):
    from mmprm_infer.train.mcts import MCTSConfig, annotate, load_trees
    from mmprm_infer.train.synthetic.policy import SyntheticPolicy
    from mmprm_infer.train.synthetic.task import annotation_items, make_problems

    problems = make_problems(6, "train", 0)
    annotate(annotation_items(problems), SyntheticPolicy(problems, seed=0), tmp_path / "ann",
             MCTSConfig(num_rollouts=8, rollout_budget=64, max_search_count=6), progress=False)
    by_id = {p.id: p for p in problems}
    for granularity in ("node", "step"):
        samples = trees_to_samples(load_trees(tmp_path / "ann"), LabelConfig(granularity=granularity))
        assert samples and any(is_negative(s) for s in samples)
        for s in samples:
            assert Path(s.image_path).is_file() and Path(s.image_path).parent == tmp_path / "ann" / "images"
            if granularity == "step":  # every positive label sits on an error-free prefix
                p = by_id[s.id]
                for k, x in enumerate(s.labels):
                    if x > 0:
                        assert p.first_error(s.steps[:k + 1]) is None
        save_samples(samples, tmp_path / f"{granularity}.jsonl")
        assert len(load_samples(tmp_path / f"{granularity}.jsonl")) == len(samples)
