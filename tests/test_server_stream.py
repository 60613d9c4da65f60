"""Streaming: stream=true and token-id prompts on the reranking server.

The streams are parsed by hand (server-sent events, as the OpenAI wire
format defines them); when the ``openai`` package is installed, the official
client reads them too.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="the server tests need the 'serve' extra (fastapi, uvicorn, httpx)")
httpx = pytest.importorskip("httpx")

import server_fakes  # noqa: E402
from server_fakes import MODEL, chat, check_choices, reranker  # noqa: E402

# the fixtures these tests take (assigned, not imported: a linter would drop an "unused" import)
prm, policy = server_fakes.prm, server_fakes.policy


def _events(r) -> list:
    """The SSE data payloads of a response, checked to end with [DONE]."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in r.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    payloads = [line[len("data: "):] for line in lines]
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


def _joined(chunks, key) -> dict:
    """index -> (text, finish_reason) rebuilt from the chunks, as a streaming client does."""
    out = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            text, finish = out.get(c["index"], ("", None))
            piece = c["delta"].get("content") if key == "delta" else c["text"]
            out[c["index"]] = (text + (piece or ""), c["finish_reason"] or finish)
    return out


def test_chat_stream_sends_the_reranked_choices(prm, policy):
    q = "request 21: what is 2 + 3?"
    with reranker(prm, policy.url) as srv:
        plain = httpx.post(srv.url + "/v1/chat/completions", json=chat(q, n=2)).json()
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat(q, n=2, stream=True))
        chunks = _events(r)
    assert policy.bodies[-1]["stream"] is False and "stream_options" not in policy.bodies[-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and {c["model"] for c in chunks} == {MODEL}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    got = _joined(chunks, "delta")
    assert got == {c["index"]: (c["message"]["content"], "stop") for c in plain["choices"]}
    firsts = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"] is None]
    assert [f["prm"]["score"] for f in firsts] == [c["prm"]["score"] for c in plain["choices"]]
    assert chunks[-1]["prm"]["scores"] == plain["prm"]["scores"]
    check_choices(prm, q, {"choices": [{"message": {"content": got[i][0]}, "prm": f["prm"]}
                                       for i, f in enumerate(firsts)]}, "request 21")


def test_completion_stream_with_usage(prm, policy):
    with reranker(prm, policy.url) as srv:
        body = {"model": MODEL, "prompt": ["request 22: a", "request 23: b"], "n": 2}
        plain = httpx.post(srv.url + "/v1/completions", json=body).json()
        chunks = _events(httpx.post(srv.url + "/v1/completions",
                                    json={**body, "stream": True, "stream_options": {"include_usage": True}}))
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert _joined(chunks[:-1], "text") == {c["index"]: (c["text"], "stop") for c in plain["choices"]}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert [s["scores"] for s in chunks[-1]["prm"]] == [s["scores"] for s in plain["prm"]]


def test_stream_errors_are_plain_http_errors(prm, policy):
    with reranker(prm, policy.url) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat("q", model="nope", stream=True))
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_openai_client_streams(prm, policy):
    import openai  # in the dev extra: a missing client fails here rather than skipping
    with reranker(prm, policy.url, client_api_keys=("k",)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0)
        q = "request 24: what is 6 * 5?"
        plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], n=2)
        texts = {}
        for chunk in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], n=2,
                                                    stream=True):
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
        assert texts == {c.index: c.message.content for c in plain.choices}
        pieces = [c.choices[0].text for c in client.completions.create(model=MODEL, prompt="request 25: q",
                                                                        stream=True) if c.choices]
        assert "".join(pieces).startswith("request 25 sample")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()


# --------------------------------------------------------------------------
# token-id prompts
# --------------------------------------------------------------------------


def test_token_id_prompts_go_to_the_policy_as_given(prm, policy):
    with reranker(prm, policy.url) as srv:
        body = {"model": MODEL, "prompt": [[26, 1, 2], [27, 3]], "question": ["request 26: q", "request 27: q"], "n": 2}
        r = httpx.post(srv.url + "/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert policy.bodies[-1]["prompt"] == [[26, 1, 2], [27, 3]]
        data = r.json()
        for p in range(2):
            check_choices(prm, f"request {26 + p}: q", {"choices": data["choices"][2 * p:2 * p + 2]},
                          f"request {26 + p}")
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": [28, 5], "question": "request 28"})
        assert r.status_code == 200 and policy.bodies[-1]["prompt"] == [28, 5]
        # without 'question' the server cannot know the policy's tokenizer: it says so
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": [28, 5]})
        assert r.status_code == 400 and "'question'" in r.json()["error"]["message"]
        assert "--decode-token-prompts" in r.json()["error"]["message"]
        for bad in ([[1], []], [[-1]], [3, -1]):
            r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": bad, "question": ["a"] * 2})
            assert r.status_code == 400, r.text
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": [5], "question": "q", "echo": True})
        assert r.status_code == 400 and "echo" in r.json()["error"]["message"]


def test_token_id_prompts_decoded_with_the_prm_tokenizer(prm, policy):
    ids = prm.tokenizer("request 29: what is 7 * 8?", add_special_tokens=False)["input_ids"]
    question = prm.tokenizer.decode(ids, skip_special_tokens=True)
    with reranker(prm, policy.url, decode_token_prompts=True) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": [ids], "n": 2})
        assert r.status_code == 200, r.text
    check_choices(prm, question, r.json())
