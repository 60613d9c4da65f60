"""Shared by the server tests: uvicorn in a thread, a fake OpenAI-compatible policy, request helpers.

The fake policy's samples say which request they belong to, and are the
same in every run (seeded with crc32, not Python's per-process hash()).
Its ``gate`` holds every completion call until the test opens it, so tests
order events explicitly instead of racing timers.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import socket
import threading
import time
import zlib

import numpy as np
import pytest
import spread_models
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from mmprm_infer import PRM
from mmprm_infer.integrations.serve import ServerConfig, create_app
from mmprm_infer.integrations.serve.connections import uvicorn_config

# The server's rewards against the reference engine's, on a PRM whose rewards are spread over (0, 1)
# (spread_models): a few times fp32's error, so a fast engine off by a 2 % attention scale fails.
TOL = spread_models.FP32_TOL
MODEL = "fake-policy"  # the policy's model, so the reranker's served name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, what: str, limit_s: float = 30.0) -> None:
    """Poll until condition() holds; the limit only turns a hang into a failure, nothing asserts on time."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.005)


class ServerThread:
    """uvicorn serving an app on 127.0.0.1 in a background thread; ``configure(app, host, port, log_level)``
    makes its uvicorn.Config (the reranker's: ``uvicorn_config``, the bounds ``mmprm serve`` runs with)."""

    def __init__(self, app, configure=None):
        self.app = app
        self.port = free_port()
        configure = configure or (lambda app, host, port, log_level: uvicorn.Config(app, host=host, port=port,
                                                                                    log_level=log_level))
        self.server = uvicorn.Server(configure(app, "127.0.0.1", self.port, "warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), "uvicorn to start")
        if not self.server.started:
            raise RuntimeError("uvicorn did not start")
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


WORDS = "the area is 12 5 = 60 half of so we compute x + y and eggs per day sells remainder market".split()


def sample_text(tag: str, j: int) -> str:
    rng = np.random.RandomState(zlib.crc32(f"{tag}|{j}".encode()))
    steps = [f"{tag} sample {j}: " + " ".join(rng.choice(WORDS, size=rng.randint(2, 8)))
             for _ in range(rng.randint(1, 4))]
    return "\n\n".join(steps) + f"\n\nso the answer is \\boxed{{{rng.randint(1, 4)}}}"


class FakePolicy:
    def __init__(self):
        self.delay = 0.0
        self.gate = threading.Event()  # completion calls wait here; open unless a test closes it
        self.gate.set()
        self.fail: list[int] = []  # statuses to answer with, one per call, before answering normally
        self.error_message = "boom"
        self.bodies: list[dict] = []
        self.calls = 0
        self.empty_sample = False
        self.mangle = None  # a function that may rewrite a response before it goes out
        self.app = self._build()

    def _next_failure(self):
        return self.fail.pop(0) if self.fail else None

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

        async def common(request: Request):
            self.calls += 1
            body = await request.json()
            self.bodies.append(body)
            if not self.gate.is_set():
                await asyncio.to_thread(self.gate.wait)
            if self.delay:
                await asyncio.sleep(self.delay)
            status = self._next_failure()
            if status is not None:
                return body, JSONResponse({"error": {"message": self.error_message}}, status_code=status)
            return body, None

        def out(data):
            return self.mangle(data) if self.mangle else data

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body, failure = await common(request)
            if failure is not None:
                return failure
            user = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
            text = user if isinstance(user, str) else " ".join(p.get("text", "") for p in user if p["type"] == "text")
            tag = re.search(r"request \d+", text)
            tag = tag.group(0) if tag else "request ?"
            choices = [{"index": j, "message": {"role": "assistant", "content": sample_text(tag, j)},
                        "finish_reason": "stop"} for j in range(body["n"])]
            if self.empty_sample:
                choices[0]["message"]["content"] = ""
            choices.reverse()  # servers need not order choices; the reranker must use "index"
            return out({"id": "x", "object": "chat.completion", "model": body["model"], "choices": choices,
                        "usage": {"prompt_tokens": len(text), "completion_tokens": 1, "total_tokens": len(text) + 1}})

        @app.post("/v1/completions")
        async def completions(request: Request):
            body, failure = await common(request)
            if failure is not None:
                return failure
            prompt = body["prompt"]
            token_ids = not isinstance(prompt, str) and isinstance(prompt[0], (int, list))
            if isinstance(prompt, str) or (token_ids and isinstance(prompt[0], int)):
                prompt = [prompt]
            choices = []
            for p, one in enumerate(prompt):
                text = one if isinstance(one, str) else f"request {one[0]}: tokens"  # token ids: the first names it
                tag = re.search(r"request \d+", text)
                tag = tag.group(0) if tag else "request ?"
                for j in range(body["n"]):
                    sample = sample_text(tag, j)
                    choices.append({"index": p * body["n"] + j, "text": (text + sample) if body.get("echo") else sample,
                                    "finish_reason": "stop"})
            return out({"id": "y", "object": "text_completion", "model": body["model"], "choices": choices,
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

        return app


@pytest.fixture(scope="module")
def prm(shepherd_dir):
    """The text-only PRM the server tests score with (import this fixture into a test module), its rewards
    spread over (0, 1) so comparisons with the reference engine can fail (spread_models)."""
    return spread_models.spread_prm(PRM.from_pretrained(shepherd_dir, format="math-shepherd", dtype=torch.float32))


@pytest.fixture
def policy():
    """A FakePolicy serving on 127.0.0.1; its gate is opened again at the end, so no call stays blocked."""
    fake = FakePolicy()
    with ServerThread(fake.app) as srv:
        fake.url = srv.url + "/v1"
        yield fake
        fake.gate.set()


def reranker(prm, policy_url, **options) -> ServerThread:
    config = ServerConfig(policy_url=policy_url, **{"n": 4, "retries": 2, "backoff_s": 0.01, **options})
    return ServerThread(create_app(prm, config), uvicorn_config)


def chat(text: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": text}], **extra}


def image_chat(url: str, text: str = "request 1: what is shown?", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}], **extra}


def check_choices(prm, question, data, tag=None):
    """Choices are best first, their rewards are the reference engine's for (question, text) (within TOL, the
    ranking of every pair it separates kept), and they belong to `tag`."""
    scores = [c["prm"]["score"] for c in data["choices"]]
    assert scores == sorted(scores, reverse=True)
    texts = [c["message"]["content"] if "message" in c else c["text"] for c in data["choices"]]
    spread_models.assert_matches([c["prm"]["step_rewards"] for c in data["choices"]],
                                 prm.score(question, texts, engine="reference"))
    if tag is not None:
        assert all(f"{tag} sample" in t for t in texts), (tag, texts)


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data: costs nothing until decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])  # 1-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")
