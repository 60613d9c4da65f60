"""``RerankingLLM``: Best-of-N with a PRM over any vLLM policy, vLLM-shaped in and out.

    from vllm import LLM, SamplingParams
    from mmprm_infer import PRM
    from mmprm_infer.integrations.vllm_reranking import RerankingLLM

    llm = RerankingLLM(LLM("policy-dir"), PRM.from_pretrained("prm-dir"), n=8, aggregate="min")
    outs = llm.generate(["Question: ..."], SamplingParams(temperature=0.8, max_tokens=512))
    outs[0].outputs[0].text          # the best of the 8 samples
    outs[0].outputs[0].score         # its aggregated PRM score
    outs[0].outputs[0].step_rewards  # its per-step rewards
    outs[0].rerank                   # the RerankResult (indices = the samples' CompletionOutput.index)

``engine="vllm"`` scores the samples with the PRM in vLLM too (a second ``LLM``, in pooling mode, reusing each
prompt's question through the prefix cache: docs/vllm_plugin.md), so policy and PRM both run on vLLM.

``generate`` samples ``n`` candidates per prompt in ONE ``vllm.LLM.generate``
call (a copy of the caller's ``SamplingParams`` with ``n`` set), scores all
prompts' candidates in one PRM engine call, and returns vLLM's own
``RequestOutput`` objects with ``outputs`` reordered best first.  Each
``CompletionOutput`` gets ``score`` (``-inf`` when the PRM could not read
it), ``step_rewards``, ``rank`` and ``prm_error``; each ``RequestOutput``
gets ``rerank`` (a ``RerankResult``), ``prm_errors`` and ``question``.

The PRM's question is the prompt text, or the ``questions`` argument, or a
``"question"`` key in a dict prompt (removed before the prompt goes to
vLLM).  Images: a dict prompt's ``multi_modal_data["image"]`` (a PIL image or
a list of them) is what the PRM sees too.  ``return_n`` (or a caller's
``SamplingParams.n`` > 1) keeps only that many outputs.

``chat(messages, ...)`` is the same beside vLLM's ``LLM.chat``: a conversation (a list of
OpenAI-style message dicts) or a list of them goes through vLLM's chat template in ONE
``LLM.chat`` call (``chat_template``, ``add_generation_prompt``, ``chat_template_kwargs``
passed on); the PRM's question is the last user message's text (its text parts joined),
or ``questions``; the images of the user messages (``image_url`` parts with ``data:`` URLs
or local ``file://`` paths, ``image_pil`` parts) are the PRM's images too::

    outs = llm.chat([{"role": "user", "content": "What is 2 + 3?"}], SamplingParams(max_tokens=512))
    outs = llm.chat([[{"role": "user", "content": [{"type": "image_pil", "image_pil": img},
                                                    {"type": "text", "text": "What is the area?"}]}]])
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable, Sequence
from typing import Any

from mmprm_infer.engines import Engine
from mmprm_infer.prm import PRM, ScoringItem
from mmprm_infer.rerank import NEEDS_NO_PRM, RerankResult, rerank_batch
from mmprm_infer.selection import get_strategy

__all__ = ["RerankingLLM"]


class RerankingLLM:
    def __init__(self, policy, prm: PRM | str | os.PathLike | None, n: int = 8, aggregate: str | Callable = "min",
                 strategy: str = "best_of_n", *, engine: str | Engine | None = None,
                 llm_kwargs: dict[str, Any] | None = None, prm_kwargs: dict[str, Any] | None = None):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer (candidates sampled per prompt), got {n!r}")
        get_strategy(strategy)
        if isinstance(policy, (str, os.PathLike)):
            from vllm import LLM  # vllm: optional (the vllm extra)

            policy = LLM(model=os.fspath(policy), **(llm_kwargs or {}))
        if isinstance(prm, (str, os.PathLike)):
            prm = PRM.from_pretrained(prm, **(prm_kwargs or {}))
        if prm is None and strategy not in NEEDS_NO_PRM:
            raise ValueError(f"strategy {strategy!r} needs a PRM; pass prm=PRM.from_pretrained(...) or a path")
        self.llm = policy
        self.prm = prm
        self.n = n
        self.aggregate = aggregate
        self.strategy = strategy
        self.engine = engine

    def get_tokenizer(self):
        return self.llm.get_tokenizer()

    # --- inputs --------------------------------------------------------------
    def _split_prompt(self, prompt) -> tuple[Any, str | None, Any]:
        """(prompt for vLLM, question text, image for the PRM)."""
        if isinstance(prompt, str):
            return prompt, prompt, None
        if not isinstance(prompt, dict):
            raise TypeError(f"a prompt must be a string or a vLLM prompt dict, got {type(prompt).__name__}")
        prompt = dict(prompt)
        question = prompt.pop("question", None)
        if question is None:
            if "prompt" in prompt:
                question = prompt["prompt"]
            elif "prompt_token_ids" in prompt:
                question = self.get_tokenizer().decode(prompt["prompt_token_ids"], skip_special_tokens=True)
        image = (prompt.get("multi_modal_data") or {}).get("image")
        return prompt, question, image

    def _sampling(self, sampling_params, count: int) -> tuple[list, list[int]]:
        """Per-prompt SamplingParams with n = max(self.n, caller's n) and the number of outputs to keep."""
        if sampling_params is None:
            from vllm import SamplingParams  # vllm: optional (the vllm extra)

            sampling_params = SamplingParams()
        per = list(sampling_params) if isinstance(sampling_params, Sequence) else [sampling_params] * count
        if len(per) != count:
            raise ValueError(f"got {len(per)} sampling params for {count} prompts; give one, or one per prompt")
        params, keep = [], []
        for sp in per:
            asked = int(getattr(sp, "n", 1) or 1)
            clone = sp.clone()
            clone.n = max(self.n, asked)
            params.append(clone)
            keep.append(asked)
        return params, keep

    @staticmethod
    def _message_image(part: dict, where: str):
        """A message part's image for the PRM: a PIL image, or a data: URL / file:// or local path decoded."""
        kind = part.get("type")
        if kind == "image_pil":
            return part["image_pil"]
        url = part["image_url"]["url"] if isinstance(part.get("image_url"), dict) else part.get("image_url")
        if not isinstance(url, str):
            raise ValueError(f"{where}: an image_url part needs {{'image_url': {{'url': ...}}}}")
        from PIL import Image  # PIL: heavy, loaded where used

        if url.startswith("data:"):
            try:
                payload = url.split(",", 1)[1]
                return Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB")
            except (IndexError, ValueError, OSError) as exc:
                raise ValueError(f"{where}: the data: URL is not a base64 image ({type(exc).__name__}: "
                                 f"{exc})") from None
        if url.startswith("file://") or "://" not in url:
            return url[len("file://"):] if url.startswith("file://") else url
        raise ValueError(f"{where}: the PRM reads images from data: URLs, local paths and image_pil parts, not "
                         f"{url.split('://', 1)[0]}:// URLs (it never downloads); send the image as a data: URL")

    def _split_conversation(self, conversation, index: int) -> tuple[str | None, list]:
        """(the last user message's text, the user messages' images) of one conversation."""
        if not isinstance(conversation, (list, tuple)) or not all(isinstance(m, dict) for m in conversation):
            raise TypeError(f"conversation {index} must be a list of message dicts ({{'role': ..., 'content': ...}})")
        question, images = None, []
        for m, message in enumerate(conversation):
            if message.get("role") != "user":
                continue
            content = message.get("content")
            if isinstance(content, str):
                question = content
                continue
            texts = []
            for k, part in enumerate(content or []):
                if not isinstance(part, dict):
                    raise TypeError(f"conversation {index} message {m} part {k}: expected a dict, got "
                                    f"{type(part).__name__}")
                if part.get("type") == "text":
                    texts.append(part.get("text", ""))
                elif part.get("type") in ("image_url", "image_pil"):
                    images.append(self._message_image(part, f"conversation {index} message {m} part {k}"))
            question = "\n".join(texts)
        return question, images

    # --- the calls -----------------------------------------------------------
    def generate(self, prompts, sampling_params=None, *, questions: Sequence[str] | None = None,
                 return_n: int | None = None, use_tqdm: bool = False, **kwargs) -> list:
        """Sample, score, rerank; vLLM ``RequestOutput``s with outputs best first (see the module doc)."""
        single = isinstance(prompts, (str, dict))
        prompts = [prompts] if single else list(prompts)
        if not prompts:
            return []
        split = self._questions([self._split_prompt(p) for p in prompts], questions, "prompt")
        params, keep = self._sampling(sampling_params, len(prompts))
        outputs = self.llm.generate([p for p, _, _ in split], params, use_tqdm=use_tqdm, **kwargs)
        return self._rerank_outputs(split, outputs, keep, return_n)

    def chat(self, messages, sampling_params=None, *, questions: Sequence[str] | None = None,
             return_n: int | None = None, use_tqdm: bool = False, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict[str, Any] | None = None, **kwargs) -> list:
        """``vllm.LLM.chat`` with Best-of-N: one conversation or a list of them (see the module doc); the
        policy's chat template renders them (``chat_template`` overrides it), and the outputs come back as
        ``generate``'s: vLLM ``RequestOutput``s, best first, with ``score``, ``step_rewards`` and ``rerank``."""
        single = isinstance(messages, (list, tuple)) and bool(messages) and isinstance(messages[0], dict)
        conversations = [list(messages)] if single else list(messages)
        if not conversations:
            return []
        split = []
        for i, conversation in enumerate(conversations):
            question, images = self._split_conversation(conversation, i)
            split.append((conversation, question, images or None))
        split = self._questions(split, questions, "conversation")
        params, keep = self._sampling(sampling_params, len(conversations))
        outputs = self.llm.chat([c for c, _, _ in split], params, use_tqdm=use_tqdm, chat_template=chat_template,
                                add_generation_prompt=add_generation_prompt,
                                continue_final_message=continue_final_message,
                                chat_template_kwargs=chat_template_kwargs, **kwargs)
        return self._rerank_outputs(split, outputs, keep, return_n)

    @staticmethod
    def _questions(split: list, questions: Sequence[str] | None, what: str) -> list:
        """(request, question, image) per request, the caller's ``questions`` in place of the found ones;
        every request must have a question for the PRM."""
        if questions is not None:
            if len(questions) != len(split):
                raise ValueError(f"got {len(questions)} questions for {len(split)} {what}s")
            split = [(r, q, im) for (r, _, im), q in zip(split, questions)]
        for i, (_, q, _) in enumerate(split):
            if not isinstance(q, str) or (what == "conversation" and not q.strip()):
                raise ValueError(f"{what} {i}: no question text for the PRM; pass questions=[...]"
                                 + (" or a 'question' key" if what == "prompt" else " or a user message with text"))
        return split

    def _rerank_outputs(self, split, outputs, keep: list[int], return_n: int | None) -> list:
        """Score every request's samples in one PRM call and reorder each request's outputs best first."""
        items = []
        for (_, question, image), out in zip(split, outputs):
            samples = sorted(out.outputs, key=lambda c: c.index)
            out.outputs = samples
            items.append(ScoringItem(question, [c.text for c in samples], image))
        results = rerank_batch(items, self.prm, self.aggregate, self.strategy, self.engine, unreadable="last")
        for (_, question, _), out, result, asked in zip(split, outputs, results, keep):
            self._attach(out, result, question, return_n or (asked if asked > 1 else None))
        return outputs

    @staticmethod
    def _attach(out, result: RerankResult, question: str, limit: int | None) -> None:
        samples = out.outputs
        for rank, i in enumerate(result.ranking):
            c = samples[i]
            c.score = result.scores[i] if result.scores is not None else None
            c.step_rewards = result.step_rewards[i] if result.step_rewards is not None else None
            c.rank = rank
            c.prm_error = result.errors.get(i)
        ordered = [samples[i] for i in result.ranking]
        out.outputs = ordered[:limit] if limit else ordered
        out.rerank = result
        out.prm_errors = result.errors
        out.question = question
