"""The synthetic recipe's settings: ``PipelineConfig`` (one run), its research knobs (``ReadingStages``) and the
named presets (``tiny`` for tests, ``demo`` for the pipeline in miniature, ``full`` for the PRM the demo ships).
What each knob bought, measured: RESULTS.md beside this file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmprm_infer.aggregation import AGGREGATIONS, PROBABILITY_AGGREGATIONS
from mmprm_infer.train.synthetic.task import TEMPLATES

__all__ = ["REPORTED_AGGREGATIONS", "ReadingStages", "PipelineConfig", "PRESETS", "preset_config"]

# the names of every aggregation of the library, the probability-like ones first (the report's order)
REPORTED_AGGREGATIONS = (*PROBABILITY_AGGREGATIONS, *(a for a in AGGREGATIONS if a not in PROBABILITY_AGGREGATIONS))


@dataclass
class ReadingStages:
    """The recipe's research knobs: how the tiny PRM learns to read the picture before (and while)
    it is trained as a PRM (``prm_init``).  Off by default; the presets turn them on.  What each
    one bought: RESULTS.md."""

    with_image_text: bool = True  # the PRM's question carries the picture as text too (see prm_init)
    pretrain_steps: int = 0  # next-token pretraining on facts + reference solutions first (prm_init.pretrain_reading)
    verification_steps: int = 0  # then step verification at the marker (prm_init.pretrain_step_verification)
    verification_arithmetic: float = 0.0  # share of calculations among the verification statements
    row_verification_steps: int = 0  # then a second verification stage on row / column readings only
    # (prm_init.ROW_VERIFICATION_CURRICULUM): after the first, the marker checks only their last value
    verification_token_verdicts: float = 0.0  # weight of a verdict at every statement token in both stages
    # (right so far or not; prm_init.pretrain_step_verification's token_verdicts)
    verification_mix: float = 0.0  # verification drills added to the PRM's training set, per MCTS sample: the
    # comparison the verification stage grew then keeps being trained in the PRM's own layout (image included)
    save_reading_checkpoint: bool = False  # keep the model after these stages (run_dir/reading): a base to
    # train PRMs from

    def check_stages(self) -> None:
        """``ValueError`` naming the first knob out of range (or verification without the picture's text)."""
        if not 0.0 <= self.verification_arithmetic <= 1.0:
            raise ValueError(f"verification_arithmetic is a share in [0, 1], got {self.verification_arithmetic}")
        if self.verification_token_verdicts < 0:
            raise ValueError("verification_token_verdicts is a loss weight >= 0, "
                             f"got {self.verification_token_verdicts}")
        if self.verification_mix < 0:
            raise ValueError(f"verification_mix must be >= 0 (drills per MCTS sample), got {self.verification_mix}")
        for name in ("pretrain_steps", "verification_steps", "row_verification_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if (self.verification_mix or self.verification_steps or self.row_verification_steps) \
                and not self.with_image_text:
            raise ValueError("step verification checks readings against the picture's text: it needs "
                             "with_image_text=True (drop --no-image-text, or set verification_steps, "
                             "row_verification_steps and verification_mix to 0)")


@dataclass
class PipelineConfig(ReadingStages):
    """One run: the task's problems, annotation, labels, model, training and evaluation settings,
    plus the research knobs of ``ReadingStages`` (one flat set of keyword arguments, one flat
    ``config.json``).  ``ValueError`` on a setting out of range, before any work."""

    run_dir: str = "runs/pipeline"
    preset: str = "custom"
    seed: int = 0  # problem seed (train and test splits have disjoint problem seeds)
    templates: tuple[str, ...] | None = None  # question types (task.TEMPLATES); None: all of them
    policy_seed: int = 0
    # (a) annotation
    train_problems: int = 300
    num_rollouts: int = 16
    rollout_budget: int = 200
    max_search_count: int = 20
    # (b) labels
    granularity: str = "step"
    hard_labels: bool = True  # labels 1/0 by MC > 0 (the checker's notion of a wrong step)
    # (c) model
    model_kind: str = "internvl"  # "internvl" (mm-prm, images) | "text" (custom format, text-only task)
    hidden: int = 64
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 192
    image_size: int = 112
    balance_positions: bool = False  # loss weights: good/bad labels weigh the same at every step index (trainer)
    max_steps: int = 600
    batch_size: int = 8
    learning_rate: float | None = 2e-3
    warmup_ratio: float = 0.05
    eval_fraction: float = 0.05  # of the labelled samples held out for the trainer's eval log
    # (d) evaluation
    test_problems: int = 50
    n_candidates: int = 16
    ns: tuple[int, ...] = (1, 2, 4, 8, 16)
    aggregations: tuple[str, ...] = REPORTED_AGGREGATIONS
    vote_aggregation: str = "min"  # scores summed per answer by the PRM-weighted vote
    threshold: float = 0.5  # predicted first error: first step with reward < threshold
    score_batch_questions: int = 8
    example: bool = True  # print a reranking example at the end
    progress: bool = True
    ray: str | None = None  # score the held-out candidates on a Ray cluster ("auto" or an address; ray_scoring)
    threads: int | None = 1  # torch threads; 1 where runs share the cores (measured: 2 threads on a shared
    # 2-core machine was 5x slower per step than 1), 2 on an idle 2-core machine (1.5x faster than 1, the demo);
    # None leaves torch's default

    def __post_init__(self):
        self.ns = tuple(int(n) for n in self.ns)
        if self.templates is not None:
            self.templates = tuple(self.templates)
            unknown = [t for t in self.templates if t not in TEMPLATES]
            if unknown or not self.templates:
                raise ValueError(f"templates must be a non-empty subset of {', '.join(TEMPLATES)}; "
                                 f"got {list(self.templates)}")
        bad = [n for n in self.ns if n < 1 or self.n_candidates % n]
        if bad:
            raise ValueError(f"every N must divide n_candidates={self.n_candidates}; got {bad}")
        if self.model_kind not in ("internvl", "text"):
            raise ValueError(f"model_kind must be 'internvl' or 'text', got {self.model_kind!r}")
        self.check_stages()


PRESETS: dict[str, dict[str, Any]] = {
    # the pipeline in miniature that `mmprm demo` runs beside the shipped PRM (3-4 minutes on 2 cores): the
    # full preset's stages, short (2 layers; 400 pretraining, 600 + 300 verification and 1200 PRM steps;
    # 2 threads: 1.5x faster per step than 1 on an idle machine).  It shows training at work, not a finished
    # PRM: that takes the full preset (RESULTS.md beside this file: time against quality)
    "demo": dict(train_problems=300, pretrain_steps=400, verification_steps=600, verification_arithmetic=0.3,
                 row_verification_steps=300, verification_token_verdicts=1.0, verification_mix=0.5, max_steps=1200,
                 test_problems=300, layers=2, learning_rate=1e-3, balance_positions=True, threads=2),
    # the PRM the demo ships (trained_prm/ beside this file, 88 min under load on 1 thread, ~35 idle):
    # reading pretraining (with drills) grows the copy circuit that checks a reading against the
    # picture's text; the PRM stage then runs at a lower rate so as not to erase it, on a position-balanced loss
    # step verification (verification_steps; its drills also join the PRM's training set, verification_mix)
    # then gives the marker a comparison to start from, and a second pass on rows and columns
    # (row_verification_steps) makes it check every value of those
    "full": dict(train_problems=2400, pretrain_steps=4000, verification_steps=5000, verification_arithmetic=0.3,
                 row_verification_steps=3000, verification_token_verdicts=1.0, verification_mix=0.5, max_steps=3000,
                 test_problems=300, layers=6, learning_rate=1e-3, balance_positions=True),
    # for tests: seconds
    "tiny": dict(train_problems=12, rollout_budget=48, max_search_count=6, max_steps=4, batch_size=4,
                 hidden=32, layers=1, intermediate=64, test_problems=4, example=False, progress=False),
}


def preset_config(name: str, **overrides) -> PipelineConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PipelineConfig(preset=name, **{**PRESETS[name], **overrides})
