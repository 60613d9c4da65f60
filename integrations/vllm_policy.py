"""``VLLMPolicy``: the ``Policy`` protocol over an in-process ``vllm.LLM``.

All prompts x n samples of a call go to vLLM in one ``generate`` call (one
``SamplingParams`` per prompt, ``n`` samples each), so vLLM batches them and
shares their prompt prefix in its prefix cache.

Prompts are rendered with the tokenizer's chat template as
``TransformersPolicy`` does: optional system prompt, the question as the user
turn and, when continuing, the partial steps (joined by ``"\\n\\n"``, plus
the separator) as the start of the assistant turn
(``continue_final_message``).  Without a chat template the prompt is the plain
text ``question + "\\n\\n" + partial steps + "\\n\\n"``.  Prompts with images
go through ``LLM.chat`` with the images as ``image_url`` data URLs (the model
must be a vision-language model vLLM serves).

``stop_at_step=True`` makes ``generate`` return one step per sample (vLLM
stops at the separator); ``generate_steps`` (used by the step-level search)
always does, and says whether each sample ended the solution.

Seeds: ``seed=S`` in the sampling options, or ``VLLMPolicy(seed=S)`` (then
call k uses S + k); each prompt of a call gets its own derived seed, so equal
prompts still draw different samples.
"""

from __future__ import annotations

import threading
from typing import Any

from mmprm_infer.integrations.policy import _check_prompts, _image_url, _messages
from mmprm_infer.integrations.search import SampledSteps
from mmprm_infer.policy import (
    DEFAULT_SAMPLING,
    DEFAULT_SYSTEM_PROMPT,
    STEP_SEPARATOR,
    PolicyPrompt,
    join_steps,
    sampling_options,
)

__all__ = ["VLLMPolicy", "vllm_available"]


def vllm_available() -> bool:
    try:
        # vllm: optional (the vllm extra)
        import vllm  # noqa: F401 - probe only
    except Exception:  # noqa: BLE001 - not installed, or installed without a usable torch
        return False
    return True


def _derive_seed(base: int | None, index: int) -> int | None:
    if base is None:
        return None
    return (int(base) * 1_000_003 + index) % (2 ** 31 - 1)


class VLLMPolicy:
    """Rollouts from a ``vllm.LLM`` (or a model path: ``VLLMPolicy.from_model(path, **llm_kwargs)``)."""

    def __init__(self, llm, *, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, use_chat_template: bool | None = None,
                 stop_at_step: bool = False, separator: str = STEP_SEPARATOR, seed: int | None = None,
                 **sampling: Any):
        self.llm = llm
        self.system_prompt = system_prompt
        self.stop_at_step = stop_at_step
        self.separator = separator
        self.seed = seed
        self.sampling = sampling_options(DEFAULT_SAMPLING, sampling)
        self._tokenizer = llm.get_tokenizer()
        has_template = getattr(self._tokenizer, "chat_template", None) is not None
        if use_chat_template and not has_template:
            raise ValueError("use_chat_template=True but the model's tokenizer has no chat template; set one on "
                             "llm.get_tokenizer().chat_template or pass use_chat_template=False")
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        self._calls = 0
        self._lock = threading.Lock()

    @classmethod
    def from_model(cls, model: str, *, llm_kwargs: dict | None = None, **kwargs) -> VLLMPolicy:
        from vllm import LLM  # vllm: optional (the vllm extra)

        return cls(LLM(model=str(model), **(llm_kwargs or {})), **kwargs)

    # --- prompts -------------------------------------------------------------
    def build_prompt(self, prompt: PolicyPrompt) -> str:
        """The text prompt of a prompt without images."""
        if not self.use_chat_template:
            text = prompt.question.rstrip() + self.separator
            if prompt.partial_steps:
                text += join_steps(prompt.partial_steps) + self.separator
            return text
        msgs = _messages(prompt, self.system_prompt, prompt.question)
        if prompt.partial_steps:
            return self._tokenizer.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
        return self._tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def chat_messages(self, prompt: PolicyPrompt) -> list[dict]:
        """OpenAI-style messages of a prompt with images (for ``LLM.chat``)."""
        content = [{"type": "image_url", "image_url": {"url": _image_url(im)}} for im in prompt.images]
        content.append({"type": "text", "text": prompt.question})
        return _messages(prompt, self.system_prompt, content)

    # --- sampling ------------------------------------------------------------
    def _sampling_params(self, opts: dict[str, Any], n: int, seed: int | None, stop: bool):
        from vllm import SamplingParams  # vllm: optional (the vllm extra)

        top_k = opts.get("top_k")
        return SamplingParams(
            n=n,
            temperature=float(opts["temperature"]),
            top_p=float(opts["top_p"]),
            top_k=int(top_k) if top_k else 0,
            max_tokens=int(opts["max_new_tokens"]),
            seed=seed,
            stop=[self.separator] if stop else None,
        )

    def _run(self, prompts: list[PolicyPrompt], n: int, stop: bool, sampling: dict[str, Any]):
        """RequestOutputs, one per prompt, in order."""
        prompts = _check_prompts(prompts, n)
        opts = sampling_options(self.sampling, sampling)
        with self._lock:
            call = self._calls
            self._calls += 1
        base = opts.pop("seed", None)
        if base is None and self.seed is not None:
            base = self.seed + call
        params = [self._sampling_params(opts, n, _derive_seed(base, i), stop) for i in range(len(prompts))]
        outputs: list = [None] * len(prompts)
        text_idx = [i for i, p in enumerate(prompts) if not p.images]
        if text_idx:
            got = self.llm.generate([self.build_prompt(prompts[i]) for i in text_idx], [params[i] for i in text_idx],
                                    use_tqdm=False)
            for i, out in zip(text_idx, got):
                outputs[i] = out
        for partial in (False, True):  # LLM.chat takes one continue_final_message flag per call
            idx = [i for i, p in enumerate(prompts) if p.images and bool(p.partial_steps) == partial]
            if not idx:
                continue
            got = self.llm.chat([self.chat_messages(prompts[i]) for i in idx], [params[i] for i in idx],
                                use_tqdm=False, add_generation_prompt=not partial, continue_final_message=partial)
            for i, out in zip(idx, got):
                outputs[i] = out
        return outputs

    def generate(self, prompts: list[PolicyPrompt], n: int = 1, **sampling: Any) -> list[list[str]]:
        """n continuations per prompt (one step each when ``stop_at_step``)."""
        outputs = self._run(prompts, n, self.stop_at_step, sampling)
        return [[c.text.strip() for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]

    def generate_steps(self, prompts: list[PolicyPrompt], n: int = 1, *, to_end: bool = False,
                       **sampling: Any) -> list[list[SampledSteps]]:
        """n next steps per prompt; a sample is finished unless vLLM stopped at the separator."""
        outputs = self._run(prompts, n, not to_end, sampling)
        rows = []
        for out in outputs:
            row = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                at_separator = c.finish_reason == "stop" and c.stop_reason == self.separator
                text = c.text.strip()
                if to_end:
                    steps = [s.strip() for s in text.split(self.separator) if s.strip()]
                else:
                    steps = [text] if text else []
                row.append(SampledSteps(steps, finished=to_end or not at_separator or not steps))
            rows.append(row)
        return rows
