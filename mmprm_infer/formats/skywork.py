"""skywork: Skywork-o1-Open-PRM-Qwen-2.5 (1.5B, 7B), a value head read at each step's end.

Reproduces ``prepare_input`` and ``derive_step_rewards`` of the release
(SkyworkAI/skywork-o1-prm-inference ``model_utils/io_utils.py``, also in
huggingface/search-and-learn ``sal/models/skywork_o1_prm``):

- ``tokenizer.encode(tokenizer.bos_token + problem + "\\n")``;
- then, for every step of ``response.split("\\n")``, ``tokenizer.encode(step)``
  followed by the step token's id (``tokenizer.encode("\\n")[-1]``): each step
  is encoded on its own, not as part of the whole text;
- the reward of a step is ``sigmoid(v_head(h))`` at its step token (the
  model's ``return_probs=True``).

Blank pieces of the split (a blank line in the response) are dropped here;
the release would give each its own reward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mmprm_infer.formats.base import (
    MODEL_VALUE_HEAD,
    EncodedCandidate,
    FormatError,
    PRMFormat,
    RewardColumns,
    check_steps,
    refuse_images,
)


@dataclass
class SkyworkFormat(PRMFormat):
    step_token: str = "\n"

    name = "skywork"
    model_kind = MODEL_VALUE_HEAD

    def split_steps(self, solution: str) -> list[str]:
        return [s for s in solution.split(self.step_token) if s.strip()]

    def reward_columns(self, tokenizer) -> RewardColumns:
        return RewardColumns(good=0)  # the value head's one output: reward = sigmoid(value)

    def _step_token_id(self, tokenizer) -> int:
        ids = tokenizer.encode(self.step_token)
        if not ids:
            raise FormatError(
                f"format {self.name!r}: the tokenizer encodes the step token {self.step_token!r} to nothing"
            )
        return int(ids[-1])

    def check_tokenizer(self, tokenizer) -> None:
        self._step_token_id(tokenizer)

    def encode(
        self, tokenizer, question: str, steps: Sequence[str], image_tokens: Sequence[str] = ()
    ) -> EncodedCandidate:
        refuse_images(image_tokens, self.name)
        check_steps(steps, self.name)
        step_id = self._step_token_id(tokenizer)
        ids = list(tokenizer.encode((tokenizer.bos_token or "") + question + "\n"))
        positions = []
        for step in steps:
            if self.step_token in step:
                raise FormatError(
                    f"format {self.name!r}: a step contains the step token {self.step_token!r}, which the release "
                    "splits on; split it into separate steps (or pass the solution as one string)"
                )
            ids += list(tokenizer.encode(step)) + [step_id]
            positions.append(len(ids) - 1)
        return EncodedCandidate(ids, positions)
