"""An OpenAI-compatible reranking server: any policy server behind it, a PRM inside it.

    mmprm serve --policy-url http://127.0.0.1:8000/v1 --prm DIR --n 8 --aggregate min

Endpoints:

- ``POST /v1/chat/completions``, ``POST /v1/completions``: the request goes
  to the upstream policy with ``n`` = the server's ``--n`` (or the request's
  ``best_of``, or its ``n`` if larger); the samples are scored by the PRM and
  the best ``n`` (the client's ``n``, default 1) come back as ``choices``,
  best first.  Each choice carries ``prm``: ``score`` (null when the PRM could
  not read the sample), ``step_rewards``, ``rank``, ``sample_index``,
  ``answer`` and ``error``; the response carries ``prm`` with the scores of
  all samples.  The PRM's question is the last user message's text (chat),
  the prompt (completions), or the request's ``question`` field.  Images:
  ``image_url`` content parts holding ``data:`` URLs (or, with
  ``--image-root``, paths of files under it) go to the PRM and, as data URLs,
  to the policy.  ``stream=true`` gets the chosen choices as server-sent
  events once scoring is done (server_stream.py).  Completions prompts may be
  token ids: they go to the policy as given; the PRM's question then comes
  from ``question`` (or, with ``--decode-token-prompts``, from the PRM's
  tokenizer -- right only when policy and PRM share a tokenizer).
- ``POST /v1/prm/score``: ``{question, candidates, image?, aggregate?,
  strategy?}`` -> step rewards, scores, ranking.
- ``GET /health`` (never asks for a key), ``GET /v1/models``: the one model
  name clients may use -- ``--served-model-name``, else the policy's model.
  A request naming another model gets 404 (code ``model_not_found``); the
  response's ``model`` is the name asked for.

Scoring: one scorer task pulls requests from an asyncio queue, waits up to
``--batch-window-ms`` for more (up to ``max_batch_candidates`` candidates),
and scores them all with one PRM engine call in a worker thread; each
request gets back only its own candidates' results.  At most ``--max-queue``
requests are admitted at once (waiting for the policy or the PRM); more get
503.  Toward the policy: ``--upstream-timeout`` per attempt, ``--retries``
retries with exponential backoff on connection errors, timeouts, 429 and
5xx; then 502 (504 when the last attempt timed out); a malformed answer is
502 too.  A request the policy rejects with 400/422 is answered 400 with the
policy's message.

Limits and safety (server_options.py has the flags and defaults): a client
key (401), body bytes (413), characters per text, samples per request
(prompts x n), images per request and pixels per image (400); local image
paths only under ``--image-root`` (server_images.py).  Client errors are
400/401/404/413 with an OpenAI-style ``{"error": {"message": ...}}``, never
500.  A request whose client disconnects is cancelled, upstream call and
scoring included.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from pathlib import Path
from typing import Literal

from mmprm_infer.aggregation import get_aggregation
from mmprm_infer.formats import FormatError
from mmprm_infer.prm import PRM, ScoringItem
from mmprm_infer.records import PRMSpec
from mmprm_infer.rerank import resolve_aggregate
from mmprm_infer.selection import get_strategy
from mmprm_infer.vision import ImageLoadError

from .scoring import Ranking, finite_or_none
from .server_batcher import PRMBatcher
from .server_errors import APIError, UpstreamError, error_body
from .server_guard import Guard
from .server_images import ImageReader
from .server_options import ServerConfig, add_serve_arguments, config_from_args

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException

    from .server_stream import stream_response
    from .server_upstream import Upstream
except ImportError as exc:  # pragma: no cover - the error says what to install
    raise ImportError("the reranking server needs the 'serve' extra: pip install 'mmprm-infer[serve]' "
                      f"(fastapi, uvicorn, httpx); missing: {exc.name}") from exc

__all__ = ["ServerConfig", "create_app", "run_server", "serve_main", "add_serve_arguments", "PRMBatcher",
           "Upstream", "UpstreamError", "APIError"]

log = logging.getLogger("mmprm.server")


# --------------------------------------------------------------------------
# request models
# --------------------------------------------------------------------------


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # temperature, max_tokens, stop, seed, ... go to the policy as given
    model: str | None = None
    n: int = Field(1, ge=1)  # n, best_of and the prompts are capped together by --max-samples
    best_of: int | None = Field(None, ge=1, description="samples to draw and rerank")
    stream: bool = False
    stream_options: dict | None = None  # include_usage is honoured; never sent to the policy (asked stream=false)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    question: str | None = None  # the PRM's question (default: the last user message's text)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    question: str | list[str] | None = None
    echo: bool = False


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str
    candidates: list[str | list[str]] = Field(min_length=1, max_length=1024)
    image: str | list[str] | None = None  # data: URLs, or paths under --image-root
    aggregate: str | None = None
    strategy: str | None = None


def _text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.text for p in content if p.type == "text" and p.text)


# --------------------------------------------------------------------------
# the app
# --------------------------------------------------------------------------


class _State:
    """What the handlers share: the PRM, the limits, the scorer, the policy client, the image readers."""

    def __init__(self, prm: PRM, config: ServerConfig):
        self.prm = prm
        self.config = config
        self.inflight = 0
        self.rejected = 0
        self.batcher: PRMBatcher | None = None
        self.upstream: Upstream | None = None
        self.images: ImageReader | None = None

    @contextlib.asynccontextmanager
    async def admitted(self):
        if self.inflight >= self.config.max_queue:
            self.rejected += 1
            raise APIError(503, f"the server is at its limit of {self.config.max_queue} requests in flight; "
                                "retry shortly", type="server_overloaded")
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def served_name(self) -> str:
        return self.config.served_model_name or await self.upstream.model()

    async def check_model(self, asked: str | None) -> str:
        """The model name for the response: the one asked for, which must be the one served (404 otherwise)."""
        served = await self.served_name()
        if asked is not None and asked != served:
            raise APIError(404, f"the model {asked[:200]!r} does not exist on this server; it serves {served!r} (see "
                                "GET /v1/models): set 'model' to that", param="model", code="model_not_found")
        return served

    def check_text(self, name: str, text: str) -> None:
        cap = self.config.max_text_chars
        if len(text) > cap:
            raise APIError(400, f"{name} is {len(text)} characters long, more than this server's limit of {cap} "
                                "(--max-text-chars); shorten it", param=name, code="string_above_max_length")

    def samples(self, req: _Sampling, prompts: int = 1) -> int:
        """Samples per prompt to ask the policy for; the request's total is capped by --max-samples."""
        samples = max(req.best_of or self.config.n, req.n)
        if samples * prompts > self.config.max_samples:
            asked = f"{samples} samples" + (f" for each of {prompts} prompts" if prompts > 1 else "")
            raise APIError(400, f"this request asks the policy for {asked} (max(n, best_of or the server's --n "
                                f"{self.config.n})), more than this server's limit of {self.config.max_samples} "
                                "samples per request (--max-samples); lower n or best_of"
                                + (" or send fewer prompts" if prompts > 1 else ""), param="n")
        return samples

    def check_images(self, count: int, param: str) -> None:
        """Before any image is read: a text-only PRM refuses images, and their number is capped."""
        if count and not self.prm.format.supports_images and not self.config.ignore_images:
            raise APIError(400, f"this server's PRM (format {self.prm.format.name!r}) is text-only and cannot score "
                                "images; send the request without image_url parts (or start the server with "
                                "--ignore-images)", param=param)
        if count > self.config.max_images:
            raise APIError(400, f"the request holds {count} images, more than this server's limit of "
                                f"{self.config.max_images} (--max-images)", param=param)

    def prm_image(self, images: list):
        """The PRM's image argument: None, one lazily decoded image, or a list of them."""
        if not images or not self.prm.format.supports_images:
            return None
        pil = [im.pil() for im in images]
        return pil[0] if len(pil) == 1 else pil

    async def rank(self, items: list[ScoringItem], aggregate: str, strategy: str) -> list[Ranking]:
        try:
            return await self.batcher.rank(items, aggregate, strategy)
        except (FormatError, ImageLoadError, ValueError, TypeError) as exc:
            raise APIError(400, f"the PRM cannot score this request: {exc}") from None
        except APIError:
            raise
        except Exception as exc:  # the PRM failed (non-finite rewards, out of memory, ...): the server's fault
            log.exception("PRM scoring failed")
            raise APIError(500, f"the PRM failed on this request: {type(exc).__name__}: {exc}",
                           type="server_error") from None


def _prm_field(ranking: Ranking, i: int, rank: int) -> dict:
    r = ranking.rerank
    return {
        "score": finite_or_none(r.scores[i]) if r.scores is not None else None,
        "step_rewards": r.step_rewards[i] if r.step_rewards is not None else None,
        "rank": rank,
        "sample_index": i,
        "answer": r.answers[i],
        "error": ranking.errors.get(i),
    }


def _summary(ranking: Ranking, samples: int) -> dict:
    r = ranking.rerank
    return {
        "aggregate": r.aggregate,
        "strategy": r.strategy,
        "samples": samples,
        "scores": [finite_or_none(s) for s in r.scores] if r.scores is not None else None,
        "best_sample_index": r.best_index,
    }


def _ranked_choices(choices: list[dict], ranking: Ranking, n: int, first_index: int = 0) -> list[dict]:
    """The best n choices, best first, each with its prm field; ``index`` counts on from first_index."""
    out = []
    for rank, i in enumerate(ranking.rerank.ranking[:n]):
        choice = dict(choices[i])
        choice["index"] = first_index + rank
        choice["prm"] = _prm_field(ranking, i, rank)
        out.append(choice)
    return out


async def _chat(state: _State, req: ChatCompletionRequest) -> dict:
    config = state.config
    question = req.question
    if question is None:
        users = [m for m in req.messages if m.role == "user"]
        question = _text_of(users[-1].content) if users else ""
    if not question.strip():
        raise APIError(400, "no question for the PRM: the request has no user message with text; add one "
                            "or pass 'question'", param="messages")
    state.check_text("question", question)
    parts = []  # (message, part, url) of every image part
    for i, m in enumerate(req.messages):
        state.check_text(f"messages[{i}].content", _text_of(m.content))
        for j, p in enumerate(m.content if isinstance(m.content, list) else ()):
            if p.type == "image_url":
                if p.image_url is None:
                    raise APIError(400, "an image_url content part needs image_url.url", param="messages")
                parts.append((i, j, p.image_url.url))
    state.check_images(len(parts), "messages")
    samples = state.samples(req)
    async with state.admitted():
        model = await state.check_model(req.model)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        prm_images = []
        for i, j, url in parts:
            image = await state.images.read(url)
            part = messages[i]["content"][j]
            part["image_url"] = {**part["image_url"], "url": image.policy_url}  # files reach the policy as data URLs
            if req.messages[i].role == "user":
                prm_images.append(image)
        body = req.model_dump(exclude={"question", "best_of", "messages", "stream_options"}, exclude_none=True)
        body.update(model=await state.upstream.model(), messages=messages, n=samples, stream=False)
        data = await state.upstream.post("/chat/completions", body)
        choices = _choices(data, samples, "message")
        texts = [c["message"].get("content") or "" for c in choices]
        item = ScoringItem(question, texts, state.prm_image(prm_images))
        ranking = (await state.rank([item], config.aggregate, config.strategy))[0]
        out = _ranked_choices(choices, ranking, req.n)
        return _response(data, model, "chat.completion", out, {**_summary(ranking, samples), "question": question})


def _prompt_list(prompt) -> tuple[list, bool]:
    """The prompts, and whether they are token ids (one list of ints, or a list of them)."""
    if isinstance(prompt, str):
        return [prompt], False
    if not prompt or isinstance(prompt[0], str):
        return list(prompt), False
    prompts = [prompt] if isinstance(prompt[0], int) else list(prompt)
    for k, ids in enumerate(prompts):
        if not ids or min(ids) < 0:
            raise APIError(400, f"prompt {k} must be a non-empty list of token ids >= 0", param="prompt")
    return prompts, True


def _questions(state: _State, req: CompletionRequest, prompts: list, token_ids: bool) -> list[str]:
    """The PRM's question per prompt: 'question', else the prompt text (token ids: see --decode-token-prompts)."""
    if req.question is not None:
        questions = [req.question] if isinstance(req.question, str) else list(req.question)
        if len(questions) != len(prompts):
            raise APIError(400, f"got {len(questions)} questions for {len(prompts)} prompts", param="question")
        return questions
    if not token_ids:
        return prompts
    if not state.config.decode_token_prompts:
        # The policy's tokenizer is unknown here; decoding with the PRM's would give a wrong question, silently.
        raise APIError(400, "the prompt is given as token ids, and this server cannot know the policy's tokenizer: "
                            "send the PRM's question as text in 'question' (one per prompt), or start the server "
                            "with --decode-token-prompts if the policy and the PRM share a tokenizer", param="prompt")
    try:
        return [state.prm.tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts]
    except Exception as exc:  # noqa: BLE001 - ids outside the vocabulary, in whatever form the tokenizer says it
        raise APIError(400, f"cannot decode the token-id prompt with the PRM's tokenizer: {exc}", param="prompt") from None


async def _completions(state: _State, req: CompletionRequest) -> dict:
    config = state.config
    prompts, token_ids = _prompt_list(req.prompt)
    if not prompts:
        raise APIError(400, "prompt is an empty list; give a prompt string", param="prompt")
    if token_ids and req.echo:
        raise APIError(400, "echo=true is not supported with token-id prompts: the server cannot tell the echoed "
                            "prompt from the completion; send echo=false or a text prompt", param="echo")
    questions = _questions(state, req, prompts, token_ids)
    for k, text in enumerate(questions):
        state.check_text(f"question[{k}]" if req.question is not None else f"prompt[{k}]", text)
    samples = state.samples(req, len(prompts))
    async with state.admitted():
        model = await state.check_model(req.model)
        body = req.model_dump(exclude={"question", "best_of", "stream_options"}, exclude_none=True)
        body.update(model=await state.upstream.model(), n=samples, stream=False)  # the prompt goes as given
        data = await state.upstream.post("/completions", body)
        choices = _choices(data, samples * len(prompts), "text")
        items = []
        for p, question in enumerate(questions):
            texts = []
            for c in choices[p * samples:(p + 1) * samples]:
                text = c.get("text") or ""
                if req.echo and text.startswith(prompts[p]):
                    text = text[len(prompts[p]):]
                texts.append(text)
            items.append(ScoringItem(question, texts, None))
        rankings = await state.rank(items, config.aggregate, config.strategy)
        out = []
        for p, ranking in enumerate(rankings):
            out += _ranked_choices(choices[p * samples:(p + 1) * samples], ranking, req.n, p * req.n)
        summary = [_summary(r, samples) for r in rankings]
        return _response(data, model, "text_completion", out, summary[0] if len(summary) == 1 else summary)


async def _score(state: _State, req: ScoreRequest) -> dict:
    config = state.config
    aggregate = req.aggregate or config.aggregate
    strategy = req.strategy or config.strategy
    try:
        get_aggregation(aggregate)
        get_strategy(strategy)
    except ValueError as exc:
        raise APIError(400, str(exc), param="aggregate" if req.aggregate else "strategy") from None
    state.check_text("question", req.question)
    for i, c in enumerate(req.candidates):
        state.check_text(f"candidates[{i}]", c if isinstance(c, str) else "".join(c))
    urls = [] if req.image is None else ([req.image] if isinstance(req.image, str) else list(req.image))
    state.check_images(len(urls), "image")
    async with state.admitted():
        images = [await state.images.read(u) for u in urls]
        item = ScoringItem(req.question, req.candidates, state.prm_image(images))
        ranking = (await state.rank([item], aggregate, strategy))[0]
        r = ranking.rerank
        return {
            "object": "prm.score",
            "question": req.question,
            "aggregate": r.aggregate,
            "strategy": r.strategy,
            "step_rewards": r.step_rewards,
            "scores": [finite_or_none(s) for s in r.scores],
            "ranking": r.ranking,
            "best_index": r.best_index,
            "answers": r.answers,
            "errors": {str(k): v for k, v in ranking.errors.items()},
        }


async def _unless_client_left(request: Request, work):
    """Run the handler's work, cancelling it (upstream call and scoring included) if the client disconnects."""
    task = asyncio.ensure_future(work)

    async def left():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(left())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        log.info("client left %s before its answer; its work was cancelled", request.url.path)
        return Response(status_code=499)  # nobody reads it
    return task.result()


def create_app(prm: PRM, config: ServerConfig) -> FastAPI:
    config = dataclasses.replace(config, aggregate=resolve_aggregate(config.aggregate, prm))
    state = _State(prm, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.upstream = Upstream(config)
        state.images = ImageReader(config.image_root, config.max_image_pixels, config.max_body_bytes,
                                   config.image_workers, config.image_timeout_s)
        state.batcher = PRMBatcher(prm, config.engine, config.batch_window_ms / 1000.0, config.max_batch_candidates)
        state.batcher.start()
        try:
            yield
        finally:
            await state.batcher.stop()
            state.images.close()
            await state.upstream.close()

    app = FastAPI(title="mmprm reranking server", lifespan=lifespan)
    app.add_middleware(Guard, keys=config.client_api_keys, max_body_bytes=config.max_body_bytes)
    app.state.mmprm = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                            headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):  # unknown path, wrong method: OpenAI-style too
        return JSONResponse(error_body(str(exc.detail), code=exc.status_code), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {err.get('msg')}")
        return JSONResponse(error_body("invalid request: " + "; ".join(parts), code=400), status_code=400)

    async def answer(request: Request, req, work):
        result = await _unless_client_left(request, work)
        if req.stream and isinstance(result, dict):
            return stream_response(result, bool((req.stream_options or {}).get("include_usage")))
        return result

    @app.get("/health")
    async def health():
        b = state.batcher
        return {"status": "ok", "in_flight": state.inflight, "max_queue": config.max_queue,
                "rejected": state.rejected, "prm_format": prm.format.name, "policy_url": config.policy_url,
                "scoring_batches": b.batches if b else 0, "scored_requests": b.batched_jobs if b else 0,
                "scoring_s": round(b.busy_s, 3) if b else 0.0, "upstream_calls": state.upstream.calls}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": await state.served_name(), "object": "model",
                                            "created": int(time.time()), "owned_by": "mmprm-reranker"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await answer(request, req, _chat(state, req))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await answer(request, req, _completions(state, req))

    @app.post("/v1/prm/score")
    async def prm_score(req: ScoreRequest, request: Request):
        return await _unless_client_left(request, _score(state, req))

    return app


def _choices(data, expected: int, field: str) -> list[dict]:
    """The policy's choices in index order; 502 for an answer that is not what the OpenAI API specifies."""
    raw = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(raw, list):
        raise UpstreamError(502, f"the policy answered without a choices list: {str(data)[:300]}")
    for c in raw:
        inner = c.get(field) if isinstance(c, dict) else None
        ok = (isinstance(c, dict) and isinstance(c.get("index", 0), int)
              and (isinstance(inner, dict) and isinstance(inner.get("content"), (str, type(None)))
                   if field == "message" else isinstance(inner, (str, type(None)))))
        if not ok:
            raise UpstreamError(502, f"the policy answered with a malformed choice (expected an object with an "
                                     f"integer index and {'a message object' if field == 'message' else 'a text'}"
                                     f"): {str(c)[:300]}")
    if len(raw) != expected:
        raise UpstreamError(502, f"the policy returned {len(raw)} choices, {expected} were asked for (does it "
                                 "honour n?)")
    return sorted(raw, key=lambda c: c.get("index", 0))


def _response(upstream: dict, model: str, obj: str, choices: list[dict], summary) -> dict:
    usage = upstream.get("usage")
    return {
        "id": f"{'chatcmpl' if obj == 'chat.completion' else 'cmpl'}-prm-{uuid.uuid4().hex[:24]}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage if isinstance(usage, dict) else None,
        "prm": summary,
    }


# --------------------------------------------------------------------------
# running it
# --------------------------------------------------------------------------


def run_server(prm: PRM, config: ServerConfig, host: str = "127.0.0.1", port: int = 8080,
               log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(create_app(prm, config), host=host, port=port, log_level=log_level)


def serve_main(args) -> int:
    """``mmprm serve``: check every option, then load the PRM (minutes for an 8B model), then start uvicorn."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise SystemExit(f"mmprm serve: {exc}") from None
    if not Path(args.prm).is_dir():
        raise SystemExit(f"mmprm serve: --prm {args.prm!r} is not a directory; give the PRM checkpoint's folder")
    try:
        prm = PRMSpec(args.prm, format=args.format, dtype=args.dtype, max_tiles=args.max_tiles).load(
            args.device, args.threads)
    except Exception as exc:  # noqa: BLE001 - a checkpoint can fail in many ways; name it and the cause
        raise SystemExit(f"mmprm serve: cannot load the PRM from {args.prm}: {type(exc).__name__}: {exc}") from None
    run_server(prm, config, host=args.host, port=args.port, log_level=args.log_level)
    return 0
