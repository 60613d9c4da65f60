"""``mmprm demo`` (what ``bash scripts/demo.sh`` runs): the built-in default job, offline, on CPU, in a few
minutes (``mmprm_infer.train.synthetic.demo``).

1. A trained PRM shipped with the package (the ``full`` preset's) scores and reranks 16 candidates for each of
   300 fresh held-out synthetic chart problems (a 3x3 table of digits or a 5-bar chart, rendered as an image,
   with a multi-step arithmetic question): step-error F1, Best-of-N, PRM-weighted vote, majority vote,
   random pick and pass@N.
2. The pipeline in miniature: OmegaPRM (MCTS) annotation, a tiny InternVL PRM built from scratch and trained
   on the labels, scored on the same candidates.
3. A reranking example, the report (``WORKDIR/report.json``), the plot (``WORKDIR/accuracy_vs_n.png``) and
   the claim checked on this machine.

``mmprm pipeline --preset full`` is the run that built the shipped PRM (docs/training.md; its numbers in
train/synthetic/RESULTS.md).
"""

from __future__ import annotations

import argparse

from mmprm_infer.cli.arguments import non_negative_int, positive_int

HELP = ("the built-in default job: a shipped PRM reranks fresh held-out problems, then the whole pipeline "
        "(MCTS annotation -> train a tiny multimodal PRM -> Best-of-N) in miniature")
DESCRIPTION = HELP


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="runs/demo", help="where the report, plot and trained PRM go")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="held-out problems, policy samples and the miniature run's seed")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    p.add_argument("--test-problems", type=positive_int, default=300, help="fresh held-out problems")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from mmprm_infer.train.synthetic.demo import run_demo  # torch and the recipe: not needed for `mmprm -h`

    run_demo(args.workdir, seed=args.seed, threads=args.threads, test_problems=args.test_problems,
             progress=not args.no_progress)
    return 0
