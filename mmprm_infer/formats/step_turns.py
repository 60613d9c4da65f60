"""VisualPRM's turn layout, which VL-PRM (Qwen2.5-VL) took over: one chat turn per step.

Turn 1 (user) is ``f'### Question:\\n{question}\\n\\n### Solution Process:\\n{step1}'``
(VL-PRM puts the images in front of it), each later user turn the raw text
of the next step, and every step is answered by an assistant turn holding
``placeholder`` (``'+'``).  The reward of step k is read at the last token of
the k-th ``<|im_start|>assistant\\n`` header, which predicts the answer
(VisualPRM's ``find_placeholder_idx``; the end of the generation prompt in
VL-PRM's one-forward-per-step release), from the good/bad token logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mmprm_infer.formats.base import (
    EncodedCandidate,
    RewardColumns,
    check_reward_count,
    check_steps,
    reward_token_columns,
)
from mmprm_infer.formats.internvl_base import IM_END, IM_START, find_subsequence_positions


def assistant_header_positions(tokenizer, input_ids: Sequence[int], placeholder: str) -> list[int]:
    """The last token of each assistant header answered by ``placeholder``: where each
    ``<|im_start|>assistant\\n{placeholder}<|im_end|>\\n`` token run starts, + the header's length - 1."""
    header = tokenizer.encode(f"{IM_START}assistant\n", add_special_tokens=False)
    target = tokenizer.encode(f"{IM_START}assistant\n{placeholder}{IM_END}\n", add_special_tokens=False)
    return find_subsequence_positions(input_ids, target, len(header) - 1)


def step_turns(question: str, steps: Sequence[str], placeholder: str, images: str = "") -> list[tuple[str, str]]:
    """(role, text) turns: the question (``images`` in front) with step 1, then one step per user
    turn, each answered by an assistant turn holding ``placeholder``."""
    turns: list[tuple[str, str]] = []
    for k, step in enumerate(steps):
        content = f"{images}### Question:\n{question}\n\n### Solution Process:\n{step}" if k == 0 else step
        turns += [("user", content), ("assistant", placeholder)]
    return turns


@dataclass
class StepTurnsFormat:
    """Base of a PRMFormat dataclass in this layout (listed before PRMFormat; its ``build_query``
    renders the turns with its chat template).  The reward is P(``good_token``) against
    ``bad_token``; ``placeholder`` is the assistant's answer to each step."""

    good_token: str = "+"
    bad_token: str = "-"
    placeholder: str = "+"

    if TYPE_CHECKING:  # what the PRMFormat dataclass using this base provides (no fields added here)
        name: str = ""

        def build_query(self, question: str, steps: Sequence[str], image_tokens: Sequence[str] = ()) -> str: ...

    # Whether the query is tokenized with the tokenizer's special tokens (VisualPRM's tokenizer(query)).
    add_special_tokens = True

    def reward_columns(self, tokenizer) -> RewardColumns:
        return reward_token_columns(tokenizer, self.good_token, self.bad_token, self.name)

    def reward_positions(self, tokenizer, input_ids: Sequence[int]) -> list[int]:
        """The last token of each assistant header, before the placeholder."""
        return assistant_header_positions(tokenizer, input_ids, self.placeholder)

    def check_encoded(self, tokenizer, input_ids: list[int], image_tokens: Sequence[str]) -> None:
        """Further checks of an encoded candidate (none here)."""

    def encode(
        self, tokenizer, question: str, steps: Sequence[str], image_tokens: Sequence[str] = ()
    ) -> EncodedCandidate:
        check_steps(steps, self.name)
        ids = tokenizer.encode(self.build_query(question, steps, image_tokens),
                               add_special_tokens=self.add_special_tokens)
        positions = self.reward_positions(tokenizer, ids)
        check_reward_count(
            positions, steps, self.name,
            f"assistant turn(s) '<|im_start|>assistant\\n{self.placeholder}<|im_end|>'",
            "a step (or the question) probably contains that text itself: remove it before scoring",
        )
        self.check_encoded(tokenizer, ids, image_tokens)
        return EncodedCandidate(list(ids), positions)


__all__ = ["StepTurnsFormat", "assistant_header_positions", "step_turns"]
