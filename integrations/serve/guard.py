"""ASGI middleware in front of the app: the client key (401) and the body-size cap (413).

Plain ASGI rather than a FastAPI dependency, so both checks run before any
of the body is parsed: an unauthenticated or oversized upload costs at most
``max_body_bytes`` of buffering, whatever its Content-Length says.
"""

from __future__ import annotations

import hmac
import json

from mmprm_infer.integrations.serve.errors import error_body

__all__ = ["Guard"]

OPEN_PATHS = ("/health",)  # for load balancers and probes, which hold no key


class Guard:
    def __init__(self, app, keys: tuple[str, ...] = (), max_body_bytes: int = 16 * 2 ** 20):
        self.app = app
        self.keys = tuple(k.encode() for k in keys)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        if self.keys and scope.get("path") not in OPEN_PATHS and not self._authorized(headers.get(b"authorization")):
            return await _reply(send, 401, error_body(
                "missing or wrong API key: send 'Authorization: Bearer <key>' with a key this server was given "
                "(--client-api-key-file or $MMPRM_SERVER_API_KEY)", code="invalid_api_key"),
                [(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await self._too_large(send)
        body, more = bytearray(), True
        while more:  # a chunked or lying body is counted as it arrives
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await self._too_large(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # later calls wait for the client to leave (http.disconnect)
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def _authorized(self, header: bytes | None) -> bool:
        scheme, _, key = (header or b"").partition(b" ")
        key = key.strip()
        # compare_digest against every key: the time taken does not depend on how much of a key matched
        return scheme.lower() == b"bearer" and sum(hmac.compare_digest(key, k) for k in self.keys) > 0

    async def _too_large(self, send):
        await _reply(send, 413, error_body(
            f"the request body is larger than this server's limit of {self.max_body_bytes} bytes (--max-body-bytes); "
            "send fewer or smaller images, or shorter texts", code="request_too_large"))


async def _reply(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})
