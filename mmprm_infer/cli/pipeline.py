"""``mmprm pipeline``: annotate (MCTS) -> label -> train a small PRM -> evaluate, on the synthetic task
(``mmprm_infer.train.synthetic.pipeline``)."""

from __future__ import annotations

import argparse
import logging
import sys

from mmprm_infer.cli.arguments import alias
from mmprm_infer.integrations.ray_cluster import RayConnectError

HELP = "annotate -> label -> train a small PRM -> evaluate (--preset demo | full)"
DESCRIPTION = ("Annotate (MCTS) -> label -> train a small PRM -> evaluate Best-of-N and step-error F1 on held-out "
               "synthetic multimodal problems")


def configure(p: argparse.ArgumentParser) -> None:
    # lazy: only `mmprm pipeline` runs it; `mmprm -h` stays light
    from mmprm_infer.train.synthetic.presets import PRESETS

    # lazy: only `mmprm pipeline` runs it; `mmprm -h` stays light
    from mmprm_infer.train.synthetic.task import TEMPLATES

    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--output-dir", default=None, help="output folder (default runs/pipeline-<preset>)")
    alias(p, "--run-dir", dest="output_dir")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--templates", nargs="+", choices=TEMPLATES, default=None,
                   help="question types of the synthetic task (default: the preset's; the demo uses the bar charts)")
    p.add_argument("--train-problems", type=int, default=None)
    p.add_argument("--test-problems", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="next-token pretraining steps on picture facts + reference solutions before PRM training")
    p.add_argument("--verification-steps", type=int, default=None,
                   help="step-verification steps at the step marker after pretraining (prm_init)")
    p.add_argument("--verification-arithmetic", type=float, default=None,
                   help="share of calculations among the step-verification statements")
    p.add_argument("--row-verification-steps", type=int, default=None,
                   help="a second step-verification stage on row and column readings only (prm_init)")
    p.add_argument("--verification-token-verdicts", type=float, default=None,
                   help="weight of a right-so-far verdict at every statement token in the verification stages")
    p.add_argument("--verification-mix", type=float, default=None,
                   help="step-verification drills added to the PRM's training set, per MCTS sample")
    p.add_argument("--balance-positions", action="store_true",
                   help="weight the loss so every step index has the overall good/bad label mix")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--model-kind", choices=("internvl", "text"), default=None)
    p.add_argument("--no-image-text", action="store_true",
                   help="the PRM's question carries no text rendering of the picture (image only)")
    p.add_argument("--soft-labels", action="store_true", help="train on MC values instead of 1/0 labels")
    p.add_argument("--granularity", choices=("node", "step"), default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="score the held-out candidates on a Ray cluster (the 'ray' extra)")
    p.add_argument("--no-example", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    # lazy: only `mmprm pipeline` runs it; `mmprm -h` stays light
    from mmprm_infer.train.synthetic.pipeline import preset_config, run_pipeline

    logging.basicConfig(level=logging.WARNING)
    overrides = {k: v for k, v in {
        "seed": args.seed, "train_problems": args.train_problems, "test_problems": args.test_problems,
        "max_steps": args.max_steps, "learning_rate": args.learning_rate, "hidden": args.hidden,
        "layers": args.layers, "pretrain_steps": args.pretrain_steps, "verification_steps": args.verification_steps,
        "row_verification_steps": args.row_verification_steps,
        "verification_arithmetic": args.verification_arithmetic, "verification_mix": args.verification_mix,
        "verification_token_verdicts": args.verification_token_verdicts,
        "model_kind": args.model_kind, "granularity": args.granularity, "templates": args.templates,
        "threads": args.threads, "ray": args.ray}.items() if v is not None}
    if args.no_image_text:
        overrides["with_image_text"] = False
    if args.balance_positions:
        overrides["balance_positions"] = True
    if args.soft_labels:
        overrides["hard_labels"] = False
    if args.no_example:
        overrides["example"] = False
    if args.no_progress:
        overrides["progress"] = False
    overrides["run_dir"] = args.output_dir or f"runs/pipeline-{args.preset}"
    try:
        config = preset_config(args.preset, **overrides)
    except ValueError as e:
        print(f"mmprm pipeline: {e}", file=sys.stderr)
        return 2
    try:
        run_pipeline(config)
    except RayConnectError as e:
        print(f"mmprm pipeline: {e}", file=sys.stderr)
        return 1
    print(f"mmprm pipeline: wrote the annotation, samples.jsonl, the PRM (prm/), report.json and accuracy_vs_n.png "
          f"to {overrides['run_dir']}", file=sys.stderr)
    return 0

