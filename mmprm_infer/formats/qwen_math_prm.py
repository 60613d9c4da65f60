"""qwen2.5-math-prm: chat template, steps joined by <extra_0>, 2-label score head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mmprm_infer.formats.base import (
    MODEL_QWEN2_PRM,
    EncodedCandidate,
    FormatError,
    PRMFormat,
    RewardColumns,
    check_marker_count,
    check_steps,
    positions_of,
    refuse_images,
    single_token_id,
    split_on_blank_lines,
)

QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class QwenMathPRMFormat(PRMFormat):
    step_tag: str = "<extra_0>"
    system_prompt: str = QWEN_PRM_SYSTEM

    name = "qwen2.5-math-prm"
    model_kind = MODEL_QWEN2_PRM

    def split_steps(self, solution: str) -> list[str]:
        return split_on_blank_lines(solution)

    def reward_columns(self, tokenizer) -> RewardColumns:
        # softmax over the 2 labels, index 1 is "correct".
        return RewardColumns(good=1, bad=0)

    def check_tokenizer(self, tokenizer) -> None:
        single_token_id(tokenizer, self.step_tag, "step tag", self.name)
        if not getattr(tokenizer, "chat_template", None):
            raise FormatError(
                f"format {self.name!r} needs the tokenizer's chat template (Qwen ChatML); this "
                "tokenizer has none: load the tokenizer that ships with the checkpoint"
            )

    def encode(
        self, tokenizer, question: str, steps: Sequence[str], image_tokens: Sequence[str] = ()
    ) -> EncodedCandidate:
        refuse_images(image_tokens, self.name)
        check_steps(steps, self.name)
        messages = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": question},
            {"role": "assistant", "content": self.step_tag.join(steps) + self.step_tag},
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        ids = tokenizer.encode(text)
        positions = positions_of(ids, single_token_id(tokenizer, self.step_tag, "step tag", self.name))
        check_marker_count(positions, steps, self.step_tag, self.name)
        return EncodedCandidate(list(ids), positions)
