"""Per-step Monte Carlo estimation (Math-Shepherd, VisualPRM400K): ``mmprm annotate --method mc``.

For each question the policy writes ``num_solutions`` solutions; from every
step prefix of every solution it writes ``num_continuations`` completions;
the step's label is the fraction of them that reach the reference answer
(its expected accuracy).  The last step needs no rollout: its label is whether
the solution itself is right.  All steps are kept with their estimates (no
truncation at the first error, as VisualPRM400K), so one question gives one
sample per solution (``labels.tree_to_samples``).

The per-question record is saved like an OmegaPRM tree (same folder, same
resumption, same ``--ray``), marked ``"method": "mc"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mmprm_infer.answers import AnswerVerifier
from mmprm_infer.policy import Policy, PolicyPrompt, join_steps, split_steps

__all__ = ["MCConfig", "mc_estimate_question", "MC_METHOD"]

MC_METHOD = "mc"


@dataclass
class MCConfig:
    num_solutions: int = 4  # N solutions sampled per question
    num_continuations: int = 16  # K completions from every step prefix
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 1024

    def __post_init__(self):
        if self.num_solutions < 1 or self.num_continuations < 1:
            raise ValueError(f"num_solutions and num_continuations must be >= 1, got {self.num_solutions} and "
                             f"{self.num_continuations}")

    def sampling(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_new_tokens": self.max_new_tokens}


def mc_estimate_question(item, policy: Policy, config: MCConfig,
                         verifier: Callable[[str, str], bool] | None = None) -> tuple[dict[str, Any], int]:
    """One question's record (``solutions``: steps and per-step MC) and its rollout count;
    ``item`` is an ``mcts.AnnotationItem`` whose image is a path or None."""
    verifier = verifier or AnswerVerifier()
    images = [item.image] if item.image else []
    texts = policy.generate([PolicyPrompt(item.question, images)], config.num_solutions, **config.sampling())[0]
    solutions = [steps for steps in (split_steps(t) for t in texts) if steps]
    prompts, owners = [], []
    for s, steps in enumerate(solutions):
        for i in range(len(steps) - 1):  # the prefix through step i; the last step is judged as it is
            prompts.append(PolicyPrompt(item.question, images, steps[:i + 1]))
            owners.append((s, i))
    continuations = policy.generate(prompts, config.num_continuations, **config.sampling()) if prompts else []
    mc = [[0.0] * len(steps) for steps in solutions]
    for (s, i), texts_i in zip(owners, continuations):
        prefix = solutions[s][:i + 1]
        right = sum(bool(verifier(join_steps(prefix + split_steps(t)), item.answer)) for t in texts_i)
        mc[s][i] = right / len(texts_i)
    for s, steps in enumerate(solutions):
        mc[s][-1] = float(bool(verifier(join_steps(steps), item.answer)))
    record = {"id": item.id, "question": item.question, "answer": item.answer, "image_path": item.image,
              "method": MC_METHOD, "solutions": [{"steps": st, "mc": m} for st, m in zip(solutions, mc)],
              "config": dataclasses.asdict(config), **item.extra}
    return record, len(texts) + sum(len(c) for c in continuations)
