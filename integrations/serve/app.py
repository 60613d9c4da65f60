"""The reranking server's app: ``create_app`` wires the routes below to one PRM and one ``ServerConfig``.

What the endpoints do, the limits and the errors: see the package's doc
(``mmprm_infer.integrations.serve``).  The routes are module-level; what
they share (the PRM, the limits, the scorer, the policy client, the image
reader) is a ``State`` on ``app.state.mmprm``, opened and closed with the
app's lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

from mmprm_infer.aggregation import get_aggregation
from mmprm_infer.formats import FormatError
from mmprm_infer.integrations.serve.batcher import PRMBatcher
from mmprm_infer.integrations.serve.errors import APIError, UpstreamError, error_body
from mmprm_infer.integrations.serve.guard import Guard
from mmprm_infer.integrations.serve.images import ImageReader
from mmprm_infer.integrations.serve.options import ANSWER_BYTES_PER_CHAR, ANSWER_SLACK_BYTES, ServerConfig
from mmprm_infer.io.files import json_safe, lone_surrogate
from mmprm_infer.prm import PRM, ScoringItem
from mmprm_infer.rerank import RerankResult, resolve_aggregate
from mmprm_infer.selection import get_strategy
from mmprm_infer.vision import ImageLoadError

try:
    from fastapi import APIRouter, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    from mmprm_infer.integrations.serve.connections import uvicorn_config
    from mmprm_infer.integrations.serve.protocol import (
        ChatCompletionRequest,
        CompletionRequest,
        Sampling,
        ScoreRequest,
        finite_or_none,
        policy_choices,
        ranked_choices,
        response,
        summary,
        text_of,
    )
    from mmprm_infer.integrations.serve.stream import stream_response
    from mmprm_infer.integrations.serve.upstream import Upstream
except ImportError as exc:  # pragma: no cover - the error says what to install
    raise ImportError("the reranking server needs the 'serve' extra: pip install 'mmprm-infer[serve]' "
                      f"(fastapi, uvicorn, httpx); missing: {exc.name}") from exc

__all__ = ["ServerConfig", "State", "create_app", "run_server", "PRMBatcher",
           "Upstream", "UpstreamError", "APIError"]

log = logging.getLogger("mmprm.server")


# --------------------------------------------------------------------------
# what the routes share
# --------------------------------------------------------------------------


class State:
    """What the handlers share: the PRM, the limits, the scorer, the policy client, the image readers."""

    def __init__(self, prm: PRM, config: ServerConfig):
        self.prm = prm
        self.config = config
        self.inflight = 0
        self.rejected = 0
        # set by open(), which runs before the app serves any request (typed as set: every use is after it)
        self.batcher: PRMBatcher = None  # type: ignore[assignment]
        self.upstream: Upstream = None  # type: ignore[assignment]
        self.images: ImageReader = None  # type: ignore[assignment]

    def open(self) -> None:
        config = self.config
        self.upstream = Upstream(config)
        self.images = ImageReader(config.image_root, config.max_image_pixels, config.max_body_bytes,
                                  config.image_workers, config.image_timeout_s)
        self.batcher = PRMBatcher(self.prm, config.engine, config.batch_window_ms / 1000.0,
                                  config.max_batch_candidates)
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.stop()
        self.images.close()
        await self.upstream.close()

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

    def answer_bytes(self, samples: int) -> int:
        """The most bytes of the policy's answer read for ``samples`` samples (--max-text-chars bounds them)."""
        return samples * ANSWER_BYTES_PER_CHAR * self.config.max_text_chars + ANSWER_SLACK_BYTES

    def readable_samples(self, texts: list[str]) -> tuple[list[str], dict[int, str]]:
        """The samples the PRM reads: one longer than --max-text-chars is not tokenized (it is ranked last,
        unscored, its error saying why); the others as they are."""
        cap = self.config.max_text_chars
        too_long = {i: f"sample {i} is {len(t)} characters long, more than this server's limit of {cap} "
                       "(--max-text-chars); it was not scored" for i, t in enumerate(texts) if len(t) > cap}
        return ["" if i in too_long else t for i, t in enumerate(texts)], too_long

    def check_text(self, name: str, text: str) -> None:
        cap = self.config.max_text_chars
        if len(text) > cap:
            raise APIError(400, f"{name} is {len(text)} characters long, more than this server's limit of {cap} "
                                "(--max-text-chars); shorten it", param=name, code="string_above_max_length")

    def samples(self, req: Sampling, prompts: int = 1) -> int:
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

    async def rank(self, items: list[ScoringItem], aggregate: str, strategy: str) -> list[RerankResult]:
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


# --------------------------------------------------------------------------
# the handlers' work
# --------------------------------------------------------------------------


def check_body(req) -> None:
    """A request whose JSON holds a lone UTF-16 surrogate (not text: it cannot be encoded, to the policy or in
    the answer) or NaN/Infinity (not JSON) is a 400 naming the field, before any work."""
    data = req.model_dump(exclude_none=True)
    where = lone_surrogate(data)
    if where is not None:
        raise APIError(400, f"the request's field {where} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                            "escape), which is not text; send valid Unicode")
    _, non_finite = json_safe(data)
    if non_finite:
        raise APIError(400, f"the request's field {non_finite[0]!r} is NaN or infinite, which JSON does not allow; "
                            "send a finite number")


async def _chat(state: State, req: ChatCompletionRequest) -> dict:
    config = state.config
    check_body(req)
    question = req.question
    if question is None:
        users = [m for m in req.messages if m.role == "user"]
        question = text_of(users[-1].content) if users else ""
    if not question.strip():
        raise APIError(400, "no question for the PRM: the request has no user message with text; add one "
                            "or pass 'question'", param="messages")
    state.check_text("question", question)
    parts = []  # (message, part, url) of every image part
    for i, m in enumerate(req.messages):
        state.check_text(f"messages[{i}].content", text_of(m.content))
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
        data = await state.upstream.post("/chat/completions", body, state.answer_bytes(samples))
        choices = policy_choices(data, samples, "message")
        texts, too_long = state.readable_samples([c["message"].get("content") or "" for c in choices])
        item = ScoringItem(question, texts, state.prm_image(prm_images))
        # create_app resolved config.aggregate to a name
        result = (await state.rank([item], config.aggregate, config.strategy))[0]  # type: ignore[arg-type]
        result.errors.update(too_long)
        out = ranked_choices(choices, result, req.n)
        return response(data, model, "chat.completion", out, {**summary(result, samples), "question": question})


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


def _questions(state: State, req: CompletionRequest, prompts: list, token_ids: bool) -> list[str]:
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
        raise APIError(
            400, f"cannot decode the token-id prompt with the PRM's tokenizer: {exc}", param="prompt"
        ) from None


async def _completions(state: State, req: CompletionRequest) -> dict:
    config = state.config
    check_body(req)
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
        data = await state.upstream.post("/completions", body, state.answer_bytes(samples * len(prompts)))
        choices = policy_choices(data, samples * len(prompts), "text")
        items, too_long = [], []
        for p, question in enumerate(questions):
            texts = []
            for c in choices[p * samples:(p + 1) * samples]:
                text = c.get("text") or ""
                if req.echo and text.startswith(prompts[p]):
                    text = text[len(prompts[p]):]
                texts.append(text)
            texts, long_ones = state.readable_samples(texts)
            items.append(ScoringItem(question, texts, None))
            too_long.append(long_ones)
        # create_app resolved config.aggregate to a name
        results = await state.rank(items, config.aggregate, config.strategy)  # type: ignore[arg-type]
        for result, long_ones in zip(results, too_long):
            result.errors.update(long_ones)
        out = []
        for p, result in enumerate(results):
            out += ranked_choices(choices[p * samples:(p + 1) * samples], result, req.n, p * req.n)
        summaries = [summary(r, samples) for r in results]
        return response(data, model, "text_completion", out, summaries[0] if len(summaries) == 1 else summaries)


async def _score(state: State, req: ScoreRequest) -> dict:
    config = state.config
    check_body(req)
    aggregate = req.aggregate or config.aggregate
    strategy = req.strategy or config.strategy
    try:
        # create_app resolved config.aggregate to a name
        get_aggregation(aggregate)  # type: ignore[arg-type]
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
        # create_app resolved config.aggregate to a name
        r = (await state.rank([item], aggregate, strategy))[0]  # type: ignore[arg-type]
        return {
            "object": "prm.score",
            "question": req.question,
            "aggregate": r.aggregate,
            "strategy": r.strategy,
            "step_rewards": r.step_rewards,
            # the PRM scored it: step rewards are set
            "scores": [finite_or_none(s) for s in r.scores],  # type: ignore[union-attr]
            "ranking": r.ranking,
            "best_index": r.best_index,
            "answers": r.answers,
            "errors": {str(k): v for k, v in r.errors.items()},
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
            # A cancelled task is neither cancelled() nor done until the cancellation reaches it: wait for that.
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        log.info("client left %s before its answer; its work was cancelled", request.url.path)
        return Response(status_code=499)  # nobody reads it
    return task.result()


async def _answer(request: Request, req: Sampling, work):
    result = await _unless_client_left(request, work)
    if req.stream and isinstance(result, dict):
        return stream_response(result, bool((req.stream_options or {}).get("include_usage")))
    return result


def _state(request: Request) -> State:
    return request.app.state.mmprm


# --------------------------------------------------------------------------
# the routes
# --------------------------------------------------------------------------

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    state = _state(request)
    b = state.batcher
    # never keyed: nothing here names the policy (its URL, its model) or any other part of the deployment
    return {"status": "ok", "in_flight": state.inflight, "max_queue": state.config.max_queue,
            "rejected": state.rejected, "prm_format": state.prm.format.name,
            "scoring_batches": b.batches if b else 0, "scored_requests": b.batched_jobs if b else 0,
            "scoring_s": round(b.busy_s, 3) if b else 0.0, "upstream_calls": state.upstream.calls}


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [{"id": await _state(request).served_name(), "object": "model",
                                        "created": int(time.time()), "owned_by": "mmprm-reranker"}]}


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    return await _answer(request, req, _chat(_state(request), req))


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    return await _answer(request, req, _completions(_state(request), req))


@router.post("/v1/prm/score")
async def prm_score(req: ScoreRequest, request: Request):
    return await _unless_client_left(request, _score(_state(request), req))


async def _api_error(request: Request, exc: APIError):
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                        headers=headers)


async def _http_error(request: Request, exc: HTTPException):  # unknown path, wrong method: OpenAI-style too
    return JSONResponse(error_body(str(exc.detail), code=exc.status_code), status_code=exc.status_code,
                        headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError):
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg')}")
    return JSONResponse(error_body("invalid request: " + "; ".join(parts), code=400), status_code=400)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    state = app.state.mmprm
    state.open()
    try:
        yield
    finally:
        await state.close()


def create_app(prm: PRM, config: ServerConfig) -> FastAPI:
    # a server's aggregate is a name (from the command line), so is the PRM's default
    config = dataclasses.replace(config, aggregate=resolve_aggregate(config.aggregate, prm))  # type: ignore[arg-type]
    app = FastAPI(title="mmprm reranking server", lifespan=_lifespan, exception_handlers={
        APIError: _api_error, HTTPException: _http_error, RequestValidationError: _validation_error})
    app.add_middleware(Guard, keys=config.client_api_keys, max_body_bytes=config.max_body_bytes)
    app.state.mmprm = State(prm, config)
    app.include_router(router)
    return app


# --------------------------------------------------------------------------
# running it
# --------------------------------------------------------------------------


def run_server(prm: PRM, config: ServerConfig, host: str = "127.0.0.1", port: int = 8080,
               log_level: str = "info") -> None:
    import uvicorn  # uvicorn: optional (the serve extra)

    uvicorn.Server(uvicorn_config(create_app(prm, config), host=host, port=port, log_level=log_level)).run()
