"""The built-in default job (``mmprm demo``, ``bash scripts/demo.sh``).

Runs the whole PRM pipeline on the synthetic multimodal task with the
``demo`` preset (``mmprm_infer.train.synthetic.pipeline``), offline, on CPU, in a few
minutes:

1. MCTS (OmegaPRM) annotation of a few hundred training problems -- 3x3
   digit tables and bar charts rendered as images -- with the synthetic
   policy writing the rollouts;
2. the trees become step-labelled samples;
3. a tiny InternVL PRM (mm-prm format, the image as input plus the picture as
   text) is built from scratch and trained on them;
4. on held-out problems, 16 policy samples per problem are scored with the
   trained PRM and Best-of-N (every aggregation), PRM-weighted vote, majority
   vote, random and pass@N are reported with the step-error F1
   (``WORKDIR/report.json``, ``WORKDIR/accuracy_vs_n.png``);
5. it ends with a reranking example: a held-out question, its candidates
   with their step rewards, and the answer the PRM chooses.

``mmprm pipeline --preset full`` is the larger run (docs/training.md; its numbers in
train/synthetic/RESULTS.md).
"""

from __future__ import annotations

import argparse

HELP = ("the built-in default job: the demo-preset pipeline (MCTS annotation -> train a tiny multimodal PRM -> "
        "Best-of-N evaluation), then a reranking example")
DESCRIPTION = HELP


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="runs/demo")


def run(args: argparse.Namespace) -> int:
    from mmprm_infer.train.synthetic.pipeline import preset_config, run_pipeline

    run_pipeline(preset_config("demo", run_dir=str(args.workdir), example=True))
    return 0
