"""What a PRM format is: how steps become token ids, and where rewards are read.

A format turns (question, steps, image token counts) into one token sequence
plus the positions whose output carries each step's reward ("which rows"),
and names the output columns the reward is read from:

    p_good = softmax(out[pos, [good, bad]])[0] = sigmoid(out[pos, good] - out[pos, bad])
    p_good = sigmoid(out[pos, good])          (a value head: one column, bad is None)

For LM-head formats the columns are vocabulary ids; for a 2-label score head
(qwen2.5-math-prm, token-classification) they are label indices.  The
adapter's reward head (``mmprm_infer.models.heads``) reads them ("which
head"); engines and aggregation only see this contract.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

# How the checkpoint is run: which model class carries the PRM.
MODEL_CAUSAL_LM = "causal_lm"  # any AutoModelForCausalLM; reward from LM-head rows
MODEL_QWEN2_PRM = "qwen2_prm"  # Qwen2 body + 2-label score head
MODEL_INTERNVL = "internvl"  # InternVLForConditionalGeneration (vision + LM head)
MODEL_TOKEN_CLASSIFICATION = "token_classification"  # AutoModelForTokenClassification, 2 labels
MODEL_VALUE_HEAD = "value_head"  # Qwen2 body + Linear(hidden, 1) value head (Skywork's Qwen2ForPrmModel)
MODEL_QWEN2_5_VL = "qwen2_5_vl"  # Qwen2_5_VLForConditionalGeneration (vision + M-RoPE text model + LM head)


@dataclass
class EncodedCandidate:
    """One candidate in model input form."""

    input_ids: list[int]
    reward_positions: list[int]  # one per step, strictly increasing
    num_steps: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_steps = len(self.reward_positions)


@dataclass(frozen=True)
class RewardColumns:
    """reward = softmax(out[pos, [good, bad]])[0] = sigmoid(out[good] - out[bad]); with ``bad`` None (a
    value head's one output column) reward = sigmoid(out[good])."""

    good: int
    bad: int | None = None


class FormatError(ValueError):
    """Input that a format cannot encode; the message says which and why."""


class PRMFormat(ABC):
    """One PRM family's input layout and reward readout."""

    name: str = ""
    model_kind: str = MODEL_CAUSAL_LM
    supports_images: bool = False
    # How the release turns step rewards into one candidate score (an aggregation name).
    default_aggregate: str = "min"

    @abstractmethod
    def split_steps(self, solution: str) -> list[str]:
        """Split a free-text solution into steps the way this family does."""

    @abstractmethod
    def encode(
        self, tokenizer, question: str, steps: Sequence[str], image_tokens: Sequence[str] = ()
    ) -> EncodedCandidate:
        """Token ids and reward positions for one candidate.

        ``image_tokens`` holds, per image, the placeholder text the model's
        vision path expects (``<img><IMG_CONTEXT>...</img>`` for InternVL).
        """

    @abstractmethod
    def reward_columns(self, tokenizer) -> RewardColumns:
        """Which output columns carry the good/bad evidence (one column for a value head)."""

    def check_tokenizer(self, tokenizer) -> None:
        """Raise FormatError naming any token this format needs but the tokenizer lacks."""
        self.reward_columns(tokenizer)

    @classmethod
    def options_from_config(cls, config: dict) -> dict:
        """Format options a checkpoint's config.json records (e.g. a separator); a user's options win."""
        return {}

    def describe(self) -> str:
        return self.name


def split_on_blank_lines(solution: str) -> list[str]:
    """Steps separated by blank lines ("\\n\\n"), as most PRM releases split."""
    return [part.strip() for part in re.split(r"\n\s*\n", solution) if part.strip()]


def single_token_id(tokenizer, text: str, role: str, fmt: str) -> int:
    """The id of a token that must be one vocabulary entry (a tag or reward token)."""
    token_id = tokenizer.convert_tokens_to_ids(text)
    unk = getattr(tokenizer, "unk_token_id", None)
    if token_id is None or (unk is not None and token_id == unk and text != tokenizer.unk_token):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise FormatError(
                f"format {fmt!r} needs {role} {text!r} as a single token, but this tokenizer "
                f"splits it into {len(ids)} tokens {ids}; add it with "
                f"tokenizer.add_tokens([{text!r}]) (and resize the model's embeddings) or pick "
                "the format that matches this checkpoint"
            )
        token_id = ids[0]
    return int(token_id)


def reward_token_columns(tokenizer, good: str | int, bad: str | int, fmt: str) -> RewardColumns:
    """Columns of a good/bad token pair, each given as a single-token string or an id."""

    def column(token: str | int, role: str) -> int:
        return int(token) if isinstance(token, int) else single_token_id(tokenizer, token, role, fmt)

    return RewardColumns(good=column(good, "good token"), bad=column(bad, "bad token"))


def positions_of(input_ids: Sequence[int], token_id: int) -> list[int]:
    return [i for i, t in enumerate(input_ids) if t == token_id]


def check_marker_count(positions: list[int], steps: Sequence[str], tag: str, fmt: str) -> None:
    """Every step must give exactly one marker, or rewards would shift between steps."""
    check_reward_count(positions, steps, fmt, f"step marker(s) {tag!r}",
                       f"a step's text (or the question) probably contains {tag!r} itself: remove it from the "
                       "text before scoring")


def check_reward_count(positions: Sequence[int], steps: Sequence[str], fmt: str, what: str, cause: str) -> None:
    """One reward position per step, or a FormatError: expected N ``what`` but found M; ``cause``."""
    if len(positions) != len(steps):
        raise FormatError(
            f"format {fmt!r}: expected {len(steps)} {what} but the encoded input has {len(positions)}; {cause}"
        )


def refuse_images(image_tokens: Sequence[str], fmt: str) -> None:
    """Text-only formats: an image is an error, never silently dropped."""
    if image_tokens:
        raise FormatError(f"format {fmt!r} is text-only and cannot take an image; pass image=None")


def check_steps(steps: Sequence[str], fmt: str) -> None:
    if len(steps) == 0:
        raise FormatError(f"format {fmt!r}: a candidate has no steps; give at least one non-empty step")
