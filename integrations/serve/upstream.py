"""The upstream policy server: POSTs with timeouts and retries; its failures become 400/502/504.

What a client learns of a failure is the kind of failure and the status: never the policy's URL, and
never the text of the policy's own errors (which may carry its internals), except a 400/422's message --
the policy's word on the client's own request -- with the policy's address and key taken out.  The full
detail goes to the server's log.  The policy's answer is read up to a byte limit (``max_bytes``), and must
be strict JSON whose strings are text: NaN or a lone surrogate in it is a 502, not a 500 later.
"""

from __future__ import annotations

import asyncio
import json
import logging
from urllib.parse import urlsplit

import httpx

from mmprm_infer.integrations.serve.errors import APIError, UpstreamError
from mmprm_infer.integrations.serve.options import ServerConfig
from mmprm_infer.io.files import lone_surrogate

__all__ = ["Upstream"]

log = logging.getLogger("mmprm.server")

MODELS_MAX_BYTES = 2 ** 20  # the answer of GET /models


class _TooLarge(Exception):
    pass


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
            data = await self._request("GET", "/models", None, MODELS_MAX_BYTES)
            models = data.get("data") if isinstance(data, dict) else None
            first = models[0] if isinstance(models, list) and models and isinstance(models[0], dict) else {}
            if not isinstance(first.get("id"), str) or not first["id"]:
                raise UpstreamError(502, "the policy lists no model at /models; start it with a model or pass "
                                         "--policy-model")
            self._model = first["id"]
        return self._model

    async def post(self, path: str, body: dict, max_bytes: int) -> dict:
        """The policy's JSON answer to ``body``; an answer over ``max_bytes`` is a 502 (not read on)."""
        return await self._request("POST", path, body, max_bytes)

    async def _send(self, method: str, url: str, body: dict | None, max_bytes: int) -> tuple[int, bytes]:
        async with self.client.stream(method, url, json=body) as resp:
            declared = resp.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise _TooLarge(int(declared))
            data = bytearray()
            async for chunk in resp.aiter_bytes():
                data += chunk
                if len(data) > max_bytes:
                    raise _TooLarge(len(data))
            return resp.status_code, bytes(data)

    async def _request(self, method: str, path: str, body: dict | None, max_bytes: int) -> dict:
        url = self.base + path
        last: str = ""
        timed_out = False
        for attempt in range(self.config.retries + 1):
            self.calls += 1
            try:
                status, content = await self._send(method, url, body, max_bytes)
            except _TooLarge as exc:
                log.warning("the policy's answer to %s %s exceeded %d bytes (%s read)", method, path, max_bytes, exc)
                raise UpstreamError(502, f"the policy's answer is larger than this server reads for this request "
                                         f"({max_bytes} bytes: --max-text-chars per sample); ask for fewer or shorter "
                                         "samples (max_tokens)") from None
            except httpx.TimeoutException:
                timed_out, last = True, f"no answer within {self.config.upstream_timeout:g} s"
            except httpx.TransportError as exc:
                log.warning("the policy at %s: %s: %s", url, type(exc).__name__, exc)
                timed_out, last = False, f"{type(exc).__name__} (the policy could not be reached)"
            else:
                if status < 400:
                    return _answer(content, method, path)
                detail = _error_message(content)
                log.warning("the policy at %s answered HTTP %d: %s", url, status, detail)
                if status in (400, 422):
                    raise APIError(400, f"the policy rejected the request: {self._redact(detail)}")
                if status != 429 and status < 500:
                    raise UpstreamError(502, f"the policy answered HTTP {status} (its message is in this server's "
                                             "log)")
                timed_out, last = False, f"HTTP {status}"
            if attempt < self.config.retries:
                await asyncio.sleep(self.config.backoff_s * (2 ** attempt))
        tries = self.config.retries + 1
        if timed_out:
            raise UpstreamError(504, f"the policy timed out ({tries} attempt(s)); last: {last}")
        raise UpstreamError(502, f"the policy failed ({tries} attempt(s)); last error: {last} (details are in this "
                                 "server's log)")

    def _redact(self, text: str) -> str:
        """``text`` without the policy's address and key."""
        parts = urlsplit(self.base)
        for secret in (self.config.api_key, self.base, parts.netloc, parts.hostname):
            if secret:
                text = text.replace(secret, "[policy]")
        return text


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _answer(content: bytes, method: str, path: str) -> dict:
    """The policy's answer as strict JSON (no NaN/Infinity) whose strings are text (no lone surrogate)."""
    try:
        data = json.loads(content, parse_constant=_reject_constant)
    except ValueError as exc:
        log.warning("the policy's answer to %s %s is not JSON (%s): %r", method, path, exc, content[:200])
        raise UpstreamError(502, "the policy answered with something that is not JSON (NaN and Infinity are not "
                                 "JSON either)") from None
    where = lone_surrogate(data)
    if where is not None:
        raise UpstreamError(502, f"the policy's answer holds a lone UTF-16 surrogate in {where}, which is not text")
    return data


def _error_message(content: bytes) -> str:
    """The message of the policy's error answer, as text (at most 500 characters)."""
    try:
        data = json.loads(content)
    except ValueError:
        return content[:500].decode("utf-8", "replace")
    err = data.get("error", data.get("detail", data)) if isinstance(data, dict) else data
    text = str(err.get("message", err) if isinstance(err, dict) else err)[:500]
    return text.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate becomes "?"
