"""Tiny files in every benchmark's layout, and a tiny PRM, to try `mmprm eval` offline:

    python -m mmprm_infer.testing.eval_examples runs/eval-example

writes ``prm/`` (a random tiny Qwen2.5-Math-PRM-format checkpoint), ``mm-prm/`` (a random
tiny InternVL PRM in MM-PRM's format, for the image benchmark),
``processbench/{gsm8k,math}.jsonl``, ``visualprocessbench/test.jsonl`` with
``images/``, ``prmbench/data/*.jsonl`` and ``bon/candidates.jsonl``.  The
scores mean nothing (the PRM is untrained); the files show the layouts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmprm_infer.testing.tiny import build_tiny_qwen_prm
from mmprm_infer.testing.tiny_internvl import build_tiny_internvl

__all__ = ["write_examples"]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_examples(root: str | Path) -> Path:
    from PIL import Image  # PIL: heavy, loaded where used

    root = Path(root)
    build_tiny_qwen_prm(root / "prm", seed=2)
    build_tiny_internvl(root / "mm-prm", image_size=56, patch_size=14, seed=5)
    for split, offset in (("gsm8k", 0), ("math", 10)):
        _jsonl(root / "processbench" / f"{split}.jsonl", [
            {"id": f"{split}-{i}", "generator": "example", "problem": f"What is {i + offset} + {i}?",
             "steps": [f"{i + offset} + {i} = {2 * i + offset + (i % 3 == 1)}.", f"The answer is {2 * i + offset}."],
             "final_answer_correct": i % 3 != 1, "label": 0 if i % 3 == 1 else -1} for i in range(6)])
    images = root / "visualprocessbench" / "images"
    images.mkdir(parents=True, exist_ok=True)
    for k, colour in enumerate(("red", "navy", "gold")):
        Image.new("RGB", (48, 32), colour).save(images / f"{k}.png")
    _jsonl(root / "visualprocessbench" / "test.jsonl", [
        {"image": [f"images/{i % 3}.png"], "question": "How many bars are there?", "answer": str(3 + i % 2),
         "response": {"steps": [f"I count {3 + i % 3} bars.", f"So the answer is {3 + i % 3}."],
                      "process_correctness": [1 if i % 3 < 2 else -1, 1 if i % 3 < 2 else 0]},
         "policy_model": "example", "data_source": ("MathVision", "MathVerse")[i % 2]} for i in range(6)])
    classes = ("circular", "counterfactual", "multi_solutions")
    for c, classification in enumerate(classes):
        _jsonl(root / "prmbench" / "data" / f"{classification}.jsonl", [
            {"idx": f"{classification}_{i}", "classification": classification, "original_question": "q",
             "modified_question": f"What is {i} * 2?", "question": f"What is {i} * 2?",
             "original_process": [f"{i} * 2 = {2 * i}."],
             "modified_process": [f"{i} * 2 = {2 * i + (c != 2)}.", f"So {2 * i + (c != 2)}."],
             "modified_steps": [1], "error_steps": [] if classification == "multi_solutions" else [1, 2],
             "reason": "example"} for i in range(4)])
    _jsonl(root / "bon" / "candidates.jsonl", [
        {"question": f"What is {i} + {i}?", "answer": str(2 * i), "category": ("easy", "hard")[i % 2],
         "candidates": [f"{i} + {i} = {2 * i + k}.\n\nThe answer is \\boxed{{{2 * i + k}}}." for k in (0, 1, 0, 2)]}
        for i in range(8)])
    return root


if __name__ == "__main__":
    print(write_examples(sys.argv[1] if len(sys.argv) > 1 else "runs/eval-example"))
