"""`mmprm train`: a PRM from a plain checkpoint and step-labelled files; resume after a kill."""

from __future__ import annotations

import json

import pytest

from mmprm_infer import PRM
from mmprm_infer.cli import main
from mmprm_infer.testing.tiny import build_tiny_causal_lm
from mmprm_infer.train.datasets import StepSample, save_samples

SAMPLES = [StepSample(f"What is {i} + {i}?", [f"{i} + {i} = {2 * i + k % 2}.", f"So the answer is {2 * i + k % 2}."],
                      [float(k % 2 == 0), 0.25 if k % 2 else 1.0], id=f"s{i}-{k}") for i in range(12) for k in range(2)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    # a plain causal LM whose tokenizer lacks the custom format's step tag
    return build_tiny_causal_lm(tmp_path_factory.mktemp("base"), arch="qwen2", seed=4)


def _data(tmp_path):
    save_samples(SAMPLES[:12], tmp_path / "part1.jsonl", "stepwise", soft_labels=True)
    save_samples(SAMPLES[12:], tmp_path / "part2.jsonl", "mm-prm-traverse")  # another layout, detected
    return f"{tmp_path / 'part1.jsonl'},{tmp_path / 'part2.jsonl'}"


def _train(base, tmp_path, out, *extra):
    return main(["train", "--base", str(base), "--data", _data(tmp_path), "--format", "custom", "--out", str(out),
                 "--max-steps", "10", "--batch-size", "2", "--lr", "1e-3", "--quiet", *extra])


def test_train_from_a_plain_lm_adds_the_tag_and_loads_alone(base, tmp_path, capsys):
    out = tmp_path / "prm"
    assert _train(base, tmp_path, out, "--eval-fraction", "0.25") == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["added_tokens"] == ["<step>"] and summary["train_samples"] == 18
    assert summary["eval_samples"] == 6 and summary["steps"] == 10 and "f1" in summary["eval"]
    assert _train(base, tmp_path, tmp_path / "by-tokens", "--batch-tokens", "64") == 0  # micro-batches by tokens
    log = [json.loads(line) for line in (tmp_path / "by-tokens" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 10 and all(r["tokens"] <= 64 for r in log) and len({r["samples"] for r in log}) >= 1
    prm = PRM.from_pretrained(out)  # nothing else: format and tag are recorded
    assert prm.format.name == "custom"
    rewards = prm.score("What is 2 + 2?", [["2 + 2 = 4.", "So the answer is 4."]])
    assert len(rewards[0]) == 2 and all(0.0 < r < 1.0 for r in rewards[0])
    with pytest.raises(SystemExit, match="is not empty; pass --resume"):
        _train(base, tmp_path, out)


def test_resume_after_a_kill_continues_exactly(base, tmp_path, monkeypatch):
    import mmprm_infer.train.trainer as trainer

    assert _train(base, tmp_path, tmp_path / "whole", "--save-steps", "4") == 0
    whole = [json.loads(line)["loss"] for line in (tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()]

    real, calls = trainer._accumulate, []

    def killed_at_step_7(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # after the resume point of step 4, before step 8's
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "_accumulate", killed_at_step_7)
    with pytest.raises(RuntimeError, match="killed"):
        _train(base, tmp_path, tmp_path / "cut", "--save-steps", "4")
    monkeypatch.setattr(trainer, "_accumulate", real)
    assert json.loads((tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()[-1])["step"] == 6
    assert _train(base, tmp_path, tmp_path / "cut", "--save-steps", "4", "--resume") == 0
    log = [json.loads(line) for line in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    # steps 5 and 6 ran twice (before the kill, and again from the step-4 resume point)
    resumed = {r["step"]: r["loss"] for r in log}
    assert [resumed[s] for s in range(1, 11)] == pytest.approx(whole, abs=1e-6)
    q = ["What is 3 + 3?", [["3 + 3 = 6.", "So the answer is 6."]]]
    assert PRM.from_pretrained(tmp_path / "cut").score(*q)[0] == pytest.approx(
        PRM.from_pretrained(tmp_path / "whole").score(*q)[0], abs=1e-6)
    assert json.loads((tmp_path / "cut" / "train_summary.json").read_text())["added_tokens"] == ["<step>"]


def test_bad_data_is_named(base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "completions": ["a"], "labels": [True]}) + "\n" +
                   json.dumps({"prompt": "q", "completions": ["a", "b"]}) + "\n")
    with pytest.raises(SystemExit, match="bad.jsonl line 2: missing field .labels."):
        main(["train", "--base", str(base), "--data", str(bad), "--format", "custom", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="holds no resume point"):
        main(["train", "--base", str(base), "--data", str(bad), "--format", "custom", "--out", str(tmp_path / "o"),
              "--resume"])


# --- annotate --method mc, --policy-hf --------------------------------------------------------------------
class _ScriptedPolicy:
    """Continuations that are right exactly when the prefix holds no wrong step (a step with '9')."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, n, **sampling):
        self.calls.append((len(prompts), n))
        out = []
        for p in prompts:
            if not p.partial_steps:  # whole solutions: two right, one with a wrong middle step
                out.append(["a = 2\n\nb = 3\n\n\\boxed{5}", "a = 9\n\nb = 3\n\n\\boxed{12}",
                            "a = 2\n\nb = 3\n\n\\boxed{5}"][:n])
            else:
                wrong = any("9" in s for s in p.partial_steps)
                out.append(["\\boxed{12}" if wrong or k % 4 == 0 else "\\boxed{5}" for k in range(n)])
        return out


def test_mc_estimation_by_hand(tmp_path):
    from mmprm_infer.train.labels import LabelConfig, trees_to_samples
    from mmprm_infer.train.mc_annotation import MCConfig
    from mmprm_infer.train.mcts import annotate, load_trees

    policy = _ScriptedPolicy()
    stats = annotate([{"id": "q1", "question": "2 + 3?", "correct_answer": "5"}], policy, tmp_path,
                     MCConfig(num_solutions=3, num_continuations=4), progress=False)
    assert stats.annotated == 1 and stats.rollouts == 3 + 6 * 4  # 3 solutions, 2 prefixes each, 4 completions
    (record,) = load_trees(tmp_path)
    assert record["method"] == "mc"
    # right prefixes: 3 of 4 completions reach 5 (every 4th does not); a wrong prefix: none; last step judged
    assert [s["mc"] for s in record["solutions"]] == [[0.75, 0.75, 1.0], [0.0, 0.0, 0.0], [0.75, 0.75, 1.0]]
    samples = trees_to_samples(load_trees(tmp_path), LabelConfig(hard_labels=True))
    assert [s.labels for s in samples] == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]  # the repeated solution dropped
    # resumable like OmegaPRM: a second run does nothing
    again = annotate([{"id": "q1", "question": "2 + 3?", "correct_answer": "5"}], policy, tmp_path,
                     MCConfig(num_solutions=3, num_continuations=4), progress=False)
    assert again.skipped == 1 and again.annotated == 0


def test_annotate_mc_with_a_local_transformers_policy(base, tmp_path):

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "a", "question": "What is 1 + 1?", "answer": "2"}) + "\n")
    out = tmp_path / "ann"
    assert main(["annotate", "--questions", str(questions), "--policy-hf", str(base), "--method", "mc",
                          "--num-solutions", "2", "--k", "2", "--max-new-tokens", "8", "--out-dir", str(out),
                          "--no-progress", "--export", str(out / "trl.jsonl"), "--export-format", "stepwise"]) in (0,)
    record = json.loads(next((out / "trees").glob("*.json")).read_text())
    assert record["method"] == "mc" and len(record["solutions"]) >= 1
    assert all(len(s["mc"]) == len(s["steps"]) and all(0.0 <= v <= 1.0 for v in s["mc"])
               for s in record["solutions"])
    rows = [json.loads(line) for line in (out / "trl.jsonl").read_text().splitlines()]
    assert rows and all(isinstance(v, bool) for r in rows for v in r["labels"])  # TRL's layout by default


# --- hardening: --out around the base, the resume state, its options, bad labels -----------------------------------
def test_out_equal_to_or_around_the_base_is_refused(base, tmp_path):
    import shutil

    models = tmp_path / "models"
    copy = models / "base"
    shutil.copytree(base, copy)
    weights = (copy / "model.safetensors").read_bytes()
    for out, how in ((copy, "is --base"), (models, "contains --base"), (copy / "prm", "lies inside --base")):
        with pytest.raises(SystemExit, match=f"--output-dir .* {how} .*would destroy the base"):
            main(["train", "--base", str(copy), "--data", _data(tmp_path), "--format", "custom", "--out", str(out),
                  "--max-steps", "2", "--overwrite", "--quiet"])
    assert (copy / "model.safetensors").read_bytes() == weights and not (copy / "prm").exists()


def test_resume_state_is_never_run(base, tmp_path):
    out = tmp_path / "run"
    assert _train(base, tmp_path, out, "--save-steps", "4") == 0
    state = out / "checkpoint-last" / "trainer_state.pt"
    assert state.is_file()
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    import torch

    torch.save({"step": Payload()}, state)
    with pytest.raises(SystemExit, match="cannot resume from .*trainer_state.pt: it is damaged or holds more than "
                                         "tensors and plain data"):
        _train(base, tmp_path, out, "--save-steps", "4", "--resume")
    assert not marker.exists()
    state.write_bytes(b"not a torch file")  # damaged: one line too
    with pytest.raises(SystemExit, match="cannot resume from .*: it is damaged"):
        _train(base, tmp_path, out, "--save-steps", "4", "--resume")


def test_resume_with_other_options_is_refused(base, tmp_path):
    out = tmp_path / "run"
    assert _train(base, tmp_path, out, "--save-steps", "4") == 0  # leaves the resume point of step 8
    for extra, named in ((["--lr", "2e-3"], r"--learning-rate 0.002 \(the saved run used 0.001\)"),
                         (["--seed", "1"], r"--seed 1 \(the saved run used 0\)"),
                         (["--warmup-ratio", "0.2"], r"--warmup-ratio 0.2 \(the saved run used 0.03\)")):
        with pytest.raises(SystemExit, match=f"cannot resume: {named}"):
            _train(base, tmp_path, out, "--save-steps", "4", "--resume", *extra)
    assert _train(base, tmp_path, out, "--save-steps", "4", "--resume") == 0  # its own options: resumes


@pytest.mark.parametrize("labels, prompt, needle", [
    ([float("nan"), 1.0], "q", r"labels must be Monte-Carlo scores in \[0, 1\], got \[nan\]"),
    ([2.0, 1.0], "q", r"labels must be Monte-Carlo scores in \[0, 1\], got \[2.0\]"),
    ([1.0, 1.0], 5, "question must be a string, got int"),
])
def test_bad_labels_are_one_line_and_leave_out_empty(base, tmp_path, labels, prompt, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": prompt, "completions": ["1 + 1 = 2.", "So 2."], "labels": labels}) + "\n")
    out = tmp_path / "prm"
    with pytest.raises(SystemExit, match=f"mmprm train: .*bad.jsonl: training sample 0: {needle}"):
        main(["train", "--base", str(base), "--data", str(bad), "--format", "custom", "--out", str(out), "--quiet"])
    assert not out.exists() or not any(out.iterdir())
    # the fixed data trains into the same --out, no --overwrite needed
    assert main(["train", "--base", str(base), "--data", _data(tmp_path), "--format", "custom", "--out", str(out),
                 "--max-steps", "1", "--quiet"]) == 0
