"""The built-in default job: build a tiny PRM offline and rerank an example.

Runs on any machine in seconds with nothing downloaded.  The tiny model has
random weights, so its preferences carry no meaning: the demo shows the
whole path (format -> engine -> aggregation -> selection) and the output a
real checkpoint gives.  Point `mmprm rerank --prm DIR` at a real PRM for
real scores.
"""

from __future__ import annotations

import json
from pathlib import Path

from .prm import PRM
from .rerank import rerank
from .tiny import build_tiny_qwen_prm

QUESTION = "A rectangle is 12 cm long and 5 cm wide. What is half of its area?"
CANDIDATES = [
    "The area is 12 * 5 = 60 square cm.\n\nHalf of it is 60 / 2 = 30.\n\nThe answer is \\boxed{30}.",
    "The area is 12 + 5 = 17 square cm.\n\nHalf of it is 17 / 2 = 8.5.\n\nThe answer is \\boxed{8.5}.",
    "The area is 12 * 5 = 60.\n\nHalf of 60 is 30, so the answer is \\boxed{30}.",
    "Half of the length is 6.\n\nThe area is 6 * 5 = 30.\n\nThe answer is \\boxed{30}.",
]


def run_demo(workdir: str | Path = "runs/demo") -> int:
    workdir = Path(workdir)
    model_dir = workdir / "tiny-qwen2.5-math-prm"
    if not (model_dir / "config.json").is_file():
        build_tiny_qwen_prm(model_dir)
    prm = PRM.from_pretrained(model_dir)
    print(f"PRM: {model_dir} (format {prm.format.name}, random weights: scores are illustrative)\n")
    print(f"Question: {QUESTION}\n")
    for strategy in ("best_of_n", "weighted_vote", "majority_vote"):
        res = rerank(QUESTION, CANDIDATES, prm=prm, aggregate="min", strategy=strategy)
        if strategy == "best_of_n":
            for i, (cand, rewards, score, answer) in enumerate(zip(CANDIDATES, res.step_rewards, res.scores, res.answers)):
                steps = prm.format.split_steps(cand)
                print(f"Candidate {i}: answer={answer!r} score(min)={score:.4f}")
                for step, r in zip(steps, rewards):
                    print(f"    {r:.4f}  {step}")
            print()
        print(f"{strategy:>14}: chose candidate {res.best_index} (answer {res.answers[res.best_index]!r})")
    (workdir / "rerank.json").write_text(json.dumps(res.to_dict(), indent=2))
    return 0
