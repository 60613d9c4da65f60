"""rlhflow: RLHFlow Llama3.1-8B-PRM-{Mistral,Deepseek}-Data, one chat turn per step, P("+").

Reproduces RLHFlow's ``math-rm/prm_evaluate.py`` as search-and-learn runs it
(``sal/models/reward_models.py``, ``RLHFFlow``):

- steps: ``answer.split("\\n\\n")`` (blank pieces dropped here);
- conversation: user ``question + " " + step_1``, then one user turn per
  later step, every user turn followed by an assistant turn ``"+"``;
- ``tokenizer.apply_chat_template(conversation)`` (the checkpoint's own
  Llama-3.1 template, BOS and system header included);
- the reward of step k is read at the position predicting the k-th
  assistant ``"+"`` (``logits[:, -3]`` of the conversation through turn k):
  ``softmax(logits[[+, -]])[0]`` with ``+`` = ``tokenizer.encode("+")[-1]``,
  ``-`` = ``tokenizer.encode("-")[-1]``.

All steps come out of one pass over the whole conversation; ``encode``
checks that the conversation through turn k is a token prefix of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mmprm_infer.formats.base import (
    EncodedCandidate,
    FormatError,
    PRMFormat,
    RewardColumns,
    check_steps,
    refuse_images,
)


@dataclass
class RLHFlowFormat(PRMFormat):
    good_token: str = "+"
    bad_token: str = "-"

    name = "rlhflow"
    default_aggregate = "last"  # search-and-learn's Config.agg_strategy, which runs this PRM

    def split_steps(self, solution: str) -> list[str]:
        return [s for s in solution.split("\n\n") if s.strip()]

    def _last_id(self, tokenizer, text: str, role: str) -> int:
        ids = tokenizer.encode(text)
        if not ids:
            raise FormatError(f"format {self.name!r}: the tokenizer encodes the {role} {text!r} to nothing")
        return int(ids[-1])

    def reward_columns(self, tokenizer) -> RewardColumns:
        return RewardColumns(good=self._last_id(tokenizer, self.good_token, "good token"),
                             bad=self._last_id(tokenizer, self.bad_token, "bad token"))

    def check_tokenizer(self, tokenizer) -> None:
        self.reward_columns(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise FormatError(
                f"format {self.name!r} needs the tokenizer's chat template (Llama-3.1); this tokenizer has "
                "none: load the tokenizer that ships with the checkpoint"
            )

    def conversation(self, question: str, steps: Sequence[str]) -> list[dict]:
        turns = []
        for k, step in enumerate(steps):
            turns.append({"role": "user", "content": f"{question} {step}" if k == 0 else step})
            turns.append({"role": "assistant", "content": self.good_token})
        return turns

    def encode(
        self, tokenizer, question: str, steps: Sequence[str], image_tokens: Sequence[str] = ()
    ) -> EncodedCandidate:
        refuse_images(image_tokens, self.name)
        check_steps(steps, self.name)
        good = self.reward_columns(tokenizer).good
        turns = self.conversation(question, steps)

        def tokens(messages):
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            return list(tokenizer.encode(text, add_special_tokens=False))

        ids = tokens(turns)
        positions = []
        for k in range(1, len(steps) + 1):
            prefix = tokens(turns[:2 * k])
            user_end = len(tokens(turns[:2 * k - 1]))  # the assistant turn's tokens come after this
            plus = [i for i, t in enumerate(prefix) if t == good and i >= user_end]
            if ids[:len(prefix)] != prefix or not plus:
                raise FormatError(
                    f"format {self.name!r}: the conversation through step {k} is not a token prefix of the whole "
                    f"conversation ending in the assistant turn {self.good_token!r}; the chat template or a step's "
                    "text breaks the turn layout"
                )
            positions.append(plus[-1] - 1)
        return EncodedCandidate(ids, positions)
