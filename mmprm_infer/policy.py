"""The policy protocol: whatever writes step-by-step solutions (rollouts) for a question.

One small protocol, ``Policy.generate(prompts, n, **sampling)``, returns ``n``
sampled continuations per prompt.  A prompt is a question, its images and
optionally the steps of a partial solution; the policy continues after those
steps and returns only the new text (the remaining steps, separated by
``"\\n\\n"``), so MCTS annotation and step-level search can restart a
solution from any of its prefixes.

It lives in the core so that training (MCTS, MC estimation, the synthetic
policy) and the integrations (transformers, OpenAI-compatible servers, vLLM)
both reach it without importing each other.  Sampling defaults are MM-PRM's
rollout settings: temperature 1.0, top_p 0.9, top_k 50.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "STEP_SEPARATOR",
    "DEFAULT_SAMPLING",
    "DEFAULT_SYSTEM_PROMPT",
    "PolicyPrompt",
    "Policy",
    "PolicyError",
    "join_steps",
    "split_steps",
    "sampling_options",
]

STEP_SEPARATOR = "\n\n"

# MM-PRM's rollout sampling (temperature 1.0, top_p 0.9, top_k 50).
DEFAULT_SAMPLING: dict[str, Any] = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "max_new_tokens": 1024}
_SAMPLING_KEYS = frozenset(DEFAULT_SAMPLING) | {"seed"}

DEFAULT_SYSTEM_PROMPT = (
    "Solve the problem step by step. Separate the steps with a blank line, and put your final answer "
    "within \\boxed{}."
)


class PolicyError(RuntimeError):
    """A policy could not produce rollouts (server error, bad response, ...)."""


@dataclass
class PolicyPrompt:
    """What a policy continues: a question, its images and the steps written so far.

    ``images``: PIL images or paths (a policy that cannot see images says so).
    ``partial_steps``: a partial solution to continue; the policy returns only
    the continuation.
    """

    question: str
    images: list = field(default_factory=list)
    partial_steps: list[str] = field(default_factory=list)


@runtime_checkable
class Policy(Protocol):
    def generate(self, prompts: list[PolicyPrompt], n: int, **sampling: Any) -> list[list[str]]:
        """``n`` continuations per prompt (outer list in prompt order), each the
        remaining steps joined by ``"\\n\\n"``.  Sampling options:
        ``temperature``, ``top_p``, ``top_k``, ``max_new_tokens``, ``seed``."""
        ...


def join_steps(steps: Sequence[str]) -> str:
    return STEP_SEPARATOR.join(s.strip() for s in steps)


def split_steps(text: str) -> list[str]:
    """Steps of a solution: split on blank lines, blank steps dropped."""
    return [s.strip() for s in text.split(STEP_SEPARATOR) if s.strip()]


def sampling_options(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` updated by ``overrides``; unknown keys are an error, not ignored."""
    unknown = set(overrides) - _SAMPLING_KEYS
    if unknown:
        raise TypeError(f"unknown sampling option(s) {sorted(unknown)}; known: {sorted(_SAMPLING_KEYS)}")
    out = {**defaults, **{k: v for k, v in overrides.items() if v is not None}}
    if out.get("temperature", 1.0) < 0:
        raise ValueError(f"temperature must be >= 0, got {out['temperature']}")
    if not 0 < out.get("top_p", 1.0) <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {out['top_p']}")
    return out
