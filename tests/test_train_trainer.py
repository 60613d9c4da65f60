"""The PRM trainer: marker-only loss, learning, save/reload, accumulation, metrics.

Tiny models from mmprm_infer.testing.tiny (session fixtures in conftest.py).  Torch
runs on one thread here: for these tiny matmuls thread hand-off costs more
than it saves, and on a shared 2-core machine two threads can stall for
100+ ms per step.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from mmprm_infer.evaluation.metrics import first_error_index, step_error_f1, step_macro_f1
from mmprm_infer.formats import FORMATS
from mmprm_infer.prm import PRM
from mmprm_infer.train.collate import as_example
from mmprm_infer.train.trainer import (
    LoraSettings,
    TrainConfig,
    _accumulate,
    _encode,
    default_learning_rate,
    evaluate_prm,
    marker_loss,
    position_balance_weights,
    predict_step_rewards,
    train_prm,
    train_prm_from_checkpoint,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


NOUNS = ["area", "sum", "angle", "radius", "product", "triangle", "circle"]


def make_samples(n: int, seed: int, soft_good=(1.0, 0.75)) -> list[dict]:
    """Steps containing "wrong" are bad (MC 0); others good (MC 1.0 or 0.75)."""
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        steps, labels = [], []
        for _ in range(rng.randint(2, 4)):
            a, b, noun = rng.randint(1, 9), rng.randint(1, 9), rng.choice(NOUNS)
            if rng.random() < 0.4:
                steps.append(f"The {noun} is {a} + {b}, which is wrong")
                labels.append(0.0)
            else:
                steps.append(f"The {noun} is {a} + {b} = {a + b}")
                labels.append(rng.choice(soft_good))
        samples.append({"question": f"What is the {rng.choice(NOUNS)}?", "steps": steps, "labels": labels})
    return samples


def split_rewards(samples, rewards):
    good = [r for s, rs in zip(samples, rewards) for r, y in zip(rs, s["labels"]) if y > 0]
    bad = [r for s, rs in zip(samples, rewards) for r, y in zip(rs, s["labels"]) if y == 0]
    return sum(good) / len(good), sum(bad) / len(bad)


@pytest.fixture(scope="module")
def prms(shepherd_dir, qwen_prm_dir, custom_dir):
    def load(which):
        return {
            "shepherd": lambda: PRM.from_pretrained(shepherd_dir, format="math-shepherd"),
            "qwen": lambda: PRM.from_pretrained(qwen_prm_dir),
            "custom": lambda: PRM.from_pretrained(custom_dir, format="custom"),
        }[which]()
    return load


def direct_loss(prm: PRM, samples, hard_threshold=None) -> torch.Tensor:
    """Soft cross-entropy from the model's own full logits, one sequence at a time."""
    losses = []
    for s in samples:
        enc = prm.encode(s["question"], [s["steps"]]).candidates[0]
        logits = prm.adapter.full_logits(torch.tensor(enc.input_ids))
        pair = logits[enc.reward_positions][:, [prm.columns.good, prm.columns.bad]].float()
        y = torch.tensor(s["labels"])
        if hard_threshold is not None:
            y = (y >= hard_threshold).float()
        losses.append(F.cross_entropy(pair, torch.stack([y, 1 - y], dim=1), reduction="none"))
    return torch.cat(losses).mean()


# --- (a) the marker-only loss is the full-logit loss -----------------------------
@pytest.mark.parametrize("which", ["shepherd", "qwen", "custom"])
def test_marker_loss_equals_full_logit_cross_entropy(prms, which):
    prm = prms(which)
    samples = make_samples(5, seed=7, soft_good=(1.0, 0.75, 0.25))  # different lengths: padding is exercised
    expected = direct_loss(prm, samples)
    padded = marker_loss(prm, samples)
    packed = marker_loss(prm, samples, packing=True)
    assert abs(padded.item() - expected.item()) < 1e-5
    assert abs(packed.item() - expected.item()) < 1e-5

    # same gradients as well, through the body and the head
    params = [p for p in prm.model.parameters() if p.requires_grad]
    g_direct = torch.autograd.grad(direct_loss(prm, samples), params, allow_unused=True)
    g_marker = torch.autograd.grad(marker_loss(prm, samples), params, allow_unused=True)
    for a, b in zip(g_direct, g_marker):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
        else:
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_hard_label_loss_thresholds_labels(prms):
    prm = prms("custom")
    samples = make_samples(4, seed=3, soft_good=(1.0, 0.75, 0.25))
    for threshold in (0.5, 0.8):
        expected = direct_loss(prm, samples, hard_threshold=threshold)
        got = marker_loss(prm, samples, label_mode="hard", hard_label_threshold=threshold)
        assert abs(got.item() - expected.item()) < 1e-5


# --- (b) it learns --------------------------------------------------------------
def test_training_separates_good_from_bad_steps(prms, tmp_path):
    prm = prms("shepherd")
    train, held_out = make_samples(64, seed=0), make_samples(32, seed=1)
    before = split_rewards(held_out, predict_step_rewards(prm, held_out))
    config = TrainConfig(output_dir=tmp_path / "out", max_steps=200, batch_size=4, eval_every=100, progress=False)
    result = train_prm(prm, train, config, held_out)

    assert result.learning_rate == default_learning_rate(sum(p.numel() for p in prm.model.parameters())) == 1e-3
    losses = result.losses
    assert len(losses) == result.steps == 200
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    # The floor is the entropy of the 0.75 labels (~0.56 nats on ~30 % of steps).
    assert last < 0.3 < first and last < 0.5 * first, (first, last)
    good, bad = split_rewards(held_out, predict_step_rewards(prm, held_out))
    assert good > 0.7 and bad < 0.3, (before, (good, bad))
    final = result.eval_history[-1]
    assert [e["step"] for e in result.eval_history] == [100, 200]
    assert final["f1"] >= 0.9 and final["macro_f1"] >= 0.9

    # the step log: one JSON line per optimizer step
    lines = (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == list(range(1, 201))
    assert {"loss", "lr", "grad_norm", "epoch", "markers"} <= set(records[0])
    assert (tmp_path / "out" / "eval_log.jsonl").read_text().count("\n") == 2

    # (c) for an LM-head format: the saved directory loads with no arguments and scores the same
    again = PRM.from_pretrained(tmp_path / "out")
    assert again.format.name == "math-shepherd"
    s = held_out[0]
    assert again.score(s["question"], [s["steps"]], engine="reference")[0] == pytest.approx(
        prm.score(s["question"], [s["steps"]], engine="reference")[0], abs=1e-6)


# --- (c) save -> from_pretrained(dir) -> same rewards ------------------------------
def test_save_and_reload_two_label_head(prms, tmp_path):
    prm = prms("qwen")
    train, held_out = make_samples(32, seed=4), make_samples(6, seed=5)
    untrained = predict_step_rewards(prm, held_out)
    result = train_prm(prm, train, TrainConfig(output_dir=tmp_path, max_steps=30, batch_size=4, progress=False))
    assert result.checkpoint_dir == tmp_path and not prm.model.training
    trained = predict_step_rewards(prm, held_out)
    assert max(abs(a - b) for u, t in zip(untrained, trained) for a, b in zip(u, t)) > 1e-3

    loaded = PRM.from_pretrained(tmp_path)  # no format, no options
    assert loaded.format.name == "qwen2.5-math-prm"
    for s, expected in zip(held_out, trained):
        for engine in ("reference", "fast"):
            got = loaded.score(s["question"], [s["steps"]], engine=engine)[0]
            assert got == pytest.approx(expected, abs=1e-5)
        assert prm.score(s["question"], [s["steps"]], engine="reference")[0] == pytest.approx(expected, abs=1e-5)


# --- (c2) per-position label balancing ------------------------------------------
def test_position_balance_weights_give_every_index_the_overall_mix():
    # 11 steps, 4 bad overall; index 0: 4 good / 1 bad; index 1: 2 / 2; index 2: 1 / 1
    labels = [[1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0], [0.0], [1.0, 1.0, 0.0]]
    w = position_balance_weights(labels)
    assert [len(x) for x in w] == [len(x) for x in labels]
    for k in range(3):
        at_k = [(wi[k], li[k]) for wi, li in zip(w, labels) if len(li) > k]
        bad = sum(x for x, y in at_k if y < 0.5)
        total = sum(x for x, _ in at_k)
        assert total == pytest.approx(len(at_k))  # the total weight of an index is unchanged
        assert bad / total == pytest.approx(4 / 11)  # ... and its bad share is the overall one
    # one class only at an index: weight 1 there
    assert position_balance_weights([[1.0, 1.0], [0.0]])[0][1] == 1.0
    # soft labels are classed by the threshold: 0.7 good, 0.2 bad, one of each at index 0
    assert position_balance_weights([[0.7], [0.2]], threshold=0.5) == [[1.0], [1.0]]


def test_balanced_loss_is_the_weighted_mean(prms):
    prm = prms("shepherd")
    samples = make_samples(4, seed=5)
    examples = [as_example(s, i) for i, s in enumerate(samples)]
    cache = {i: _encode(prm, ex, i)[0] for i, ex in enumerate(examples)}
    weights = position_balance_weights([ex.labels for ex in examples])
    prm.model.zero_grad(set_to_none=True)
    loss, tokens = _accumulate(prm, examples, cache, [[0, 1], [2, 3]], TrainConfig(), check=False, weights=weights)
    assert tokens == sum(len(cache[i].input_ids) for i in range(4))  # what the tokens/s in the bar counts
    prm.model.zero_grad(set_to_none=True)
    with torch.no_grad():
        rewards = predict_step_rewards(prm, samples)
    w = torch.tensor([x for ws in weights for x in ws])
    p = torch.tensor([x for r in rewards for x in r]).clamp(1e-7, 1 - 1e-7)
    y = torch.tensor([x for ex in examples for x in ex.labels])
    expected = (w * -(y * p.log() + (1 - y) * (1 - p).log())).sum() / w.sum()
    assert loss == pytest.approx(expected.item(), rel=1e-4)
    assert not all(x == 1.0 for ws in weights for x in ws)  # the check above would not see unit weights


# --- (d) gradient accumulation -------------------------------------------------
def test_gradient_accumulation_equals_larger_batch(prms):
    prm = prms("shepherd")
    samples = make_samples(4, seed=11)  # 2-4 steps each: unequal marker counts per micro-batch
    examples = [as_example(s, i) for i, s in enumerate(samples)]
    cache = {i: _encode(prm, ex, i)[0] for i, ex in enumerate(examples)}
    params = [p for p in prm.model.parameters()]

    def grads(micro_batches):
        prm.model.zero_grad(set_to_none=True)
        loss, _ = _accumulate(prm, examples, cache, micro_batches, TrainConfig(), check=True)
        return loss, [p.grad.clone() if p.grad is not None else None for p in params]

    loss_big, g_big = grads([[0, 1, 2, 3]])
    loss_acc, g_acc = grads([[0, 1], [2, 3]])
    loss_one, g_one = grads([[0], [1], [2], [3]])
    prm.model.zero_grad(set_to_none=True)
    assert loss_acc == pytest.approx(loss_big, abs=1e-6) and loss_one == pytest.approx(loss_big, abs=1e-6)
    for a, b, c in zip(g_big, g_acc, g_one):
        if a is not None:
            assert torch.allclose(a, b, atol=1e-7, rtol=1e-5) and torch.allclose(a, c, atol=1e-7, rtol=1e-5)

    # and through the whole loop: one optimizer step of 2 x 2 equals one step of 4.  adam_eps=1 makes
    # Adam's first step ~ lr * g (its default first step is lr * sign(g), blind to the gradient's size
    # and ill-conditioned where g ~ 0)
    start = {k: v.clone() for k, v in prm.model.state_dict().items()}
    after, logs = [], []
    for bs, accum in ((4, 1), (2, 2)):
        prm.model.load_state_dict(start)
        config = TrainConfig(max_steps=1, batch_size=bs, grad_accum_steps=accum, warmup_ratio=0.0,
                             learning_rate=1.0, adam_eps=1.0, progress=False)
        train_prm(prm, samples, config, callbacks=[logs.append])
        after.append({k: v.clone() for k, v in prm.model.state_dict().items()})
    assert logs[0]["loss"] == pytest.approx(logs[1]["loss"], abs=1e-6)
    assert logs[0]["grad_norm"] == pytest.approx(logs[1]["grad_norm"], rel=1e-5)
    for k in start:
        assert torch.allclose(after[0][k], after[1][k], atol=1e-6), k
    assert any(not torch.equal(start[k], after[0][k]) for k in start)


# --- (e) hard labels ------------------------------------------------------------
def test_hard_label_training(prms):
    prm = prms("custom")
    train, held_out = make_samples(48, seed=8), make_samples(16, seed=9)
    config = TrainConfig(max_steps=80, batch_size=4, label_mode="hard", hard_label_threshold=0.5, progress=False)
    result = train_prm(prm, train, config, held_out)
    good, bad = split_rewards(held_out, predict_step_rewards(prm, held_out))
    # hard targets push the 0.75-labelled steps to 1, not to 0.75
    assert good > 0.85 and bad < 0.15, (good, bad)
    assert sum(result.losses[-10:]) / 10 < 0.5 * sum(result.losses[:10]) / 10
    assert result.eval_history[-1]["f1"] >= 0.9


# --- options: checkpointing, bf16, callbacks, validation ------------------------------
def test_gradient_checkpointing_and_bf16(prms):
    prm = prms("custom")
    samples = make_samples(4, seed=12)
    examples = [as_example(s, i) for i, s in enumerate(samples)]
    params = [p for p in prm.model.parameters()]

    def grads(config):
        prm.model.train()
        prm.model.zero_grad(set_to_none=True)
        loss, _ = _accumulate(prm, examples, None, [[0, 1, 2, 3]], config, check=False)
        return loss, [p.grad.clone() for p in params if p.grad is not None]

    loss_plain, g_plain = grads(TrainConfig())
    prm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_ckpt, g_ckpt = grads(TrainConfig())
    prm.model.gradient_checkpointing_disable()
    assert loss_ckpt == pytest.approx(loss_plain, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_plain, g_ckpt))
    loss_bf16, _ = grads(TrainConfig(bf16=True))
    assert math.isfinite(loss_bf16) and abs(loss_bf16 - loss_plain) < 0.05
    prm.model.eval()

    # the loop runs with both switched on, and leaves the model as it found it
    result = train_prm(prm, samples, TrainConfig(max_steps=3, batch_size=2, gradient_checkpointing=True,
                                                 bf16=True, progress=False))
    assert result.steps == 3 and all(math.isfinite(x) for x in result.losses)
    assert not prm.model.is_gradient_checkpointing and not prm.model.training


def test_callback_stops_and_errors_name_the_sample(prms):
    prm = prms("custom")
    samples = make_samples(8, seed=13)
    seen = []
    result = train_prm(prm, samples, TrainConfig(max_steps=10, batch_size=2, progress=False),
                       callbacks=[lambda r: seen.append(r["step"]) or r["step"] == 3])
    assert result.steps == 3 and result.stopped_early and seen == [1, 2, 3]

    bad = [dict(samples[0]), dict(samples[1], labels=[1.0])]
    with pytest.raises(ValueError, match="training sample 1 has .* steps but 1 labels"):
        train_prm(prm, bad, TrainConfig(max_steps=1, progress=False))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        train_prm(prm, [dict(samples[0], labels=[-1.0] * len(samples[0]["steps"]))], TrainConfig(progress=False))
    with pytest.raises(ValueError, match="label_mode"):
        TrainConfig(label_mode="binary")


def test_train_from_checkpoint_path(custom_dir, tmp_path):
    samples = make_samples(6, seed=18)
    config = TrainConfig(output_dir=tmp_path, epochs=1, batch_size=2, progress=False)
    result = train_prm_from_checkpoint(custom_dir, samples, config, format="custom")
    assert result.steps == 3 and result.epochs == pytest.approx(1.0)
    assert PRM.from_pretrained(tmp_path).format.name == "custom"
    saved = json.loads((tmp_path / "train_config.json").read_text())
    assert saved["resolved_learning_rate"] == 1e-3 and saved["total_steps"] == 3


class _StepSample:  # the shape train/datasets.py's StepSample has
    def __init__(self, question, steps, labels, image_path=None):
        self.question, self.steps, self.labels, self.image_path = question, steps, labels, image_path


def test_accepts_step_sample_objects_and_evaluates(prms):
    prm = prms("shepherd")
    samples = [_StepSample(s["question"], s["steps"], s["labels"]) for s in make_samples(6, seed=14)]
    metrics = evaluate_prm(prm, samples, batch_size=4)
    assert {"loss", "f1", "acc_error", "acc_correct", "macro_f1"} <= set(metrics)
    rewards = predict_step_rewards(prm, samples)
    assert [len(r) for r in rewards] == [len(s.steps) for s in samples]
    # the trainer's readout is the scorer's
    for s, r in zip(samples, rewards):
        assert prm.score(s.question, [s.steps], engine="reference")[0] == pytest.approx(r, abs=1e-6)


def test_accepts_the_datasets_step_sample(prms):
    from mmprm_infer.train import datasets
    prm = prms("shepherd")
    samples = [datasets.StepSample(s["question"], s["steps"], s["labels"]) for s in make_samples(4, seed=19)]
    result = train_prm(prm, samples, TrainConfig(max_steps=2, batch_size=2, progress=False), samples)
    assert result.steps == 2 and result.eval_history[-1]["num_cases"] == 4


def test_default_learning_rate_by_size():
    assert default_learning_rate(8_000_000_000) == 2e-6
    assert default_learning_rate(500_000_000) == 1e-5
    assert default_learning_rate(50_000) == 1e-3
    assert default_learning_rate(8_000_000_000, lora=True) == 1e-4
    assert default_learning_rate(50_000, lora=True) == 3e-3


# --- (f) metrics ------------------------------------------------------------------
def test_step_error_f1_on_handmade_cases():
    predictions = [
        [0.9, 0.2, 0.1],  # first error predicted at 1
        [0.9, 0.8, 0.3],  # at 2
        [0.9, 0.9],       # none
        [0.4, 0.9],       # at 0
        [0.6, 0.7, 0.8],  # none
    ]
    labels = [
        [1.0, 0.0, 0.0],   # true first error 1 -> hit
        [1.0, 0.0, 0.0],   # true 1, predicted 2 -> miss
        [1.0, 0.75],       # all right, predicted none -> hit
        [1.0, 1.0],        # all right, predicted 0 -> miss
        2,                 # first-error index given directly; predicted none -> miss
    ]
    m = step_error_f1(predictions, labels)
    assert (m["num_error"], m["num_correct"], m["num_cases"]) == (3, 2, 5)
    assert m["acc_error"] == pytest.approx(1 / 3) and m["acc_correct"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))

    # soft labels: a step with MC 0.25 is wrong under the default 0.5 rule, right under "MC <= 0"
    soft_pred, soft_label = [[0.9, 0.3]], [[1.0, 0.25]]
    assert step_error_f1(soft_pred, soft_label)["acc_error"] == 1.0
    strict = step_error_f1(soft_pred, soft_label, label_threshold=1e-6)
    assert strict["num_correct"] == 1 and strict["acc_correct"] == 0.0
    # -1/+1 hard labels read as "label <= 0"
    assert step_error_f1([[0.8, 0.1]], [[1, -1]])["acc_error"] == 1.0
    # the reward threshold is configurable
    assert step_error_f1([[0.9, 0.6]], [[1.0, 0.0]], threshold=0.7)["acc_error"] == 1.0
    assert step_error_f1([[0.9, 0.6]], [[1.0, 0.0]])["acc_error"] == 0.0
    # no wrong cases: acc on them is undefined
    only_right = step_error_f1([[0.9]], [[1.0]])
    assert math.isnan(only_right["acc_error"]) and math.isnan(only_right["f1"])
    assert step_error_f1([[0.1], [0.9]], [[1.0], [0.0]])["f1"] == 0.0  # both accuracies 0
    assert first_error_index([0.7, 0.5, 0.2]) == 2 and first_error_index([0.9]) == -1
    with pytest.raises(ValueError, match="case 0: 2 step rewards but 1 step labels"):
        step_error_f1([[0.1, 0.2]], [[1.0]])
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        step_error_f1([[0.1], [0.2]], [[1.0]])


def test_step_macro_f1():
    m = step_macro_f1([[0.9, 0.2], [0.8, 0.7]], [[1.0, 0.0], [1.0, 0.0]])
    # correct class: tp=2, fp=1, fn=0 -> 0.8; incorrect: tp=1, fp=0, fn=1 -> 2/3
    assert m["f1_correct"] == pytest.approx(0.8) and m["f1_incorrect"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2) and m["step_accuracy"] == 0.75


# --- multimodal: mm-prm on a tiny InternVL ----------------------------------------
@pytest.mark.skipif("mm-prm" not in FORMATS, reason="the mm-prm format is not in this build")
@pytest.mark.filterwarnings("ignore:InternVLAdapter.image_features returned inference-mode")
def test_mm_prm_training_freezes_vision_tower(tmp_path):
    from PIL import Image

    from mmprm_infer.testing.tiny_internvl import build_tiny_internvl

    path = build_tiny_internvl(tmp_path / "ckpt", extra_special_tokens=("<prm>",))
    prm = PRM.from_pretrained(path)
    assert prm.format.name == "mm-prm"
    images = []
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        images.append(tmp_path / f"img{i}.png")
        Image.new("RGB", (56, 56), color).save(images[-1])
    rng = random.Random(0)
    samples = []
    for i, s in enumerate(make_samples(12, seed=15)):
        if i % 4 == 3:  # a text-only sample now and then: mixed batches
            samples.append(s)
        else:
            samples.append(_StepSample(s["question"], s["steps"], s["labels"], image_path=str(images[i % 3])))
    rng.shuffle(samples)

    # packed and padded batches of image + text samples give the same loss
    assert marker_loss(prm, samples[:4], packing=True).item() == pytest.approx(marker_loss(prm, samples[:4]).item(),
                                                                               abs=1e-5)
    start = {k: v.clone() for k, v in prm.model.state_dict().items()}
    result = train_prm(prm, samples, TrainConfig(output_dir=tmp_path / "out", max_steps=40, batch_size=3,
                                                 learning_rate=3e-3, progress=False))
    state = prm.model.state_dict()
    vision = [k for k in state if ".vision_tower." in k or k.startswith("vision_tower.")]
    assert vision and all(torch.equal(start[k], state[k]) for k in vision)
    assert result.frozen_params == sum(start[k].numel() for k in vision)
    assert not torch.equal(start["lm_head.weight"], state["lm_head.weight"])
    assert all(p.requires_grad for p in prm.model.parameters())  # flags restored after training
    assert sum(result.losses[-8:]) / 8 < 0.75 * sum(result.losses[:5]) / 5, result.losses

    loaded = PRM.from_pretrained(tmp_path / "out")
    s = next(x for x in samples if not isinstance(x, dict))
    expected = predict_step_rewards(prm, [s])[0]
    assert loaded.score(s.question, [s.steps], image=s.image_path, engine="reference")[0] == pytest.approx(
        expected, abs=1e-5)


# --- LoRA (peft comes with the dev extra, so these always run in the suite) --------
@pytest.mark.parametrize("which", ["custom", "qwen"])
def test_lora_trains_and_saves_merged(prms, tmp_path, which):
    prm = prms(which)
    train, held_out = make_samples(32, seed=16), make_samples(8, seed=17)
    config = TrainConfig(output_dir=tmp_path, max_steps=60, batch_size=4, lora=LoraSettings(r=8, alpha=16, dropout=0.0),
                         progress=False)
    result = train_prm(prm, train, config)
    assert result.trainable_params < sum(p.numel() for p in prm.model.parameters())
    assert sum(result.losses[-10:]) / 10 < 0.7 * sum(result.losses[:5]) / 5, result.losses
    assert not any("lora" in k for k in prm.model.state_dict())
    rewards = predict_step_rewards(prm, held_out)
    loaded = PRM.from_pretrained(tmp_path)
    for s, r in zip(held_out, rewards):
        assert loaded.score(s["question"], [s["steps"]], engine="reference")[0] == pytest.approx(r, abs=1e-5)


def test_micro_batches_by_token_budget():
    from mmprm_infer.train.trainer import _micro_batches, _optimizer_batches, _steps_per_epoch

    lengths = [10, 30, 20, 50, 5, 5]
    # padded: a micro-batch costs rows x its longest sample
    padded = TrainConfig(batch_tokens=60, shuffle=False, grad_accum_steps=2)
    assert _micro_batches(list(range(6)), padded, lengths) == [[0, 1], [2], [3], [4, 5]]
    # packed: the sum
    packed = TrainConfig(batch_tokens=60, shuffle=False, packing=True)
    assert _micro_batches(list(range(6)), packed, lengths) == [[0, 1, 2], [3, 4, 5]]
    # a sample over the budget goes alone
    assert _micro_batches([0, 1], TrainConfig(batch_tokens=8), [100, 3]) == [[0], [1]]
    steps = _optimizer_batches(6, padded, lengths)
    assert [next(steps) for _ in range(2)] == [(0.5, [[0, 1], [2]]), (1.0, [[3], [4, 5]])]
    assert _steps_per_epoch(6, padded, lengths) == 2
    # without a budget: batch_size samples per micro-batch, as before
    plain = TrainConfig(batch_size=4, grad_accum_steps=1, shuffle=False)
    assert next(_optimizer_batches(6, plain)) == (4 / 6, [[0, 1, 2, 3]])
