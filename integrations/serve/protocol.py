"""The server's side of the OpenAI API: request models, the policy's answers read, reranked responses built.

Requests are pydantic models (unknown sampling fields pass through to the
policy as given).  ``policy_choices`` checks what the policy answered;
``ranked_choices`` / ``summary`` / ``response`` put the PRM's ranking into
an OpenAI-shaped response: each choice carries ``prm`` (score, step
rewards, rank, sample index, answer, error), the response a ``prm`` summary.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mmprm_infer.integrations.serve.errors import UpstreamError
from mmprm_infer.rerank import RerankResult

__all__ = ["ImageURL", "ContentPart", "ChatMessage", "Sampling", "ChatCompletionRequest", "CompletionRequest",
           "ScoreRequest", "text_of", "finite_or_none", "policy_choices", "ranked_choices", "summary", "response"]


# --------------------------------------------------------------------------
# requests
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


class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # temperature, max_tokens, stop, seed, ... go to the policy as given
    model: str | None = None
    n: int = Field(1, ge=1)  # n, best_of and the prompts are capped together by --max-samples
    best_of: int | None = Field(None, ge=1, description="samples to draw and rerank")
    stream: bool = False
    stream_options: dict | None = None  # include_usage is honoured; never sent to the policy (asked stream=false)


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    question: str | None = None  # the PRM's question (default: the last user message's text)


class CompletionRequest(Sampling):
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


def text_of(content) -> str:
    """A message's text: the string, or its text parts joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.text for p in content if p.type == "text" and p.text)


# --------------------------------------------------------------------------
# the policy's answer
# --------------------------------------------------------------------------


def policy_choices(data, expected: int, field: str) -> list[dict]:
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


# --------------------------------------------------------------------------
# the reranked response
# --------------------------------------------------------------------------


def finite_or_none(x: float | None) -> float | None:
    """A score for JSON: ``-inf`` (unscored) becomes None."""
    return x if x is not None and math.isfinite(x) else None


def _prm_field(result: RerankResult, i: int, rank: int) -> dict:
    return {
        "score": finite_or_none(result.scores[i]) if result.scores is not None else None,
        "step_rewards": result.step_rewards[i] if result.step_rewards is not None else None,
        "rank": rank,
        "sample_index": i,
        "answer": result.answers[i],
        "error": result.errors.get(i),
    }


def summary(result: RerankResult, samples: int) -> dict:
    """The response's ``prm`` field: how the samples were ranked and their scores."""
    return {
        "aggregate": result.aggregate,
        "strategy": result.strategy,
        "samples": samples,
        "scores": [finite_or_none(s) for s in result.scores] if result.scores is not None else None,
        "best_sample_index": result.best_index,
    }


def ranked_choices(choices: list[dict], result: RerankResult, n: int, first_index: int = 0) -> list[dict]:
    """The best n choices, best first, each with its prm field; ``index`` counts on from first_index."""
    out = []
    for rank, i in enumerate(result.ranking[:n]):
        choice = dict(choices[i])
        choice["index"] = first_index + rank
        choice["prm"] = _prm_field(result, i, rank)
        out.append(choice)
    return out


def response(upstream: dict, model: str, obj: str, choices: list[dict], prm_summary) -> dict:
    usage = upstream.get("usage")
    return {
        "id": f"{'chatcmpl' if obj == 'chat.completion' else 'cmpl'}-prm-{uuid.uuid4().hex[:24]}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage if isinstance(usage, dict) else None,
        "prm": prm_summary,
    }
