"""The server's errors and their OpenAI-style bodies: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

__all__ = ["APIError", "UpstreamError", "error_body"]


class APIError(Exception):
    """An HTTP error for the client.  ``code``: OpenAI's string code where it has one, else the status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = status if code is None else code


class UpstreamError(APIError):
    def __init__(self, status: int, message: str):
        super().__init__(status, message, type="upstream_error")


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
