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
  ``image_url`` content parts holding ``data:`` URLs or local file paths go
  to the PRM (and, as data URLs, to the policy).
- ``POST /v1/prm/score``: ``{question, candidates, image?, aggregate?,
  strategy?}`` -> step rewards, scores, ranking.
- ``GET /health``, ``GET /v1/models``.

Scoring: one scorer task pulls requests from an asyncio queue, waits up to
``--batch-window-ms`` for more (up to ``max_batch_candidates`` candidates),
and scores them all with one PRM engine call in a worker thread; each
request gets back only its own candidates' results.  At most ``--max-queue``
requests are admitted at once (waiting for the policy or the PRM); more get
503.  Toward the policy: ``--upstream-timeout`` per attempt, ``--retries``
retries with exponential backoff on connection errors, timeouts, 429 and
5xx; then 502 (504 when the last attempt timed out).  A request the policy
rejects with 400/422 is answered 400 with the policy's message.  Bad
requests get 400 with an OpenAI-style ``{"error": {"message": ...}}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmprm_infer.aggregation import get_aggregation
from mmprm_infer.formats import FormatError
from mmprm_infer.prm import PRM, ScoringItem
from mmprm_infer.records import PRMSpec
from mmprm_infer.selection import get_strategy
from mmprm_infer.vision import ImageLoadError, open_rgb

from .policy import _image_url
from .scoring import Ranking, finite_or_none, rank_scored, score_items

try:
    import httpx
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as exc:  # pragma: no cover - the error says what to install
    raise ImportError("the reranking server needs the 'serve' extra: pip install 'mmprm-infer[serve]' "
                      f"(fastapi, uvicorn, httpx); missing: {exc.name}") from exc

__all__ = ["ServerConfig", "create_app", "run_server", "PRMBatcher", "Upstream", "UpstreamError"]

log = logging.getLogger("mmprm.server")

MAX_SAMPLES = 128


@dataclass
class ServerConfig:
    policy_url: str
    policy_model: str | None = None  # default: the first model the policy lists at /models
    api_key: str | None = None  # sent to the policy as a Bearer token
    n: int = 8
    aggregate: str = "min"
    strategy: str = "best_of_n"
    max_queue: int = 256
    batch_window_ms: float = 10.0
    max_batch_candidates: int = 512
    upstream_timeout: float = 60.0
    retries: int = 2
    backoff_s: float = 0.2
    engine: str | None = None
    image_root: str | None = None  # when set, local image paths must lie under it
    ignore_images: bool = False  # a text-only PRM scores image requests on their text alone

    def __post_init__(self) -> None:
        if not self.policy_url.startswith(("http://", "https://")):
            raise ValueError(f"policy_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {self.policy_url!r}")
        for name in ("n", "max_queue", "max_batch_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n > MAX_SAMPLES:
            raise ValueError(f"n must be <= {MAX_SAMPLES}, got {self.n}")
        if self.retries < 0 or self.upstream_timeout <= 0 or self.batch_window_ms < 0:
            raise ValueError("retries and batch_window_ms must be >= 0 and upstream_timeout > 0")
        get_aggregation(self.aggregate)
        get_strategy(self.strategy)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param


class UpstreamError(APIError):
    def __init__(self, status: int, message: str):
        super().__init__(status, message, type="upstream_error")


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
    n: int = Field(1, ge=1, le=MAX_SAMPLES)
    best_of: int | None = Field(None, ge=1, le=MAX_SAMPLES, description="samples to draw and rerank")
    stream: bool = False


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    question: str | None = None  # the PRM's question (default: the last user message's text)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    question: str | list[str] | None = None
    echo: bool = False


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str
    candidates: list[str | list[str]] = Field(min_length=1, max_length=1024)
    image: str | list[str] | None = None  # data: URLs or local paths
    aggregate: str | None = None
    strategy: str | None = None


# --------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------


def decode_image(url: str, image_root: str | None = None):
    """A data: URL or local path -> RGB PIL image; APIError(400) saying what is wrong."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64") or not payload:
            raise APIError(400, "image data URLs must be base64: data:image/png;base64,<data>", param="image_url")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "image data URL holds invalid base64", param="image_url") from None
        from PIL import Image

        try:
            with Image.open(io.BytesIO(raw)) as im:
                im.load()
                return open_rgb(im)
        except (OSError, ValueError, SyntaxError) as exc:
            raise APIError(400, f"cannot decode the image in a data URL: {exc}", param="image_url") from None
    if url.startswith(("http://", "https://")):
        raise APIError(400, "http(s) image URLs are not fetched by the reranking server; send the image as a "
                            "data: URL (base64) or a local file path", param="image_url")
    path = Path(url[len("file://"):] if url.startswith("file://") else url)
    if image_root is not None:
        root = Path(image_root).resolve()
        if root != path.resolve() and root not in path.resolve().parents:
            raise APIError(400, f"local image paths must lie under {root}; got {url!r}", param="image_url")
    try:
        return open_rgb(path)
    except ImageLoadError as exc:
        raise APIError(400, str(exc), param="image_url") from None


def _text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.text for p in content if p.type == "text" and p.text)


# --------------------------------------------------------------------------
# PRM batching
# --------------------------------------------------------------------------


@dataclass
class _Job:
    items: list[ScoringItem]
    aggregate: str
    strategy: str
    future: asyncio.Future
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = sum(len(it.candidates) for it in self.items)


class PRMBatcher:
    """One scorer task: collects jobs for a short window, scores them in one engine call, answers each job."""

    def __init__(self, prm: PRM, engine: str | None = None, window_s: float = 0.01, max_batch_candidates: int = 512):
        self.prm = prm
        self.engine = engine
        self.window_s = window_s
        self.max_batch_candidates = max_batch_candidates
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.batches = 0  # scoring calls made (for tests and /health)
        self.batched_jobs = 0
        self.busy_s = 0.0  # time spent scoring

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="mmprm-prm-scorer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self.queue.empty():
            job = self.queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(APIError(503, "server shutting down", type="server_error"))

    async def rank(self, items: list[ScoringItem], aggregate: str, strategy: str) -> list[Ranking]:
        job = _Job(items, aggregate, strategy, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def _collect(self) -> list[_Job]:
        jobs = [await self.queue.get()]
        size = jobs[0].size
        deadline = time.monotonic() + self.window_s
        while size < self.max_batch_candidates:
            remaining = deadline - time.monotonic()
            try:
                job = self.queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self.queue.get(), remaining)
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            jobs.append(job)
            size += job.size
        return jobs

    async def _run(self) -> None:
        while True:
            jobs = await self._collect()
            jobs = [j for j in jobs if not j.future.cancelled()]  # the client went away
            if not jobs:
                continue
            try:
                results = await asyncio.to_thread(self._score_jobs, jobs)
            except Exception:  # one job's input broke the shared call: score them one by one
                results = []
                for job in jobs:
                    try:
                        results.append((await asyncio.to_thread(self._score_jobs, [job]))[0])
                    except Exception as exc:  # noqa: BLE001 - handed to that request
                        results.append(exc)
            for job, result in zip(jobs, results):
                if job.future.done():
                    continue
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _score_jobs(self, jobs: list[_Job]) -> list[list[Ranking]]:
        """All jobs' items in one engine call; rankings handed back per job, in its own item order."""
        items = [it for job in jobs for it in job.items]
        t0 = time.perf_counter()
        rewards, errors = score_items(self.prm, items, self.engine)
        self.busy_s += time.perf_counter() - t0
        self.batches += 1
        self.batched_jobs += len(jobs)
        out, start = [], 0
        for job in jobs:
            end = start + len(job.items)
            out.append(rank_scored(job.items, rewards[start:end], errors[start:end], job.aggregate, job.strategy))
            start = end
        return out


# --------------------------------------------------------------------------
# the upstream policy
# --------------------------------------------------------------------------


class Upstream:
    """POSTs to the policy server with timeouts and retries; errors become 400/502/504."""

    def __init__(self, config: ServerConfig):
        self.base = config.policy_url.rstrip("/")
        self.config = config
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        limits = httpx.Limits(max_connections=config.max_queue + 8, max_keepalive_connections=64)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(config.upstream_timeout), limits=limits, headers=headers)
        self._model: str | None = config.policy_model
        self.calls = 0

    async def close(self) -> None:
        await self.client.aclose()

    async def model(self) -> str:
        if self._model is None:
            data = await self._request("GET", "/models", None)
            try:
                self._model = data["data"][0]["id"]
            except (KeyError, IndexError, TypeError):
                raise UpstreamError(502, f"the policy at {self.base}/models lists no model; start it with a model "
                                         "or pass --policy-model") from None
        return self._model

    async def post(self, path: str, body: dict) -> dict:
        return await self._request("POST", path, body)

    async def _request(self, method: str, path: str, body: dict | None) -> dict:
        url = self.base + path
        last: str = ""
        timed_out = False
        for attempt in range(self.config.retries + 1):
            self.calls += 1
            try:
                resp = await self.client.request(method, url, json=body)
            except httpx.TimeoutException:
                timed_out, last = True, f"no answer within {self.config.upstream_timeout:g} s"
            except httpx.TransportError as exc:
                timed_out, last = False, f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code < 400:
                    try:
                        return resp.json()
                    except ValueError:
                        raise UpstreamError(502, f"the policy at {url} answered with non-JSON: {resp.text[:200]!r}") from None
                detail = _error_message(resp)
                if resp.status_code in (400, 422):
                    raise APIError(400, f"the policy rejected the request: {detail}")
                if resp.status_code != 429 and resp.status_code < 500:
                    raise UpstreamError(502, f"the policy at {url} answered HTTP {resp.status_code}: {detail}")
                timed_out, last = False, f"HTTP {resp.status_code}: {detail}"
            if attempt < self.config.retries:
                await asyncio.sleep(self.config.backoff_s * (2 ** attempt))
        tries = self.config.retries + 1
        if timed_out:
            raise UpstreamError(504, f"the policy at {url} timed out ({tries} attempt(s)); last: {last}")
        raise UpstreamError(502, f"the policy at {url} failed ({tries} attempt(s)); last error: {last}")


def _error_message(resp) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:500]
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data))
        if isinstance(err, dict):
            return str(err.get("message", err))[:500]
        return str(err)[:500]
    return str(data)[:500]


# --------------------------------------------------------------------------
# the app
# --------------------------------------------------------------------------


class _State:
    def __init__(self, prm: PRM, config: ServerConfig):
        self.prm = prm
        self.config = config
        self.inflight = 0
        self.rejected = 0
        self.batcher: PRMBatcher | None = None
        self.upstream: Upstream | None = None

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


def _samples(req: _Sampling, config: ServerConfig) -> int:
    return max(req.best_of or config.n, req.n)


def _prm_images(state: _State, images: list):
    if not images:
        return None
    if not state.prm.format.supports_images:
        if state.config.ignore_images:
            return None
        raise APIError(400, f"this server's PRM (format {state.prm.format.name!r}) is text-only and cannot score "
                            "images; send the request without image_url parts (or start the server with "
                            "--ignore-images)", param="messages")
    return images


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


def create_app(prm: PRM, config: ServerConfig) -> FastAPI:
    state = _State(prm, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.upstream = Upstream(config)
        state.batcher = PRMBatcher(prm, config.engine, config.batch_window_ms / 1000.0, config.max_batch_candidates)
        state.batcher.start()
        try:
            yield
        finally:
            await state.batcher.stop()
            await state.upstream.close()

    app = FastAPI(title="mmprm reranking server", lifespan=lifespan)
    app.state.mmprm = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse({"error": {"message": exc.message, "type": exc.type, "param": exc.param,
                                       "code": exc.status}}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {err.get('msg')}")
        return JSONResponse({"error": {"message": "invalid request: " + "; ".join(parts),
                                       "type": "invalid_request_error", "param": None, "code": 400}},
                            status_code=400)

    async def _rank(items: list[ScoringItem], aggregate: str, strategy: str) -> list[Ranking]:
        try:
            return await state.batcher.rank(items, aggregate, strategy)
        except (FormatError, ImageLoadError, ValueError, TypeError) as exc:
            raise APIError(400, f"the PRM cannot score this request: {exc}") from None
        except APIError:
            raise
        except Exception as exc:  # the PRM failed (non-finite rewards, out of memory, ...)
            log.exception("PRM scoring failed")
            raise APIError(500, f"the PRM failed on this request: {type(exc).__name__}: {exc}",
                           type="server_error") from None

    @app.get("/health")
    async def health():
        b = state.batcher
        return {"status": "ok", "in_flight": state.inflight, "max_queue": config.max_queue,
                "rejected": state.rejected, "prm_format": prm.format.name, "policy_url": config.policy_url,
                "scoring_batches": b.batches if b else 0, "scored_requests": b.batched_jobs if b else 0,
                "scoring_s": round(b.busy_s, 3) if b else 0.0, "upstream_calls": state.upstream.calls}

    @app.get("/v1/models")
    async def models():
        name = await state.upstream.model()
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                            "owned_by": "mmprm-reranker"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        if req.stream:
            raise APIError(400, "stream=true is not supported: the server must see every sample before it can "
                                "pick the best; send stream=false", param="stream")
        async with state.admitted():
            question = req.question
            if question is None:
                users = [m for m in req.messages if m.role == "user"]
                question = _text_of(users[-1].content) if users else ""
            if not question.strip():
                raise APIError(400, "no question for the PRM: the request has no user message with text; add one "
                                    "or pass 'question'", param="messages")
            images, messages = [], []
            for m in req.messages:
                msg = m.model_dump(exclude_none=True)
                if isinstance(m.content, list):
                    parts = []
                    for p, raw in zip(m.content, msg["content"]):
                        if p.type == "image_url":
                            if p.image_url is None:
                                raise APIError(400, "an image_url content part needs image_url.url", param="messages")
                            image = decode_image(p.image_url.url, config.image_root)
                            if m.role == "user":
                                images.append(image)
                            raw = {**raw, "image_url": {**raw["image_url"], "url": _as_data_url(p.image_url.url, image)}}
                        parts.append(raw)
                    msg["content"] = parts
                messages.append(msg)
            prm_images = _prm_images(state, images)
            samples = _samples(req, config)
            body = req.model_dump(exclude={"question", "best_of", "messages"}, exclude_none=True)
            body.update(model=await state.upstream.model(), messages=messages, n=samples, stream=False)
            data = await state.upstream.post("/chat/completions", body)
            choices = _choices(data, samples)
            texts = [((c.get("message") or {}).get("content") or "") for c in choices]
            image_arg = prm_images if prm_images is None or len(prm_images) > 1 else prm_images[0]
            ranking = (await _rank([ScoringItem(question, texts, image_arg)], config.aggregate, config.strategy))[0]
            out = []
            for rank, i in enumerate(ranking.rerank.ranking[:req.n]):
                choice = dict(choices[i])
                choice["index"] = rank
                choice["prm"] = _prm_field(ranking, i, rank)
                out.append(choice)
            return _response(data, "chat.completion", out, {**_summary(ranking, samples), "question": question})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if req.stream:
            raise APIError(400, "stream=true is not supported: the server must see every sample before it can "
                                "pick the best; send stream=false", param="stream")
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise APIError(400, "prompt is an empty list; give a prompt string", param="prompt")
        questions = req.question if req.question is not None else prompts
        questions = [questions] if isinstance(questions, str) else list(questions)
        if len(questions) != len(prompts):
            raise APIError(400, f"got {len(questions)} questions for {len(prompts)} prompts", param="question")
        async with state.admitted():
            samples = _samples(req, config)
            body = req.model_dump(exclude={"question", "best_of"}, exclude_none=True)
            body.update(model=await state.upstream.model(), n=samples, stream=False)
            data = await state.upstream.post("/completions", body)
            choices = _choices(data, samples * len(prompts))
            items = []
            for p, (prompt, question) in enumerate(zip(prompts, questions)):
                texts = []
                for c in choices[p * samples:(p + 1) * samples]:
                    text = c.get("text") or ""
                    if req.echo and text.startswith(prompt):
                        text = text[len(prompt):]
                    texts.append(text)
                items.append(ScoringItem(question, texts, None))
            rankings = await _rank(items, config.aggregate, config.strategy)
            out = []
            for p, ranking in enumerate(rankings):
                for rank, i in enumerate(ranking.rerank.ranking[:req.n]):
                    choice = dict(choices[p * samples + i])
                    choice["index"] = p * req.n + rank
                    choice["prm"] = _prm_field(ranking, i, rank)
                    out.append(choice)
            summary = [_summary(r, samples) for r in rankings]
            return _response(data, "text_completion", out, summary[0] if len(summary) == 1 else summary)

    @app.post("/v1/prm/score")
    async def prm_score(req: ScoreRequest):
        aggregate = req.aggregate or config.aggregate
        strategy = req.strategy or config.strategy
        try:
            get_aggregation(aggregate)
            get_strategy(strategy)
        except ValueError as exc:
            raise APIError(400, str(exc), param="aggregate" if req.aggregate else "strategy") from None
        async with state.admitted():
            urls = [] if req.image is None else ([req.image] if isinstance(req.image, str) else list(req.image))
            images = _prm_images(state, [decode_image(u, config.image_root) for u in urls])
            image_arg = images if images is None or len(images) > 1 else images[0]
            ranking = (await _rank([ScoringItem(req.question, req.candidates, image_arg)], aggregate, strategy))[0]
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

    return app


def _as_data_url(url: str, image) -> str:
    """What the policy gets for an image: data URLs as they came, local files as data URLs."""
    if url.startswith("data:"):
        return url
    return _image_url(image)


def _choices(data: dict, expected: int) -> list[dict]:
    try:
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
    except (KeyError, TypeError, AttributeError):
        raise UpstreamError(502, f"the policy answered without a choices list: {str(data)[:300]}") from None
    if len(choices) != expected:
        raise UpstreamError(502, f"the policy returned {len(choices)} choices, {expected} were asked for (does it "
                                 "honour n?)")
    return choices


def _response(upstream: dict, obj: str, choices: list[dict], summary) -> dict:
    return {
        "id": f"{'chatcmpl' if obj == 'chat.completion' else 'cmpl'}-prm-{uuid.uuid4().hex[:24]}",
        "object": obj,
        "created": int(time.time()),
        "model": upstream.get("model"),
        "choices": choices,
        "usage": upstream.get("usage"),
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
    """``mmprm serve``: load the PRM, start uvicorn."""
    prm = PRMSpec(args.prm, format=args.format, dtype=args.dtype, max_tiles=getattr(args, "max_tiles", None)).load(
        args.device, getattr(args, "threads", None))
    config = ServerConfig(
        policy_url=args.policy_url, policy_model=args.policy_model, api_key=args.api_key or os.environ.get("MMPRM_POLICY_API_KEY"),
        n=args.n, aggregate=args.aggregate, strategy=args.strategy, max_queue=args.max_queue,
        batch_window_ms=args.batch_window_ms, upstream_timeout=args.upstream_timeout, retries=args.retries,
        engine=args.engine, image_root=args.image_root, ignore_images=args.ignore_images,
    )
    run_server(prm, config, host=args.host, port=args.port, log_level=args.log_level)
    return 0
