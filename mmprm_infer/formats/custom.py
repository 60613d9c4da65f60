"""custom: any causal LM with a user-given step tag and good/bad token pair.

With ``model_kind="internvl"`` the same format runs on an InternVL model and
takes images (placed where ``prompt_template`` says ``{images}``), so other
vision-language PRMs with a tag/token pair use the library unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mmprm_infer.formats.base import (
    MODEL_CAUSAL_LM,
    MODEL_INTERNVL,
    EncodedCandidate,
    FormatError,
    PRMFormat,
    RewardColumns,
    check_marker_count,
    check_steps,
    positions_of,
    reward_token_columns,
    single_token_id,
    split_on_blank_lines,
)
from mmprm_infer.formats.internvl_base import InternVLImages


@dataclass
class CustomFormat(InternVLImages, PRMFormat):
    """Text = prompt_template + step_separator.join(step + step_tag).

    ``prompt_template`` may use ``{question}`` and ``{images}`` (the image
    placeholders, for vision-language PRMs).  Reward tokens may be given as
    strings (each must be one token) or as ids.  ``model_kind="internvl"``
    loads and runs the checkpoint as an InternVL model and accepts images
    (``max_tiles`` per image, default 6).
    """

    step_tag: str = "<step>"
    good_token: str | int = "+"
    bad_token: str | int = "-"
    prompt_template: str = "{images}{question}\n"
    step_separator: str = "\n"
    add_special_tokens: bool = True
    split_on: str | None = None  # None: blank lines
    model_kind: str = MODEL_CAUSAL_LM
    max_tiles: int | None = None

    name = "custom"

    def __post_init__(self) -> None:
        if self.model_kind not in (MODEL_CAUSAL_LM, MODEL_INTERNVL):
            raise ValueError(
                f"format 'custom': model_kind must be {MODEL_CAUSAL_LM!r} or {MODEL_INTERNVL!r}, "
                f"got {self.model_kind!r}"
            )

    @property
    # the base's class attribute, computed here (read only)
    def supports_images(self) -> bool:  # type: ignore[override]
        return self.model_kind == MODEL_INTERNVL

    def split_steps(self, solution: str) -> list[str]:
        if self.split_on is None:
            return split_on_blank_lines(solution)
        return [s.strip() for s in solution.split(self.split_on) if s.strip()]

    def reward_columns(self, tokenizer) -> RewardColumns:
        return reward_token_columns(tokenizer, self.good_token, self.bad_token, self.name)

    def check_tokenizer(self, tokenizer) -> None:
        self.reward_columns(tokenizer)
        single_token_id(tokenizer, self.step_tag, "step tag", self.name)
        if self.model_kind == MODEL_INTERNVL:
            self.check_image_tokens(tokenizer)

    def encode(
        self, tokenizer, question: str, steps: Sequence[str], image_tokens: Sequence[str] = ()
    ) -> EncodedCandidate:
        if image_tokens and "{images}" not in self.prompt_template:
            raise FormatError("format 'custom': got an image but prompt_template has no {images} placeholder")
        check_steps(steps, self.name)
        prompt = self.prompt_template.format(question=question, images="".join(image_tokens))
        text = prompt + self.step_separator.join(step + self.step_tag for step in steps)
        ids = tokenizer.encode(text, add_special_tokens=self.add_special_tokens)
        positions = positions_of(ids, single_token_id(tokenizer, self.step_tag, "step tag", self.name))
        check_marker_count(positions, steps, self.step_tag, self.name)
        return EncodedCandidate(list(ids), positions)
