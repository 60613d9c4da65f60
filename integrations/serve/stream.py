"""``stream=true``: a finished, reranked response replayed as OpenAI streaming chunks (server-sent events).

The server must see every sample before it can pick the best, so nothing is
streamed while the policy generates; once scoring is done each chosen
choice goes out as standard ``chat.completion.chunk`` / ``text_completion``
chunks -- its whole text in one chunk, then one with its finish_reason --
and ``data: [DONE]`` ends the stream, which is what OpenAI clients parse.
Per-choice ``prm`` fields ride on the text chunks; the response's ``prm``
summary on the last chunk.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from fastapi.responses import StreamingResponse

__all__ = ["stream_response"]


def stream_response(response: dict, include_usage: bool = False) -> StreamingResponse:
    chunks = list(_chat_chunks(response) if response["object"] == "chat.completion" else _text_chunks(response))
    if include_usage:  # OpenAI's stream_options.include_usage: usage null, then a last chunk with no choices
        for chunk in chunks:
            chunk["usage"] = None
        chunks.append({**_head(response), "choices": [], "usage": response.get("usage")})
    chunks[-1]["prm"] = response["prm"]
    events = [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
    return StreamingResponse(iter(events), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _head(response: dict) -> dict:
    obj = "chat.completion.chunk" if response["object"] == "chat.completion" else "text_completion"
    return {"id": response["id"], "object": obj, "created": response["created"], "model": response["model"]}


def _chat_chunks(response: dict) -> Iterator[dict]:
    for choice in response["choices"]:
        message = choice.get("message") or {}
        delta = {"role": message.get("role", "assistant"), "content": message.get("content") or ""}
        if message.get("tool_calls"):  # streamed tool calls carry their position in the list
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        yield {**_head(response), "choices": [{"index": choice["index"], "delta": delta,
                                               "logprobs": choice.get("logprobs"), "finish_reason": None,
                                               "prm": choice.get("prm")}]}
        yield {**_head(response), "choices": [{"index": choice["index"], "delta": {}, "logprobs": None,
                                               "finish_reason": choice.get("finish_reason") or "stop"}]}


def _text_chunks(response: dict) -> Iterator[dict]:
    for choice in response["choices"]:
        yield {**_head(response), "choices": [{"index": choice["index"], "text": choice.get("text") or "",
                                               "logprobs": choice.get("logprobs"), "finish_reason": None,
                                               "prm": choice.get("prm")}]}
        yield {**_head(response), "choices": [{"index": choice["index"], "text": "", "logprobs": None,
                                               "finish_reason": choice.get("finish_reason") or "stop"}]}
