"""visualprm: VisualPRM-8B (InternVL2.5-8B based), one chat turn per step, P("+").

Reproduces ``InternVLRewardModel.generate_steps_with_soft_score_v2`` of the
VisualPRM release (its remote ``modeling_internvl_chat.py``), with the
release's inference defaults as ``select_best_response`` runs it for
Best-of-N (VLMEvalKit ``vlmeval/vlm/internvl/internvl_chat.py``):

- steps: ``response.split('\\n\\n')``, not stripped first; merged in runs of
  ``ceil(len / max_steps)`` consecutive pieces re-joined with ``'\\n\\n'``
  only when ``max_steps`` is given (``split_response``; the release merges
  only when its caller passes ``max_steps``, as InternVL's data pipeline
  does with 12);
- with an image and no ``<image>`` in the question:
  ``question = '<image>\\n' + question`` (the release asserts one
  placeholder per image);
- template ``internvl2_5`` with the model's system message: its config's
  ``system_message`` when set, else the template's default
  (``InternVLChatModel.__init__``); VisualPRM-8B's config carries the
  training data's ``PRM_SYSTEM_PROMPT``.  Turn k:
  user = ``f'### Question:\\n{question}\\n\\n### Solution Process:\\n{step}'``
  for the first step, the raw step after; assistant = ``'+'`` (the placeholder);
- ``tokenizer(query)``; the reward of step k is read where the k-th
  ``<|im_start|>assistant\\n+<|im_end|>\\n`` token run starts, at its
  header's last token (``find_placeholder_idx``): that position predicts the
  assistant's answer; reward = softmax(logits[pos][[+, -]])[0]
  (``str2score = {'+': 1, '-': 0}``);
- a candidate's score is the mean of its step rewards (``default_aggregate``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mmprm_infer.formats.base import MODEL_INTERNVL, PRMFormat
from mmprm_infer.formats.internvl_base import INTERNVL25_SYSTEM_MESSAGE, InternVLImages, place_images, render_internvl25
from mmprm_infer.formats.step_turns import StepTurnsFormat, step_turns

# InternVL internvl_chat/tools/reasoning_data_pipeline/utils/constants.py
VISUALPRM_SYSTEM_PROMPT = """
You are an advanced AI assistant, designed to serve as a process supervision model. In this task, I will provide a \
problem statement followed by the first step of the solution process. For each subsequent turn, I will give you a new \
step in the solution. Your role is to assess whether the solution process is correct up to the current step.

- In the **first round**, I will input the problem and the first step of the solution process.
- In **each subsequent round**, I will provide the next step in the solution.

For each step, you should:

- Respond with **"+"** if you believe the solution process is correct up to this step.
- Respond with **"-"** if you detect any issues or errors in the process up to this step.

Please note:
- Only respond with **"+"** or **"-"**. Do not provide any additional explanations, comments, or justifications.

Your task is to verify the accuracy and correctness of each step in the given solution process.
""".strip()


def split_response(response: str, sep: str = "\n\n", max_steps: int | None = None) -> list[str]:
    """VisualPRM's step split: on ``sep``, then at most ``max_steps`` evenly merged runs."""
    steps = response.split(sep)
    if max_steps is None:
        return steps
    run = math.ceil(len(steps) / max_steps)
    return [sep.join(steps[i:i + run]) for i in range(0, len(steps), run)]


@dataclass
class VisualPRMFormat(InternVLImages, StepTurnsFormat, PRMFormat):
    # InternVL's default; loading puts the checkpoint config's system_message here when set.
    system_prompt: str = INTERNVL25_SYSTEM_MESSAGE
    max_steps: int | None = None
    max_tiles: int | None = 12  # InternVL's load_image default (max_num=12)

    name = "visualprm"
    model_kind = MODEL_INTERNVL
    supports_images = True
    default_aggregate = "mean"

    @classmethod
    def options_from_config(cls, config: dict) -> dict:
        # A converted checkpoint keeps the published config's system_message as internvl_system_message.
        system = config.get("internvl_system_message") or config.get("system_message")
        return {"system_prompt": system} if system else {}

    def __post_init__(self) -> None:
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if not self.placeholder:
            raise ValueError(
                "placeholder must be a non-empty string (an empty assistant turn renders as a bare header)"
            )

    def split_steps(self, solution: str) -> list[str]:
        # As the release: no strip, so a leading or trailing blank line gives an
        # empty step, which is refused (the release renders it as a bare header).
        return split_response(solution, "\n\n", self.max_steps)

    def check_tokenizer(self, tokenizer) -> None:
        self.reward_columns(tokenizer)
        self.check_image_tokens(tokenizer)

    def build_query(self, question: str, steps: Sequence[str], image_tokens: Sequence[str] = ()) -> str:
        """The release's query string, images already expanded."""
        question = place_images(question, image_tokens, self.name, exact=True)
        return render_internvl25(self.system_prompt, step_turns(question, steps, self.placeholder))
