"""Soft-label PRM training: the loss lives only at step markers.

Every sample is encoded by the PRM's own format (``PRM.encode``, the code path
scoring takes, images included), so training and scoring see identical
inputs.  The text decoder runs on the padded (or packed) micro-batch; only
the final-normed hidden rows at the reward markers are gathered and turned
into ``d = logit_good - logit_bad`` by the PRM's reward head
(``PRM.reward_head.logit_diff``: two LM-head rows for math-shepherd /
custom / mm-prm / visualprm, the 2-label MLP for qwen2.5-math-prm), the
logit whose sigmoid the engines score with (``reward_head.rewards``).  The
full vocabulary logits are never formed.

Loss per step with Monte-Carlo label ``mc``: cross-entropy over the two
logits (good, bad) with soft target ``[mc, 1 - mc]``, which equals
``BCEWithLogits(d, mc)``; ``label_mode="hard"`` uses ``mc >= threshold``
instead.  The loss of an optimizer step is the mean over all its labelled
steps (micro-batch losses are summed and divided by the step count of the
whole accumulated batch, so accumulation is exact).

MM-PRM's recipe is the default: AdamW (weight decay 0.05, none on norms and
biases), cosine schedule with 3 % warmup, gradient clipping 1.0, 3 epochs,
vision tower frozen, bf16 autocast where asked.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmprm_infer.evaluation.metrics import step_error_f1, step_macro_f1
from mmprm_infer.formats import MODEL_QWEN2_PRM, EncodedCandidate
from mmprm_infer.io.progress import progress_bar
from mmprm_infer.models import adapter_for
from mmprm_infer.prm import PRM
from mmprm_infer.train.collate import TrainExample, as_example, make_layout, place_embeds, place_tokens
from mmprm_infer.train.distributed import Distributed
from mmprm_infer.train.reporting import Reporters
from mmprm_infer.train.resume import ResumeState, save_resume_point

__all__ = [
    "LoraSettings", "TrainConfig", "TrainResult", "train_prm", "train_prm_from_checkpoint",
    "marker_loss", "predict_step_rewards", "evaluate_prm", "default_learning_rate", "freeze_vision_tower",
    "position_balance_weights",
]

TRAIN_LOG = "train_log.jsonl"
EVAL_LOG = "eval_log.jsonl"
VISION_PREFIXES = ("vision_tower", "vision_model")  # transformers-native / InternVL chat-model layouts
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    """LoRA on the text decoder's linear layers (needs ``peft``; merged into the weights before saving).

    For qwen2.5-math-prm the 2-label ``score`` head is trained in full beside
    the adapters (``train_head``); LM-head formats keep the LM head frozen.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LORA_TARGETS
    train_head: bool = True


@dataclass
class TrainConfig:
    """Hyperparameters of ``train_prm``; defaults follow MM-PRM's training run."""

    output_dir: str | os.PathLike | None = None  # checkpoint + train_log.jsonl / eval_log.jsonl; None: keep in memory
    epochs: float = 3.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 4  # samples per micro-batch
    batch_tokens: int | None = None  # micro-batches by token budget instead: as many samples as fit in this many
    # tokens (padding counted unless packing; a longer sample goes alone); grad_accum_steps of them per step
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float | None = None  # None: default_learning_rate(model size)
    weight_decay: float = 0.05  # not applied to norms and biases (parameters with < 2 dims)
    warmup_ratio: float = 0.03
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # None: no clipping
    label_mode: str = "soft"  # "soft": target [mc, 1 - mc]; "hard": target 1 if mc >= hard_label_threshold else 0
    hard_label_threshold: float = 0.5
    balance_positions: bool = False  # weight steps so every step index has the overall good/bad mix
    # (position_balance_weights): MCTS paths end at their first error, so the step index alone predicts the
    # label well and a small PRM learns that prior instead of reading the step
    packing: bool = False  # False: right-padded rows + attention mask; True: one packed row, no padding
    gradient_checkpointing: bool = False
    bf16: bool = False  # bf16 autocast for the decoder forward (the reward readout and loss stay fp32)
    freeze_vision: bool = True  # vision tower frozen (MM-PRM); the projector trains if the adapter's image
    # features carry gradients (InternVLAdapter computes them under inference_mode today: a warning says so)
    vision_prefixes: tuple[str, ...] = VISION_PREFIXES
    lora: LoraSettings | None = None
    seed: int = 0
    shuffle: bool = True
    eval_every: int | None = None  # optimizer steps between evaluations (eval always runs at the end)
    eval_batch_size: int | None = None  # None: 2 * batch_size
    eval_threshold: float = 0.5  # predicted first error: first step with reward < this
    eval_label_threshold: float = 0.5  # true first error: first step with label < this
    save_steps: int | None = None  # every this many steps: output_dir/checkpoint-{step} and the resume point
    keep_step_checkpoints: bool = True  # False: only the resume point (output_dir/checkpoint-last, train/resume.py)
    save_final: bool = True  # save the trained PRM to output_dir at the end
    progress: bool = True  # tqdm progress bar
    device: str | None = None  # move the model here first; None: where it is
    report_to: tuple[str, ...] = ()  # also log to "tensorboard" (output_dir/runs) and/or "wandb" (train/reporting.py)

    def __post_init__(self) -> None:
        if self.label_mode not in ("soft", "hard"):
            raise ValueError(f"label_mode must be 'soft' or 'hard', got {self.label_mode!r}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {self.batch_tokens}")
        for name in ("batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0 (or set max_steps), got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.save_steps is not None and self.lora is not None:
            raise ValueError("save_steps is not supported with LoRA (the final checkpoint is saved merged); unset one")
        if self.save_steps is not None and self.output_dir is None:
            raise ValueError("save_steps needs output_dir")
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]  # a list from JSON: two floats
        self.vision_prefixes = tuple(self.vision_prefixes)
        self.report_to = tuple(self.report_to)


@dataclass
class TrainResult:
    prm: PRM  # the trained PRM (same object as passed in), in eval mode
    steps: int  # optimizer steps taken
    epochs: float  # epochs covered (fractional)
    learning_rate: float  # peak learning rate used
    losses: list[float]  # training loss per optimizer step
    eval_history: list[dict] = field(default_factory=list)
    checkpoint_dir: Path | None = None
    log_path: Path | None = None
    elapsed_s: float = 0.0
    trainable_params: int = 0
    frozen_params: int = 0
    stopped_early: bool = False


# --- the marker readout -----------------------------------------------------
def _encode(prm: PRM, example: TrainExample, index: int) -> tuple[EncodedCandidate, torch.Tensor | None]:
    """One sample through the scoring path: PRM.encode (format + images)."""
    try:
        question = prm.encode(example.question, [example.steps], example.images)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"training sample {index}: {exc}") from None
    cand = question.candidates[0]
    if cand.num_steps != len(example.labels):
        raise ValueError(
            f"training sample {index}: the format produced {cand.num_steps} step markers for "
            f"{len(example.labels)} labels"
        )
    features = question.image_features
    if features is not None and features.is_inference():
        # Computed under inference_mode (the adapter's scoring path): usable, but nothing before the
        # merge (vision projector) gets a gradient; the text decoder and head still train.
        warnings.warn(
            f"{type(prm.adapter).__name__}.image_features returned inference-mode tensors: the vision "
            "projector is not trained (the text model and reward head are)", stacklevel=2)
        features = features.clone()
    return cand, features


def _autocast(prm: PRM, bf16: bool):
    return torch.autocast(prm.adapter.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def _marker_logit_diff(prm: PRM, examples: Sequence[TrainExample], indices: Sequence[int], *, packing: bool,
                       bf16: bool, cache: dict[int, EncodedCandidate] | None = None):
    """(d = logit_good - logit_bad at every marker [M], cu_markers, marker hidden rows [M, d], tokens run)."""
    adapter = prm.adapter
    device = adapter.device
    with _autocast(prm, bf16):
        encoded = []
        for i in indices:
            if cache is not None and i in cache:
                encoded.append((cache[i], None))
            else:
                encoded.append(_encode(prm, examples[i], i))
        cands = [c for c, _ in encoded]
        layout = make_layout([len(c.input_ids) for c in cands], [c.reward_positions for c in cands], packing, device)
        if any(f is not None for _, f in encoded):
            embeds = []
            for cand, features in encoded:
                ids = torch.tensor(cand.input_ids, dtype=torch.long, device=device)
                merged = adapter.merge_image_features(ids, features) if features is not None else None
                embeds.append(merged if merged is not None else adapter.embed(ids))
            inputs = {"inputs_embeds": place_embeds(layout, embeds)}
        else:
            pad_id = prm.tokenizer.pad_token_id
            pad_id = pad_id if pad_id is not None else (prm.tokenizer.eos_token_id or 0)
            inputs = {"input_ids": place_tokens(layout, [c.input_ids for c in cands], pad_id, device)}
        out = adapter.decoder(**inputs, attention_mask=layout.attention_mask,
                              position_ids=_position_ids(adapter, layout, encoded, packing), use_cache=False)
    hidden = out.last_hidden_state
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, layout.marker_index)
    # Outside autocast: the readout is the scoring formula, in fp32.
    return prm.reward_head.logit_diff(rows), layout.cu_markers, rows, sum(layout.lengths)


def _position_ids(adapter, layout, encoded, packing: bool) -> torch.Tensor:
    """The layout's 1-D positions, or an M-RoPE model's (t, h, w) ids [3, rows, width] when a sample
    has an image (Qwen2.5-VL: image tokens take 2-D positions and the text after them is shifted)."""
    rope = [adapter.position_ids(c.input_ids, f) if f is not None else None for c, f in encoded]
    if all(r is None for r in rope):
        return layout.position_ids
    if packing:
        raise ValueError("training an M-RoPE model (Qwen2.5-VL) on samples with images needs padded batches: "
                         "set TrainConfig(packing=False)")
    ids = layout.position_ids[None].expand(3, -1, -1).clone()
    for (row, col), n, r in zip(layout.starts, layout.lengths, rope):
        if r is not None:
            ids[:, row, col:col + n] = r.to(ids.device)
    return ids


def _targets(examples: Sequence[TrainExample], indices: Sequence[int], label_mode: str, threshold: float,
             device) -> torch.Tensor:
    labels = [v for i in indices for v in examples[i].labels]
    t = torch.tensor(labels, dtype=torch.float32, device=device)
    return (t >= threshold).float() if label_mode == "hard" else t


def position_balance_weights(label_lists: Sequence[Sequence[float]], threshold: float = 0.5) -> list[list[float]]:
    """Per-step loss weights that give every step index k the overall mix of good (label >= threshold)
    and bad steps: w = n_k * P(class) / n_{k,class}.  The weighted loss then gains nothing from guessing
    by position (only the step's content helps), while the overall prior -- and so the meaning of a
    0.5 threshold -- is kept.  The total weight at each index stays n_k; an index with one class only
    keeps weight 1."""
    counts: dict[int, list[int]] = {}
    for labels in label_lists:
        for k, y in enumerate(labels):
            counts.setdefault(k, [0, 0])[int(y >= threshold)] += 1
    total = [sum(c[j] for c in counts.values()) for j in (0, 1)]
    prior = [t / max(1, sum(total)) for t in total]
    weight = {k: [sum(c) * prior[j] / c[j] if all(c) else 1.0 for j in (0, 1)] for k, c in counts.items()}
    return [[weight[k][int(y >= threshold)] for k, y in enumerate(labels)] for labels in label_lists]


def _step_losses(diff: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-step soft cross-entropy over (good, bad) with target [y, 1 - y] == BCEWithLogits(d, y)."""
    return F.binary_cross_entropy_with_logits(diff, targets, reduction="none")


def marker_loss(prm: PRM, samples: Iterable, *, label_mode: str = "soft", hard_label_threshold: float = 0.5,
                packing: bool = False, bf16: bool = False) -> torch.Tensor:
    """Mean marker loss of ``samples`` as one micro-batch (differentiable); the trainer's loss."""
    examples = [as_example(s, i) for i, s in enumerate(samples)]
    indices = list(range(len(examples)))
    diff, _, _, _ = _marker_logit_diff(prm, examples, indices, packing=packing, bf16=bf16)
    return _step_losses(diff, _targets(examples, indices, label_mode, hard_label_threshold, diff.device)).mean()


def _check_readout(prm: PRM, rows: torch.Tensor, diff: torch.Tensor) -> None:
    """The loss's logit difference must be the scoring formula (a head overriding only one would differ)."""
    head = prm.reward_head
    with torch.no_grad():
        scored = head.rewards(rows.detach()).float()
        trained = torch.sigmoid(diff.detach())
    if not torch.allclose(scored, trained, atol=1e-4, rtol=1e-3):
        raise RuntimeError(
            f"{type(head).__name__}.logit_diff disagrees with its rewards "
            f"(max |dp| = {(scored - trained).abs().max().item():.3g}); a reward head that overrides the "
            "readout must override both so training optimizes what scoring reads"
        )


# --- prediction / evaluation ------------------------------------------------
def _eval_diffs(prm: PRM, examples: Sequence[TrainExample], batch_size: int, packing: bool, bf16: bool,
                cache: dict | None = None) -> list[torch.Tensor]:
    model = prm.model
    was_training = model.training
    model.eval()
    per_sample: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                indices = list(range(start, min(start + batch_size, len(examples))))
                diff, cu, _, _ = _marker_logit_diff(prm, examples, indices, packing=packing, bf16=bf16, cache=cache)
                diff = diff.float().cpu()
                per_sample.extend(diff[a:b] for a, b in zip(cu, cu[1:]))
    finally:
        model.train(was_training)
    return per_sample


def predict_step_rewards(prm: PRM, samples: Iterable, *, batch_size: int = 8, packing: bool = False,
                         bf16: bool = False) -> list[list[float]]:
    """Step rewards p_good of each sample's steps (labels are not needed: dicts/objects with question, steps)."""
    examples = []
    for i, s in enumerate(samples):
        steps = s.get("steps") if isinstance(s, dict) else getattr(s, "steps", None)
        filled = dict(s) if isinstance(s, dict) else {
            k: getattr(s, k, None) for k in ("question", "steps", "images", "image_paths", "image", "image_path")}
        if filled.get("labels") is None:
            filled["labels"] = [1.0] * len(steps or [])
        examples.append(as_example(filled, i))
    return [torch.sigmoid(d).tolist() for d in _eval_diffs(prm, examples, batch_size, packing, bf16)]


def evaluate_prm(prm: PRM, samples: Iterable, *, batch_size: int = 8, threshold: float = 0.5,
                 label_threshold: float = 0.5, label_mode: str = "soft", hard_label_threshold: float = 0.5,
                 packing: bool = False, bf16: bool = False) -> dict:
    """Marker loss, ProcessBench first-error metrics (``step_error_f1``) and per-step macro F1
    (``step_macro_f1``) of ``prm`` on labelled samples; see mmprm_infer.evaluation.metrics for the definitions."""
    examples = [as_example(s, i) for i, s in enumerate(samples)]
    return _evaluate(prm, examples, None, batch_size=batch_size, threshold=threshold,
                     label_threshold=label_threshold, label_mode=label_mode,
                     hard_label_threshold=hard_label_threshold, packing=packing, bf16=bf16)


def _evaluate(prm: PRM, examples: list[TrainExample], cache: dict | None, *, batch_size: int, threshold: float,
              label_threshold: float, label_mode: str, hard_label_threshold: float, packing: bool,
              bf16: bool) -> dict:
    if not examples:
        raise ValueError("evaluation set is empty")
    diffs = _eval_diffs(prm, examples, batch_size, packing, bf16, cache)
    targets = _targets(examples, range(len(examples)), label_mode, hard_label_threshold, "cpu")
    loss = _step_losses(torch.cat(diffs), targets).mean().item()
    rewards = [torch.sigmoid(d).tolist() for d in diffs]
    labels = [ex.labels for ex in examples]
    metrics = {"loss": loss}
    metrics.update(step_error_f1(rewards, labels, threshold, label_threshold))
    metrics.update(step_macro_f1(rewards, labels, threshold, label_threshold))
    return metrics


# --- model preparation ------------------------------------------------------
def default_learning_rate(num_params: int, lora: bool = False) -> float:
    """Peak learning rate by model size.

    Full fine-tuning: 2e-6 from 1B parameters up (MM-PRM's 8B setting),
    1e-5 from 100M to 1B (interpolated guess, not measured), 1e-3 below 100M.
    LoRA: 1e-4 from 100M up (the usual LoRA rate, not measured), 3e-3 below.
    The small-model rates were measured on the tiny test models:
    train/synthetic/RESULTS.md, "The trainer's default learning rates".
    """
    if lora:
        return 1e-4 if num_params >= 100_000_000 else 3e-3
    if num_params >= 1_000_000_000:
        return 2e-6
    if num_params >= 100_000_000:
        return 1e-5
    return 1e-3


def freeze_vision_tower(prm: PRM, prefixes: Sequence[str] = VISION_PREFIXES) -> int:
    """Freeze the vision tower (the adapter's ``vision_tower`` if it has one, else parameters under
    ``prefixes`` at the top level or below ``model.``); returns how many parameters it froze."""
    frozen = 0
    tower = getattr(prm.adapter, "vision_tower", None)
    if isinstance(tower, nn.Module):
        for p in tower.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen += p.numel()
    for name, p in prm.model.named_parameters():
        parts = name.split(".")
        if parts[0] in prefixes or (len(parts) > 1 and parts[0] == "model" and parts[1] in prefixes):
            if p.requires_grad:
                p.requires_grad_(False)
                frozen += p.numel()
    return frozen


def _apply_lora(prm: PRM, settings: LoraSettings):
    try:
        from peft import LoraConfig, get_peft_model  # peft: optional (the train extra)
    except ImportError as exc:
        raise ImportError(
            "TrainConfig.lora needs the peft package (pip install 'peft>=0.13'); or set lora=None for full "
            "fine-tuning"
        ) from exc
    model = prm.model
    decoder_modules = {id(m) for m in prm.adapter.decoder.modules()}
    names = [n for n, m in model.named_modules()
             if id(m) in decoder_modules and isinstance(m, nn.Linear)
             and n.rsplit(".", 1)[-1] in settings.target_modules]
    if not names:
        raise ValueError(f"LoRA found no linear layers named {settings.target_modules} in the text decoder")
    to_save = ["score"] if settings.train_head and prm.format.model_kind == MODEL_QWEN2_PRM else None
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=names, modules_to_save=to_save, bias="none")
    return get_peft_model(model, config)


def _param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    decay = [p for n, p in named if p.ndim >= 2 and "norm" not in n.lower()]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "norm" not in n.lower())]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# --- resuming ---------------------------------------------------------------
# The options that shape a run's trajectory, as the user names them (`mmprm train` flag, else the
# TrainConfig field): a resume must use the saved run's, or it is not the continuation it claims to be.
RESUME_OPTIONS = {"learning_rate": "--learning-rate", "seed": "--seed", "batch_size": "--per-device-train-batch-size",
                  "batch_tokens": "--batch-tokens", "grad_accum_steps": "--gradient-accumulation-steps",
                  "weight_decay": "--weight-decay", "warmup_ratio": "--warmup-ratio",
                  "label_mode": "--soft-labels/--hard-labels", "hard_label_threshold": "--label-threshold",
                  "bf16": "--bf16", "freeze_vision": "--freeze-vision/--train-vision",
                  "max_grad_norm": "max_grad_norm", "adam_betas": "adam_betas", "adam_eps": "adam_eps",
                  "packing": "packing", "balance_positions": "balance_positions", "shuffle": "shuffle"}


def run_options(config: TrainConfig, learning_rate: float) -> dict:
    """``RESUME_OPTIONS`` of this run (the learning rate as resolved), as plain data."""
    values = {**asdict(config), "learning_rate": learning_rate}
    return {flag: list(values[name]) if isinstance(values[name], tuple) else values[name]
            for name, flag in RESUME_OPTIONS.items()}


# --- the loop ---------------------------------------------------------------
def _micro_batches(order: list[int], config: TrainConfig, lengths: Sequence[int] | None) -> list[list[int]]:
    """``order`` cut into micro-batches: ``batch_size`` samples each, or with ``batch_tokens`` as many as
    fit the budget (rows x longest when padded, the sum when packed)."""
    if config.batch_tokens is None or lengths is None:
        return [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    out: list[list[int]] = []
    for i in order:
        if out:
            trial = out[-1] + [i]
            cost = (sum(lengths[j] for j in trial) if config.packing
                    else len(trial) * max(lengths[j] for j in trial))
            if cost <= config.batch_tokens:
                out[-1] = trial
                continue
        out.append([i])
    return out


def _optimizer_batches(n: int, config: TrainConfig,
                       lengths: Sequence[int] | None = None) -> Iterator[tuple[float, list[list[int]]]]:
    """(epoch position, micro-batches of sample indices) per optimizer step, epoch after epoch:
    ``grad_accum_steps`` micro-batches per step (``_micro_batches``)."""
    generator = torch.Generator().manual_seed(config.seed)
    epoch = 0
    while True:
        order = torch.randperm(n, generator=generator).tolist() if config.shuffle else list(range(n))
        micro = _micro_batches(order, config, lengths)
        done = 0
        for start in range(0, len(micro), config.grad_accum_steps):
            step = micro[start:start + config.grad_accum_steps]
            done += sum(len(m) for m in step)
            yield epoch + done / n, step
        epoch += 1


def _steps_per_epoch(n: int, config: TrainConfig, lengths: Sequence[int] | None) -> int:
    if config.batch_tokens is None or lengths is None:
        return math.ceil(n / (config.batch_size * config.grad_accum_steps))
    # the first epoch's order (the same seeded draw _optimizer_batches makes)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(n, generator=generator).tolist() if config.shuffle else list(range(n))
    return math.ceil(len(_micro_batches(order, config, lengths)) / config.grad_accum_steps)


def _accumulate(prm: PRM, examples, cache, micro_batches: list[list[int]], config: TrainConfig,
                check: bool, weights: Sequence[Sequence[float]] | None = None,
                distributed: Distributed | None = None) -> tuple[float, int]:
    """Forward/backward of one optimizer step; gradients of the (weighted) mean step loss accumulate in .grad.
    With several processes, this one runs its share of the micro-batches (the mean stays over all of them).
    Returns (this process's part of the loss, tokens run here)."""
    def step_weights(micro):
        return [w for i in micro for w in (weights[i] if weights is not None else [1.0] * len(examples[i].labels))]

    total_weight = sum(sum(step_weights(micro)) for micro in micro_batches)
    loss_value, tokens = 0.0, 0
    for micro in (distributed.share(micro_batches) if distributed is not None else micro_batches):
        diff, _, rows, micro_tokens = _marker_logit_diff(prm, examples, micro, packing=config.packing,
                                                         bf16=config.bf16, cache=cache)
        tokens += micro_tokens
        if check:
            _check_readout(prm, rows, diff)
            check = False
        targets = _targets(examples, micro, config.label_mode, config.hard_label_threshold, diff.device)
        w = torch.tensor(step_weights(micro), dtype=diff.dtype, device=diff.device)
        loss = (w * _step_losses(diff, targets)).sum() / total_weight
        loss.backward()
        loss_value += loss.item()
    return loss_value, tokens


def _write(handle, record: dict) -> None:
    if handle is not None:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def train_prm(prm: PRM, train_samples: Iterable, config: TrainConfig | None = None,
              eval_samples: Iterable | None = None, *,
              callbacks: Sequence[Callable[[dict], Any]] = (), resume: ResumeState | None = None,
              distributed: Distributed | None = None) -> TrainResult:
    """Train ``prm`` in place on labelled step samples; returns a ``TrainResult``.

    ``train_samples``: objects with ``question``, ``steps`` (list of str),
    ``labels`` (one MC value in [0, 1] per step) and optional image(s)
    (``image``/``images``/``image_path``/``image_paths``), or dicts with those
    keys.  Each callback gets every log record (``record["event"]`` is
    "train_step" or "eval"); one returning True stops training after that step.
    ``distributed`` (``train.distributed.Distributed``, from ``torchrun`` / ``accelerate launch``): every
    process trains the same model on its share of each step's micro-batches, gradients summed; process 0
    writes the logs and checkpoints.
    """
    from transformers import get_cosine_schedule_with_warmup  # transformers: heavy, loaded where used

    config = config or TrainConfig()
    distributed = distributed or Distributed()
    main = distributed.is_main
    started = time.perf_counter()
    examples = [as_example(s, i) for i, s in enumerate(train_samples)]
    if not examples:
        raise ValueError("train_samples is empty: give at least one labelled sample")
    eval_examples = [as_example(s, i) for i, s in enumerate(eval_samples)] if eval_samples is not None else []
    torch.manual_seed(config.seed)

    model = prm.model
    if config.device is not None:
        model.to(config.device)
    if next(model.parameters()).dtype in (torch.bfloat16, torch.float16):
        warnings.warn(
            "training half-precision weights directly: small updates (lr ~1e-6) vanish in bf16/fp16; load the "
            "checkpoint in float32 and set TrainConfig(bf16=True) for bf16 compute", stacklevel=2)
    # Text samples are encoded once, up front: bad data fails here, before the model is touched.
    # (Samples with images are encoded at each step: their image features must see the current weights.)
    cache = {i: _encode(prm, ex, i)[0] for i, ex in enumerate(examples) if ex.images is None}
    eval_cache = {i: _encode(prm, ex, i)[0] for i, ex in enumerate(eval_examples) if ex.images is None}
    requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    frozen = freeze_vision_tower(prm, config.vision_prefixes) if config.freeze_vision else 0
    num_params = sum(p.numel() for p in model.parameters())
    peft_model = _apply_lora(prm, config.lora) if config.lora is not None else None
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (all frozen)")
    lr = config.learning_rate or default_learning_rate(num_params, lora=config.lora is not None)
    optimizer = torch.optim.AdamW(_param_groups(trainable, config.weight_decay), lr=lr, betas=config.adam_betas,
                                  eps=config.adam_eps)

    # token lengths for --batch-tokens: cached text samples, and one encode of each image sample
    lengths = ([len(cache[i].input_ids) if i in cache else len(_encode(prm, ex, i)[0].input_ids)
                for i, ex in enumerate(examples)] if config.batch_tokens else None)
    steps_per_epoch = _steps_per_epoch(len(examples), config, lengths)
    total_steps = config.max_steps or max(1, math.ceil(steps_per_epoch * config.epochs))
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps)

    enabled_checkpointing = False
    if config.gradient_checkpointing and not getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        enabled_checkpointing = True

    out_dir = Path(config.output_dir) if config.output_dir is not None else None
    train_log = eval_log = reporters = None
    if out_dir is not None and main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(
            {**config_dict(config), "resolved_learning_rate": lr, "total_steps": total_steps}, indent=2))
        mode = "a" if resume is not None else "w"  # a resumed run continues its logs
        train_log = open(out_dir / TRAIN_LOG, mode)
        eval_log = open(out_dir / EVAL_LOG, mode) if eval_examples else None
        reporters = Reporters(config.report_to, out_dir, config_dict(config)) if config.report_to else None

    params = [p for _, p in trainable]
    weights = (position_balance_weights([ex.labels for ex in examples], config.hard_label_threshold)
               if config.balance_positions else None)
    losses: list[float] = []
    history: list[dict] = []
    stop = False
    step = 0
    epoch = 0.0
    eval_batch = config.eval_batch_size or 2 * config.batch_size

    def run_eval() -> None:
        nonlocal stop
        metrics = _evaluate(prm, eval_examples, eval_cache, batch_size=eval_batch, threshold=config.eval_threshold,
                            label_threshold=config.eval_label_threshold, label_mode=config.label_mode,
                            hard_label_threshold=config.hard_label_threshold, packing=config.packing,
                            bf16=config.bf16)
        record = {"event": "eval", "step": step, "epoch": round(epoch, 4), **metrics}
        history.append(record)
        _write(eval_log, record)
        if reporters is not None:
            reporters.log(record)
        stop = any([callback(record) is True for callback in callbacks]) or stop

    batches = _optimizer_batches(len(examples), config, lengths)
    if resume is not None:
        if config.lora is not None:
            raise ValueError("resuming a LoRA run is not supported (its checkpoints are saved merged)")
        resume.check(len(examples), total_steps, run_options(config, lr))
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        for _ in range(resume.step):  # the same seeded order: skip the batches already trained on
            epoch, _ = next(batches)
        step, losses, history = resume.step, list(resume.losses), list(resume.eval_history)
        torch.set_rng_state(resume.rng)
    model.train()
    tokens_run, loop_start = 0, time.perf_counter()
    bar = progress_bar(total=total_steps, initial=step, desc="train PRM", unit="steps", disable=not config.progress)
    try:
        while step < total_steps and not stop:
            epoch, micro_batches = next(batches)
            loss, step_tokens = _accumulate(prm, examples, cache, micro_batches, config, check=step == 0,
                                            weights=weights, distributed=distributed)
            if distributed.world_size > 1:
                distributed.all_reduce_gradients(params)
                loss, step_tokens_sum = distributed.sum(loss, step_tokens)
                step_tokens = int(step_tokens_sum)
            tokens_run += step_tokens
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss} at step {step + 1}; lower the learning rate, or train in "
                    "float32 / with bf16 autocast instead of fp16")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf).item()
            lr_now = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss)
            record = {"event": "train_step", "step": step, "epoch": round(epoch, 4), "loss": loss, "lr": lr_now,
                      "grad_norm": grad_norm, "samples": sum(len(m) for m in micro_batches),
                      "markers": sum(len(examples[i].labels) for m in micro_batches for i in m),
                      "tokens": step_tokens,
                      "elapsed_s": round(time.perf_counter() - started, 3)}
            _write(train_log, record)
            if reporters is not None:
                reporters.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_now:.2e}",
                            tokens_per_s=f"{tokens_run / max(time.perf_counter() - loop_start, 1e-9):.0f}")
            stop = any([callback(record) is True for callback in callbacks])
            if eval_examples and config.eval_every and step % config.eval_every == 0:
                run_eval()
            if config.save_steps and step % config.save_steps == 0 and step < total_steps and main:
                model.eval()
                if config.keep_step_checkpoints:
                    # save_steps needs output_dir (checked in TrainConfig): out_dir is set
                    prm.save_pretrained(out_dir / f"checkpoint-{step}")  # type: ignore[operator]
                save_resume_point(out_dir, prm, optimizer, scheduler, step, epoch, losses, history,  # type: ignore[arg-type]
                                  len(examples), total_steps, run_options(config, lr))
                model.train()
        if eval_examples and (not history or history[-1]["step"] != step):
            run_eval()
    finally:
        bar.close()
        for handle in (train_log, eval_log):
            if handle is not None:
                handle.close()
        if reporters is not None:
            reporters.close()
        if enabled_checkpointing:
            model.gradient_checkpointing_disable()
        model.eval()
        if peft_model is None:  # as it was before training (the vision tower was frozen for training only)
            for name, p in model.named_parameters():
                p.requires_grad_(requires_grad_before.get(name, True))

    trainable_count = sum(p.numel() for p in params)
    if peft_model is not None:
        prm.model = peft_model.merge_and_unload().eval()  # plain weights: from_pretrained needs no peft
        prm.adapter = adapter_for(prm.model, prm.format.model_kind)
        for name, p in prm.model.named_parameters():
            p.requires_grad_(requires_grad_before.get(name, True))
    checkpoint = None
    if out_dir is not None and config.save_final and main:
        prm.save_pretrained(out_dir)
        checkpoint = out_dir
    distributed.barrier()  # the others wait until the checkpoint is whole
    return TrainResult(
        prm=prm, steps=step, epochs=epoch, learning_rate=lr, losses=losses, eval_history=history,
        checkpoint_dir=checkpoint, log_path=out_dir / TRAIN_LOG if out_dir is not None else None,
        elapsed_s=time.perf_counter() - started, trainable_params=trainable_count, frozen_params=frozen,
        stopped_early=stop and step < total_steps,
    )


def train_prm_from_checkpoint(path: str | os.PathLike, train_samples: Iterable, config: TrainConfig | None = None,
                              eval_samples: Iterable | None = None, *, format: str | None = None,
                              dtype="float32", device: str = "cpu", callbacks: Sequence[Callable[[dict], Any]] = (),
                              **format_options) -> TrainResult:
    """Load ``PRM.from_pretrained(path, ...)`` (float32 weights by default: use ``bf16=True`` for bf16
    compute) and train it; with ``config.output_dir`` the result loads with ``PRM.from_pretrained(output_dir)``."""
    prm = PRM.from_pretrained(path, format=format, device=device, dtype=dtype, **format_options)
    return train_prm(prm, train_samples, config, eval_samples, callbacks=callbacks)


def config_dict(config: TrainConfig) -> dict:
    """The config as plain JSON-able data (for logs)."""
    return json.loads(json.dumps(asdict(config), default=str))
