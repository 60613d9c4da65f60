"""token-classification: PRMs trained with TRL's PRMTrainer (and PURE's), 2-label token head.

The release's inference (TRL's PRM docs, the PRMTrainer models' cards):
``text = sep.join((problem, *steps[:k])) + sep`` run through an
``AutoModelForTokenClassification``; the reward of step k is
``softmax(logits[last token])[1]`` (``LABEL_1`` = correct).  The problem is
followed by the separator, then each step by the separator; the separator
is ``step_separator`` from the checkpoint's config when recorded there (the
name of PRMConfig's field), else ``"\\n"`` (PRMConfig's default), or given.

All steps are read from one forward pass over the whole text: the reward of
step k sits at the last token of the prefix ending with step k's separator.
That equals the release's one pass per step only where the text tokenizes
the same with and without what follows; ``encode`` checks it and refuses a
step otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mmprm_infer.formats.base import (
    MODEL_TOKEN_CLASSIFICATION,
    EncodedCandidate,
    FormatError,
    PRMFormat,
    RewardColumns,
    check_steps,
    refuse_images,
    split_on_blank_lines,
)

DEFAULT_SEPARATOR = "\n"  # trl PRMConfig.step_separator


@dataclass
class TokenClassificationFormat(PRMFormat):
    step_separator: str = DEFAULT_SEPARATOR
    split_on: str | None = None  # how a solution string splits into steps; None: blank lines

    name = "token-classification"
    model_kind = MODEL_TOKEN_CLASSIFICATION

    def __post_init__(self) -> None:
        if not self.step_separator:
            raise ValueError("format 'token-classification': step_separator must be a non-empty string")

    @classmethod
    def options_from_config(cls, config: dict) -> dict:
        sep = config.get("step_separator")
        return {"step_separator": sep} if isinstance(sep, str) and sep else {}

    def split_steps(self, solution: str) -> list[str]:
        if self.split_on is None:
            return split_on_blank_lines(solution)
        return [s.strip() for s in solution.split(self.split_on) if s.strip()]

    def reward_columns(self, tokenizer) -> RewardColumns:
        return RewardColumns(good=1, bad=0)  # softmax over the 2 labels, LABEL_1 = correct

    def check_tokenizer(self, tokenizer) -> None:
        if not tokenizer.encode(self.step_separator, add_special_tokens=False):
            raise FormatError(
                f"format {self.name!r}: the tokenizer encodes the step separator {self.step_separator!r} to "
                "nothing; pass the separator the checkpoint was trained with (step_separator=...)"
            )

    def encode(
        self, tokenizer, question: str, steps: Sequence[str], image_tokens: Sequence[str] = ()
    ) -> EncodedCandidate:
        refuse_images(image_tokens, self.name)
        check_steps(steps, self.name)
        sep = self.step_separator
        text = question
        positions: list[int] = []
        prefixes = []
        for step in steps:
            text += sep + step
            prefixes.append(text + sep)
        ids = list(tokenizer.encode(prefixes[-1]))
        for k, prefix in enumerate(prefixes):
            prefix_ids = tokenizer.encode(prefix)
            if ids[:len(prefix_ids)] != list(prefix_ids):
                raise FormatError(
                    f"format {self.name!r}: step {k + 1} and its separator {sep!r} tokenize differently when "
                    "the next step follows (the tokenizer merges across the boundary), so its reward would not "
                    "be the release's; end the step with different text or pass another step_separator"
                )
            positions.append(len(prefix_ids) - 1)
        return EncodedCandidate(ids, positions)
