"""mm-prm: MM-PRM (InternVL2.5-8B based), reward at each ``<prm>``, tokens Yes/No.

Reproduces ``InternVLChatModel.batch_prm`` / ``prm`` of the MM-PRM release
(``internvl/model/internvl_chat/modeling_internvl_chat.py``) as its
evaluation scripts call it (``eval/prm/evaluate_*_prm.py``):

- ``solution = '<prm>'.join(steps) + '<prm>'``;
  ``text = f'Question: {question}\\nProcess: {solution}'``;
- with an image and no ``<image>`` in that text: ``'<image>\\n' + text``;
- template ``internvl2_5`` with its default system message (``batch_prm``
  never sets ``system_message``), an EMPTY user turn and the text as the
  assistant turn.  The empty user message renders as the bare header
  ``<|im_start|>user\\n`` with no ``<|im_end|>`` (InternVL's MPT
  ``get_prompt`` skips falsy messages) -- the release's evaluation layout.
  Its training preprocessing (``preprocess_internvl2_5``) closes the turn
  (``<|im_start|>user\\n<|im_end|>\\n``); ``close_user_turn=True`` gives that;
- ``tokenizer(query)``; reward = ``softmax(logits[<prm> positions][[Yes, No]])[0]``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mmprm_infer.formats.base import (
    MODEL_INTERNVL,
    EncodedCandidate,
    PRMFormat,
    RewardColumns,
    check_marker_count,
    check_steps,
    positions_of,
    reward_token_columns,
    single_token_id,
    split_on_blank_lines,
)
from mmprm_infer.formats.internvl_base import (
    IM_END,
    IM_START,
    INTERNVL25_SYSTEM_MESSAGE,
    InternVLImages,
    place_images,
    render_internvl25,
)

# MM-PRM's policy writes <step>...</step> / <answer>...</answer>
# (data_pipeline/llm_utils.py parses them with this pattern and strips each).
_TAGGED_STEP = re.compile(r"<step>(.*?)</step>|<answer>(.*?)</answer>", re.DOTALL)


@dataclass
class MMPRMFormat(InternVLImages, PRMFormat):
    step_tag: str = "<prm>"
    good_token: str = "Yes"
    bad_token: str = "No"
    system_prompt: str = INTERNVL25_SYSTEM_MESSAGE
    close_user_turn: bool = False
    max_tiles: int | None = 6  # MM-PRM's evaluation scripts: --max-num 6

    name = "mm-prm"
    model_kind = MODEL_INTERNVL
    supports_images = True

    def split_steps(self, solution: str) -> list[str]:
        tagged = _TAGGED_STEP.findall(solution)
        if tagged:
            return [s for s in ((a or b).strip() for a, b in tagged) if s]
        return split_on_blank_lines(solution)

    def reward_columns(self, tokenizer) -> RewardColumns:
        return reward_token_columns(tokenizer, self.good_token, self.bad_token, self.name)

    def check_tokenizer(self, tokenizer) -> None:
        self.reward_columns(tokenizer)
        single_token_id(tokenizer, self.step_tag, "step tag", self.name)
        self.check_image_tokens(tokenizer)

    def build_query(self, question: str, steps: Sequence[str], image_tokens: Sequence[str] = ()) -> str:
        """The release's query string, images already expanded."""
        solution = self.step_tag.join(steps) + self.step_tag
        text = place_images(f"Question: {question}\nProcess: {solution}", image_tokens, self.name)
        if self.close_user_turn:
            # preprocess_internvl2_5 (training): f'<|im_start|>user\n{""}<|im_end|>\n'
            return (render_internvl25(self.system_prompt, []) + f"{IM_START}user\n{IM_END}\n"
                    + f"{IM_START}assistant\n{text}{IM_END}\n")
        return render_internvl25(self.system_prompt, [("user", ""), ("assistant", text)])

    def encode(
        self, tokenizer, question: str, steps: Sequence[str], image_tokens: Sequence[str] = ()
    ) -> EncodedCandidate:
        check_steps(steps, self.name)
        ids = tokenizer.encode(self.build_query(question, steps, image_tokens))
        positions = positions_of(ids, single_token_id(tokenizer, self.step_tag, "step tag", self.name))
        check_marker_count(positions, steps, self.step_tag, self.name)
        return EncodedCandidate(list(ids), positions)
