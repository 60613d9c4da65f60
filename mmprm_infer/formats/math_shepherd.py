"""math-shepherd: `{question} Step 1: ... ки\nStep 2: ... ки`, reward at each ки."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mmprm_infer.formats.base import (
    EncodedCandidate,
    FormatError,
    PRMFormat,
    RewardColumns,
    check_marker_count,
    check_steps,
    positions_of,
    refuse_images,
    split_on_blank_lines,
)

_STEP_PREFIX = re.compile(r"^\s*Step\s*\d+\s*[:.]\s*", re.IGNORECASE)
_STEP_HEADER = re.compile(r"(?m)^\s*Step\s*\d+\s*[:.]")


@dataclass
class MathShepherdFormat(PRMFormat):
    step_tag: str = "ки"
    good_token: str = "+"
    bad_token: str = "-"

    name = "math-shepherd"

    def split_steps(self, solution: str) -> list[str]:
        # Released outputs end every step with the tag; plain model output uses
        # "Step k:" headers or blank lines.
        if self.step_tag in solution:
            pieces = solution.split(self.step_tag)
        elif len(_STEP_HEADER.findall(solution)) > 1:
            starts = [m.start() for m in _STEP_HEADER.finditer(solution)] + [len(solution)]
            pieces = [solution[a:b] for a, b in zip(starts, starts[1:])]
        else:
            pieces = split_on_blank_lines(solution)
        steps = [_STEP_PREFIX.sub("", p).strip() for p in pieces]
        return [s for s in steps if s]

    def _tag_id(self, tokenizer) -> int:
        # The release reads tokenizer.encode(step_tag)[-1].
        ids = tokenizer.encode(self.step_tag, add_special_tokens=False)
        if not ids:
            raise FormatError(
                f"format 'math-shepherd': the tokenizer encodes the step tag {self.step_tag!r} to nothing"
            )
        return int(ids[-1])

    def reward_columns(self, tokenizer) -> RewardColumns:
        # The release reads tokenizer.encode("+ -")[1:] (dropping BOS).
        ids = tokenizer.encode(f"{self.good_token} {self.bad_token}", add_special_tokens=False)
        if len(ids) != 2:
            raise FormatError(
                f"format 'math-shepherd': the reward tokens {self.good_token!r}/{self.bad_token!r} must "
                f"encode to exactly two tokens, got {ids}; this tokenizer does not carry them"
            )
        return RewardColumns(good=int(ids[0]), bad=int(ids[1]))

    def check_tokenizer(self, tokenizer) -> None:
        self.reward_columns(tokenizer)
        tag_id = self._tag_id(tokenizer)
        if positions_of(tokenizer.encode(f"x {self.step_tag}", add_special_tokens=False), tag_id) == []:
            raise FormatError(f"format 'math-shepherd': step tag {self.step_tag!r} is not a stable token")

    def encode(
        self, tokenizer, question: str, steps: Sequence[str], image_tokens: Sequence[str] = ()
    ) -> EncodedCandidate:
        refuse_images(image_tokens, self.name)
        check_steps(steps, self.name)
        solution = "\n".join(f"Step {i}: {step} {self.step_tag}" for i, step in enumerate(steps, 1))
        ids = tokenizer.encode(f"{question} {solution}")
        positions = positions_of(ids, self._tag_id(tokenizer))
        check_marker_count(positions, steps, self.step_tag, self.name)
        return EncodedCandidate(list(ids), positions)
