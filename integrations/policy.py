"""Policies that write rollouts: implementations of ``mmprm_infer.policy.Policy``
(the protocol, ``PolicyPrompt`` and the step helpers live in the core, ``mmprm_infer.policy``).

Implementations here:

- ``TransformersPolicy``: a local transformers causal LM (or an InternVL-style
  vision-language model), batched sampling with ``model.generate``.
- ``OpenAIPolicy``: any OpenAI-compatible chat server (``vllm serve``,
  SGLang, TGI, ...), over HTTP with retries.

``mmprm_infer.train.synthetic.policy.SyntheticPolicy`` implements the same
protocol for the synthetic task.  Sampling defaults are MM-PRM's rollout
settings: temperature 1.0, top_p 0.9, top_k 50.
"""

from __future__ import annotations

import base64
import io
import json
import mimetypes
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mmprm_infer.policy import (
    DEFAULT_SAMPLING,
    DEFAULT_SYSTEM_PROMPT,
    STEP_SEPARATOR,
    PolicyError,
    PolicyPrompt,
    join_steps,
    sampling_options,
)

__all__ = ["TransformersPolicy", "OpenAIPolicy"]


def _check_prompts(prompts, n: int) -> list[PolicyPrompt]:
    if isinstance(prompts, PolicyPrompt):
        raise TypeError("prompts must be a list of PolicyPrompt; wrap a single one as [prompt]")
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, PolicyPrompt):
            raise TypeError(f"prompt {i} is a {type(p).__name__}, not a PolicyPrompt")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return prompts


def _messages(prompt: PolicyPrompt, system_prompt: str | None, user_content: Any) -> list[dict]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    msgs.append({"role": "user", "content": user_content})
    if prompt.partial_steps:
        msgs.append({"role": "assistant", "content": join_steps(prompt.partial_steps) + STEP_SEPARATOR})
    return msgs


# --------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------


class TransformersPolicy:
    """Sampling from a local transformers model.

    The prompt is the tokenizer's chat template over (optional) system
    prompt, the question as the user turn and, when continuing, the partial
    steps already in the assistant turn (``continue_final_message``), so the
    model writes the next step.  Batches of ``batch_size`` sequences
    (prompts x n, each prompt repeated n times) run through ``model.generate``.

    Images: with ``processor`` (an ``AutoProcessor``), the processor builds
    the inputs.  Without one, a model whose config has ``image_token_id``
    (InternVL-style) gets ``<image>`` placeholders expanded to
    ``<img><IMG_CONTEXT>...</img>`` and ``pixel_values`` from
    ``mmprm_infer.vision.load_image`` (``image_config`` sets the tiling).
    A text-only model given images raises, unless ``ignore_images=True``.

    ``seed``: each ``generate`` call seeds torch with ``seed + call index``,
    so a fresh policy with the same seed reproduces the same calls.
    """

    def __init__(self, model, tokenizer, *, processor=None, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                 batch_size: int = 16, seed: int | None = None, image_config=None, ignore_images: bool = False,
                 **sampling: Any):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = processor
        self.system_prompt = system_prompt
        self.batch_size = batch_size
        self.seed = seed
        self.image_config = image_config
        self.ignore_images = ignore_images
        self.sampling = sampling_options(DEFAULT_SAMPLING, sampling)
        self._calls = 0
        self._lock = threading.Lock()
        if getattr(tokenizer, "chat_template", None) is None and processor is None:
            raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template (the policy "
                             "builds its prompts with it)")

    # --- prompts ---------------------------------------------------------
    @property
    def _image_token_id(self) -> int | None:
        return getattr(self.model.config, "image_token_id", None)

    def build_prompt(self, prompt: PolicyPrompt) -> str:
        """The prompt text (before image-token expansion) for one prompt."""
        images = [] if self.ignore_images else list(prompt.images)
        if images and self.processor is not None:
            content: Any = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt.question}]
            renderer = self.processor
        else:
            content = "<image>\n" * len(images) + prompt.question
            renderer = self.tokenizer
        msgs = _messages(prompt, self.system_prompt, content)
        if prompt.partial_steps:
            return renderer.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
        return renderer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def _encode(self, prompts: list[PolicyPrompt]):
        import torch  # torch: heavy, loaded where used

        texts = [self.build_prompt(p) for p in prompts]
        images = [[] if self.ignore_images else list(p.images) for p in prompts]
        if any(images):
            if self.processor is not None:
                flat = [im for ims in images for im in ims]
                return self.processor(text=texts, images=flat, return_tensors="pt", padding=True)
            if self._image_token_id is None:
                raise ValueError(
                    "this model takes no images (its config has no image_token_id) and no processor was "
                    "given; pass processor=AutoProcessor.from_pretrained(...), drop the images (text-only "
                    "prompts), or set ignore_images=True"
                )
            from mmprm_infer.vision import image_token_block, load_image  # lazy: it imports PIL

            per_tile = int(getattr(self.model.config, "image_seq_length", 256))
            pixels = []
            for i, ims in enumerate(images):
                for im in ims:
                    pv = load_image(im, config=self.image_config)
                    texts[i] = texts[i].replace("<image>", image_token_block(pv.shape[0], per_tile), 1)
                    pixels.append(pv)
            enc = self._tokenize(texts)
            dtype = next(self.model.parameters()).dtype
            enc["pixel_values"] = torch.cat(pixels).to(dtype)
            return enc
        return self._tokenize(texts)

    def _tokenize(self, texts: list[str]):
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = side

    # --- sampling --------------------------------------------------------
    def generate(self, prompts: list[PolicyPrompt], n: int = 1, **sampling: Any) -> list[list[str]]:
        import torch  # torch: heavy, loaded where used

        prompts = _check_prompts(prompts, n)
        opts = sampling_options(self.sampling, sampling)
        with self._lock:
            call = self._calls
            self._calls += 1
        seed = opts.pop("seed", None)
        seed = seed if seed is not None else (None if self.seed is None else self.seed + call)
        if seed is not None:
            torch.manual_seed(seed)
        expanded = [p for p in prompts for _ in range(n)]
        texts: list[str] = []
        for start in range(0, len(expanded), self.batch_size):
            texts.extend(self._generate_batch(expanded[start:start + self.batch_size], opts))
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _generate_batch(self, prompts: list[PolicyPrompt], opts: dict[str, Any]) -> list[str]:
        import torch  # torch: heavy, loaded where used

        enc = self._encode(prompts)
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        do_sample = opts["temperature"] > 0
        kwargs: dict[str, Any] = {"max_new_tokens": int(opts["max_new_tokens"]), "do_sample": do_sample}
        if do_sample:
            kwargs.update(temperature=float(opts["temperature"]), top_p=float(opts["top_p"]),
                          top_k=int(opts["top_k"]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**enc, pad_token_id=pad, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


# --------------------------------------------------------------------------
# OpenAI-compatible HTTP
# --------------------------------------------------------------------------


def _image_url(image) -> str:
    """An image as a URL the chat API accepts: http(s) URLs pass, files and PIL become data URLs."""
    if isinstance(image, (str, os.PathLike)):
        s = os.fspath(image)
        if s.startswith(("http://", "https://", "data:")):
            return s
        mime = mimetypes.guess_type(s)[0] or "image/png"
        with open(s, "rb") as f:
            data = f.read()
    else:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class _HTTPStatusError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


class _Transport:
    """POST JSON with httpx when it is installed, else with urllib (stdlib)."""

    def __init__(self, timeout: float, headers: dict[str, str]):
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", **headers}
        try:
            import httpx  # httpx: optional (the serve extra)
        except ImportError:
            # httpx: optional (the serve extra); urllib otherwise
            httpx = None  # type: ignore[assignment]
        self._httpx = httpx
        self._client = httpx.Client(timeout=timeout, headers=self.headers) if httpx is not None else None

    @property
    def backend(self) -> str:
        return "httpx" if self._client is not None else "urllib"

    def post(self, url: str, payload: dict) -> dict:
        if self._client is not None:
            r = self._client.post(url, json=payload)
            if r.status_code >= 400:
                raise _HTTPStatusError(r.status_code, r.text)
            return r.json()
        import urllib.error  # urllib: only without httpx; about 20 ms that `mmprm -h` need not pay
        import urllib.request  # urllib: only without httpx; about 20 ms that `mmprm -h` need not pay

        req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read().decode())
        except urllib.error.HTTPError as e:
            raise _HTTPStatusError(e.code, e.read().decode(errors="replace")) from None

    def transient(self, exc: Exception) -> bool:
        if isinstance(exc, _HTTPStatusError):
            return exc.status == 429 or exc.status >= 500
        if self._httpx is not None and isinstance(exc, self._httpx.TransportError):
            return True
        return isinstance(exc, (OSError, TimeoutError, ConnectionError))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class OpenAIPolicy:
    """Rollouts from an OpenAI-compatible chat-completions server.

    ``base_url`` is the API root, as for the OpenAI client
    (``http://127.0.0.1:8000/v1``); requests go to ``{base_url}/chat/completions``
    with ``n`` choices per prompt (asked again for the rest when a server
    returns fewer).  Images travel as data URLs.

    Continuing a partial solution, ``continuation``:
    - ``"prefill"`` (default): the partial steps are the final assistant
      message, with vLLM's ``continue_final_message=True,
      add_generation_prompt=False``; the reply is the continuation only.
    - ``"prompt"``: the partial steps go into the user message as "Previous
      steps" (MM-PRM's rollout prompt style), for servers without prefill.

    ``top_k`` is not an OpenAI parameter; it is sent (vLLM and SGLang read
    it) unless ``send_top_k=False``.  Transient failures (connection errors,
    timeouts, HTTP 429 and 5xx) are retried ``retries`` times with
    exponential backoff; other HTTP errors raise ``PolicyError`` at once.
    Uses httpx when installed, else the standard library's urllib.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, timeout: float = 120.0,
                 retries: int = 3, backoff_s: float = 0.5, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                 continuation: str = "prefill", send_top_k: bool = True, max_concurrency: int = 8,
                 extra_body: dict | None = None, **sampling: Any):
        if continuation not in ("prefill", "prompt"):
            raise ValueError(f"continuation must be 'prefill' or 'prompt', got {continuation!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.retries = retries
        self.backoff_s = backoff_s
        self.system_prompt = system_prompt
        self.continuation = continuation
        self.send_top_k = send_top_k
        self.max_concurrency = max_concurrency
        self.extra_body = dict(extra_body or {})
        self.sampling = sampling_options(DEFAULT_SAMPLING, sampling)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._transport = _Transport(timeout, headers)

    @property
    def backend(self) -> str:
        """The HTTP client in use: "httpx" or "urllib"."""
        return self._transport.backend

    def close(self) -> None:
        self._transport.close()

    def request_body(self, prompt: PolicyPrompt, n: int, opts: dict[str, Any]) -> dict:
        """The JSON body of one chat-completions request."""
        question = prompt.question
        if self.continuation == "prompt" and prompt.partial_steps:
            question = (f"{question}\n\nPrevious steps:\n{join_steps(prompt.partial_steps)}\n\n"
                        "Continue the solution from the next step.")
        if prompt.images:
            content: Any = [{"type": "image_url", "image_url": {"url": _image_url(im)}} for im in prompt.images]
            content.append({"type": "text", "text": question})
        else:
            content = question
        if self.continuation == "prefill":
            msgs = _messages(prompt, self.system_prompt, content)
        else:
            msgs = _messages(PolicyPrompt(question, prompt.images), self.system_prompt, content)
        body: dict[str, Any] = {
            "model": self.model,
            "messages": msgs,
            "n": n,
            "temperature": opts["temperature"],
            "top_p": opts["top_p"],
            "max_tokens": int(opts["max_new_tokens"]),
        }
        if self.send_top_k:
            body["top_k"] = int(opts["top_k"])
        if opts.get("seed") is not None:
            body["seed"] = int(opts["seed"])
        if self.continuation == "prefill" and prompt.partial_steps:
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        body.update(self.extra_body)
        return body

    def _post(self, body: dict) -> dict:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                return self._transport.post(self.url, body)
            except Exception as e:  # noqa: BLE001 - classified below
                if not self._transport.transient(e):
                    raise PolicyError(f"{self.url} refused the request: {e}") from e
                last = e
                if attempt < self.retries:
                    time.sleep(self.backoff_s * (2 ** attempt))
        raise PolicyError(f"{self.url} failed {self.retries + 1} times; last error: {last}") from last

    def _one(self, prompt: PolicyPrompt, n: int, opts: dict[str, Any]) -> list[str]:
        out: list[str] = []
        for _ in range(n + 2):  # a server that ignores n answers one choice per request
            if len(out) >= n:
                break
            data = self._post(self.request_body(prompt, n - len(out), opts))
            try:
                choices = data["choices"]
                texts = [c["message"]["content"] or "" for c in choices]
            except (KeyError, TypeError, IndexError) as e:
                raise PolicyError(f"{self.url} answered without choices[].message.content: "
                                  f"{json.dumps(data)[:300]}") from e
            if not texts:
                raise PolicyError(f"{self.url} answered with no choices")
            out.extend(t.strip() for t in texts)
        if len(out) < n:
            raise PolicyError(f"{self.url} gave {len(out)} of the {n} choices asked for")
        return out[:n]

    def generate(self, prompts: list[PolicyPrompt], n: int = 1, **sampling: Any) -> list[list[str]]:
        prompts = _check_prompts(prompts, n)
        opts = sampling_options(self.sampling, sampling)
        if len(prompts) <= 1 or self.max_concurrency <= 1:
            return [self._one(p, n, opts) for p in prompts]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts))) as ex:
            return list(ex.map(lambda p: self._one(p, n, opts), prompts))
