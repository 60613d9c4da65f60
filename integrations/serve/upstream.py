"""The upstream policy server: POSTs with timeouts and retries; its failures become 400/502/504."""

from __future__ import annotations

import asyncio

import httpx

from mmprm_infer.integrations.serve.errors import APIError, UpstreamError
from mmprm_infer.integrations.serve.options import ServerConfig

__all__ = ["Upstream"]


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
            models = data.get("data") if isinstance(data, dict) else None
            first = models[0] if isinstance(models, list) and models and isinstance(models[0], dict) else {}
            if not isinstance(first.get("id"), str) or not first["id"]:
                raise UpstreamError(502, f"the policy at {self.base}/models lists no model; start it with a model "
                                         "or pass --policy-model")
            self._model = first["id"]
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
                        raise UpstreamError(
                            502, f"the policy at {url} answered with non-JSON: {resp.text[:200]!r}"
                        ) from None
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
