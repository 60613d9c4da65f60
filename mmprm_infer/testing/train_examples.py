"""A tiny base model and step-labelled files in two layouts, to try `mmprm train` offline:

    python -m mmprm_infer.testing.train_examples runs/train-example

writes ``base/`` (a random tiny Qwen2 causal LM whose tokenizer lacks the
``custom`` format's ``<step>`` tag, as a real base would), ``steps.jsonl``
(TRL stepwise) and ``more.json`` (MM-PRM's traverse layout): small sums whose
wrong steps are labelled 0.  Training on them shows the command and its
files; the scores mean little (the model is tiny and random).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from mmprm_infer.testing.tiny import build_tiny_causal_lm
from mmprm_infer.train.datasets import StepSample, save_samples

__all__ = ["write_examples"]


def write_examples(root: str | Path, n: int = 48, seed: int = 0) -> Path:
    root, rng = Path(root), random.Random(seed)
    build_tiny_causal_lm(root / "base", arch="qwen2", seed=4)
    samples = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        wrong = rng.random() < 0.5
        total = a + b + (1 if wrong else 0)
        samples.append(StepSample(f"What is {a} + {b}?", [f"{a} + {b} = {total}.", f"So the answer is {total}."],
                                  [0.0, 0.0] if wrong else [1.0, 1.0], id=f"ex{i}"))
    save_samples(samples[: n // 2], root / "steps.jsonl", "stepwise")
    save_samples(samples[n // 2:], root / "more.json", "mm-prm-traverse")
    return root


if __name__ == "__main__":
    print(write_examples(sys.argv[1] if len(sys.argv) > 1 else "runs/train-example"))
