"""vl-prm: Qwen2.5-VL PRMs in VisualPRM's turn layout (VL-PRM: ob11/Qwen-VL-PRM-3B / -7B).

Reproduces ``VisualPRM.get_reward`` / ``inference_single`` of the VL-PRM
release (theogbrand/vlprm, ``eval/tts_eval/reward_guided_search/VisualPRMv2.py``,
the usage its model cards point to):

- messages: system = ``PRM_SYSTEM_PROMPT_NORMAL_TOK_V2``; turn 1 (user) =
  the images, then ``f'### Question:\\n{question}\\n\\n### Solution Process:\\n{step1}'``;
  each later user turn is the raw text of the next step; each assistant
  turn before the step being scored is ``'+'``;
- rendered with Qwen2.5-VL's chat template (an image is
  ``<|vision_start|><|image_pad|><|vision_end|>`` put before the text, no
  separator, ``<|image_pad|>`` then repeated once per merged 2 x 2 patch by
  the processor), generation prompt ``<|im_start|>assistant\\n``;
- images through Qwen2.5-VL's own preprocessing (dynamic resolution:
  ``smart_resize`` to multiples of 28 px within ``min_pixels`` ..
  ``max_pixels``, 256 * 28 * 28 .. 1280 * 28 * 28 as the release's
  ``AutoProcessor.from_pretrained`` call sets them);
- reward of step k = softmax(logits[-1][[+, -]])[0] of the conversation
  ending with step k's generation prompt.  The release runs one forward per
  step; the model is causal, so this is the same logit as the one at the end
  of each ``<|im_start|>assistant\\n`` header in the whole conversation,
  which is what is encoded here (all steps in one sequence).

Not reproduced: ``qwen_vl_utils.process_vision_info`` may pre-resize an
image to the pixel bounds its message carries (the release's eval harness
passes its own); resize images first, or set ``min_pixels``/``max_pixels``,
to follow a given harness.  A candidate's score is the mean of its step
rewards (VisualPRM's default; the release's search uses step scores only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mmprm_infer.formats.base import MODEL_QWEN2_5_VL, FormatError, PRMFormat, single_token_id
from mmprm_infer.formats.internvl_base import IM_END, IM_START, IMAGE_PLACEHOLDER, fill_placeholders, open_images
from mmprm_infer.formats.step_turns import StepTurnsFormat, step_turns
from mmprm_infer.vision import ImageLoadError

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"

# VisualPRMv2.py's system prompt: prompts.py PRM_SYSTEM_PROMPT_NORMAL_TOK_V2 (its last definition).
VL_PRM_SYSTEM_PROMPT = """**You are a process supervision model for visual reasoning tasks. You will receive an image \
and an image-based problem statement, followed by solution steps to evaluate.**

First round: problem statement and first solution step.  
Subsequent rounds: one new step per round.

Assess the cumulative correctness of the entire solution up to each step.

## Evaluation Criteria:

1. **Visual Accuracy**: Are visual elements from the image correctly identified (shapes, colors, positions, \
quantities, spatial relationships)?

2. **Logical Validity**: Do all inferences and calculations follow correctly from the image and previous steps?

## Response:
- **"+"** if correct up to this step
- **"-"** if any error exists up to this step

Only respond with "+" or "-". No explanations.

An error in any step invalidates all subsequent steps."""

QWEN_VL_ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"


def render_chatml(system: str, turns: Sequence[tuple[str, str]]) -> str:
    """Qwen's chat template for (role, text) turns: ``<|im_start|>{role}\\n{text}<|im_end|>\\n`` each."""
    return "".join(f"{IM_START}{role}\n{text}{IM_END}\n" for role, text in [("system", system), *turns])


@dataclass
class VLPRMFormat(StepTurnsFormat, PRMFormat):
    system_prompt: str = VL_PRM_SYSTEM_PROMPT
    min_pixels: int = 256 * 28 * 28
    max_pixels: int = 1280 * 28 * 28

    name = "vl-prm"
    model_kind = MODEL_QWEN2_5_VL
    supports_images = True
    default_aggregate = "mean"
    add_special_tokens = False  # the chat template's text, tokenized as it is

    def __post_init__(self) -> None:
        if not self.placeholder:
            raise ValueError("placeholder must be a non-empty string (the assistant's answer to each step)")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels} and {self.max_pixels}")

    def split_steps(self, solution: str) -> list[str]:
        # The release scores the steps its search produced, split on "\n\n" (VisualPRM's rule, no strip).
        return solution.split("\n\n")

    def check_tokenizer(self, tokenizer) -> None:
        self.reward_columns(tokenizer)
        for token in (VISION_START, VISION_END, IMAGE_PAD):
            single_token_id(tokenizer, token, "image token", self.name)

    # --- text ------------------------------------------------------------
    def build_query(self, question: str, steps: Sequence[str], image_tokens: Sequence[str] = ()) -> str:
        """The release's conversation text with every assistant turn answered, images expanded."""
        if IMAGE_PLACEHOLDER in question:  # interleaved: one "<image>" per image, in order
            question = fill_placeholders(
                question, image_tokens, self.name, exact=True,
                hint="put one per image where it belongs, or none to have the images placed before the text as "
                "the release does",
            )
            images = ""
        else:
            images = "".join(image_tokens)
        return render_chatml(self.system_prompt, step_turns(question, steps, self.placeholder, images))

    def check_encoded(self, tokenizer, input_ids: list[int], image_tokens: Sequence[str]) -> None:
        pad = single_token_id(tokenizer, IMAGE_PAD, "image token", self.name)
        expected = sum(block.count(IMAGE_PAD) for block in image_tokens)
        if input_ids.count(pad) != expected:
            raise FormatError(
                f"format {self.name!r}: the question or a step contains {IMAGE_PAD!r} itself; remove it "
                "(images are passed with image=..., not as text)"
            )

    # --- images ------------------------------------------------------------
    def image_processor(self, adapter):
        """transformers' Qwen2-VL image processor (the PIL one: no torchvision), set up for this model."""
        # transformers: heavy, loaded where used
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        vision = adapter.model.config.vision_config
        return Qwen2VLImageProcessorPil(
            patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
        )

    def prepare_images(self, adapter, image) -> tuple[list[str], object]:
        """Image(s) -> (one placeholder block per image, features + grid), the vision tower run once."""
        # transformers: heavy, loaded where used
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        opened = open_images(adapter, image, MODEL_QWEN2_5_VL, "a Qwen2.5-VL", self.name)
        if not opened:
            return [], None
        processor = self.image_processor(adapter)
        factor = processor.patch_size * processor.merge_size
        tokens = []
        for i, im in enumerate(opened):
            if im.width == 0 or im.height == 0:
                raise ImageLoadError(f"image {i + 1} of {len(opened)} has zero size ({im.width}x{im.height}); "
                                     "pass a non-empty image")
            try:
                h, w = smart_resize(im.height, im.width, factor, self.min_pixels, self.max_pixels)
            except ValueError as exc:
                raise ImageLoadError(f"image {i + 1} of {len(opened)} ({im.width}x{im.height}): {exc}; crop or pad "
                                     "it first") from None
            tokens.append((h // factor) * (w // factor))
        limit = adapter.max_positions
        if limit is not None and sum(tokens) + 2 * len(tokens) >= limit:
            raise FormatError(
                f"{len(opened)} image(s) take {sum(tokens) + 2 * len(tokens)} tokens (at most {self.max_pixels} "
                f"pixels each, one token per {factor}x{factor} cell, + 2 per image), which leaves no room in the "
                f"model's context of {limit} tokens; pass fewer images or a smaller max_pixels"
            )
        batch = processor(images=opened, return_tensors="pt")
        grid = batch["image_grid_thw"]
        features = adapter.image_features(batch["pixel_values"], grid)
        merge = processor.merge_size ** 2
        counts = (grid.prod(-1) // merge).tolist()
        if counts != tokens or features.shape[0] != sum(counts):
            raise ValueError(
                f"the vision tower gave {features.shape[0]} feature rows for image grid(s) {grid.tolist()}, "
                f"expected {sum(tokens)}; the checkpoint's vision config does not match its image processing"
            )
        return [VISION_START + IMAGE_PAD * n + VISION_END for n in counts], features


def detect_vl_prm_format(config: dict, tokenizer) -> str | None:
    """A Qwen2.5-VL checkpoint is a VL-PRM where its name says so (``ob11/Qwen-VL-PRM-7B``); a
    plain Qwen2.5-VL says nothing about being a PRM, so the user names the format then."""
    archs = config.get("architectures") or []
    if QWEN_VL_ARCHITECTURE not in archs and config.get("model_type") != "qwen2_5_vl":
        return None
    name = str(config.get("_name_or_path", "")).lower().replace("_", "-")
    if "vl-prm" in name or "vlprm" in name:
        return "vl-prm"
    return None


__all__ = ["VLPRMFormat", "VL_PRM_SYSTEM_PROMPT", "detect_vl_prm_format", "render_chatml"]
