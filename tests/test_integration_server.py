"""The reranking server against a fake OpenAI-compatible policy (FastAPI on 127.0.0.1), with a real PRM."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

fastapi = pytest.importorskip("fastapi", reason="the server tests need the 'serve' extra (fastapi, uvicorn, httpx)")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import server_fakes  # noqa: E402
from PIL import Image  # noqa: E402
from server_fakes import MODEL, TOL, free_port  # noqa: E402
from server_fakes import chat as _chat  # noqa: E402
from server_fakes import check_choices as _check_choices  # noqa: E402
from server_fakes import data_url as _data_url  # noqa: E402
from server_fakes import reranker as _reranker  # noqa: E402

from mmprm_infer.cli import build_parser  # noqa: E402
from mmprm_infer.integrations.serve import PRMBatcher, ServerConfig  # noqa: E402

# the fixtures these tests take (assigned, not imported: a linter would drop an "unused" import)
prm, policy = server_fakes.prm, server_fakes.policy

# --------------------------------------------------------------------------
# happy paths
# --------------------------------------------------------------------------


def test_chat_returns_best_of_n(prm, policy):
    with _reranker(prm, policy.url) as srv:
        q = "request 1: what is 2 + 3?"
        data = httpx.post(srv.url + "/v1/chat/completions", json=_chat(q, temperature=0.7, max_tokens=20)).json()
        assert policy.bodies[-1]["n"] == 4 and policy.bodies[-1]["model"] == "fake-policy"
        assert policy.bodies[-1]["temperature"] == 0.7 and "question" not in policy.bodies[-1]
        assert len(data["choices"]) == 1 and data["choices"][0]["index"] == 0
        summary = data["prm"]
        assert summary["samples"] == 4 and len(summary["scores"]) == 4 and summary["aggregate"] == "min"
        best = data["choices"][0]["prm"]
        assert best["score"] == max(summary["scores"]) and best["sample_index"] == summary["best_sample_index"]
        assert best["rank"] == 0 and best["answer"] is not None
        _check_choices(prm, q, data, "request 1")
        assert data["usage"]["prompt_tokens"] == len(q)
        # the client's n: top 3 of max(server n, best_of) samples
        data = httpx.post(srv.url + "/v1/chat/completions", json=_chat(q, n=3, best_of=6)).json()
        assert policy.bodies[-1]["n"] == 6 and "best_of" not in policy.bodies[-1]
        assert [c["index"] for c in data["choices"]] == [0, 1, 2] and data["prm"]["samples"] == 6
        _check_choices(prm, q, data, "request 1")
        # a `question` field overrides the user message as the PRM's question
        data = httpx.post(srv.url + "/v1/chat/completions", json=_chat(q, question="What is 2 + 3?")).json()
        _check_choices(prm, "What is 2 + 3?", data)
        assert data["prm"]["question"] == "What is 2 + 3?"


def test_completions(prm, policy):
    with _reranker(prm, policy.url) as srv:
        data = httpx.post(srv.url + "/v1/completions", json={"prompt": "request 5: 7 * 8 =", "n": 2}).json()
        assert len(data["choices"]) == 2 and data["object"] == "text_completion"
        _check_choices(prm, "request 5: 7 * 8 =", data, "request 5")
        # two prompts at once: choices grouped per prompt, index = prompt * n + rank
        prompts = ["request 6: a", "request 7: b"]
        data = httpx.post(srv.url + "/v1/completions", json={"prompt": prompts, "n": 2}).json()
        assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
        for p, prompt in enumerate(prompts):
            sub = {"choices": data["choices"][2 * p:2 * p + 2]}
            _check_choices(prm, prompt, sub, f"request {6 + p}")
        # echo: the PRM scores the completion without the prompt
        data = httpx.post(srv.url + "/v1/completions", json={"prompt": "request 8: c", "echo": True}).json()
        text = data["choices"][0]["text"]
        assert text.startswith("request 8: c")
        expected = prm.score("request 8: c", [text[len("request 8: c"):]], engine="reference")[0]
        torch.testing.assert_close(torch.tensor(data["choices"][0]["prm"]["step_rewards"]), torch.tensor(expected),
                                   rtol=0, atol=TOL)


def test_unscorable_sample_is_ranked_last(prm, policy):
    policy.empty_sample = True
    with _reranker(prm, policy.url) as srv:
        data = httpx.post(srv.url + "/v1/chat/completions", json=_chat("request 2: q", n=4)).json()
        last = data["choices"][-1]["prm"]
        assert last["sample_index"] == 0 and last["score"] is None and "no steps" in last["error"]
        assert data["prm"]["scores"][0] is None
        assert all(c["prm"]["score"] is not None for c in data["choices"][:-1])


def test_prm_score_endpoint(prm, policy):
    with _reranker(prm, policy.url) as srv:
        cands = ["first we compute x\n\nthe answer is \\boxed{5}", ["half of 12 is 6", "so \\boxed{6}"], ""]
        r = httpx.post(srv.url + "/v1/prm/score", json={"question": "What?", "candidates": cands,
                                                        "aggregate": "last"})
        assert r.status_code == 200, r.text
        data = r.json()
        direct = prm.score("What?", cands[:2], engine="reference")
        for got, ref in zip(data["step_rewards"][:2], direct):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=0, atol=TOL)
        assert data["scores"][:2] == [pytest.approx(d[-1], abs=TOL) for d in direct]
        assert data["scores"][2] is None and data["step_rewards"][2] == [] and "2" in data["errors"]
        assert data["ranking"][-1] == 2 and data["best_index"] == data["ranking"][0]
        assert data["answers"][:2] == ["5", "6"]


def test_health_and_models(prm, policy):
    with _reranker(prm, policy.url) as srv:
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["id"] == "fake-policy"


# --------------------------------------------------------------------------
# concurrency: batching without mixing
# --------------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_never_mixed(prm, policy, monkeypatch):
    count = 32
    # The scorer starts its first batch only once every request is queued: one batch, whatever the machine's speed.
    collect, gated = PRMBatcher._collect, []

    async def collect_when_all_queued(self):
        if not gated:
            while self.queue.qsize() < count:
                await asyncio.sleep(0.005)
            gated.append(True)
        return await collect(self)

    monkeypatch.setattr(PRMBatcher, "_collect", collect_when_all_queued)

    async def run(url):
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i):
                if i % 2:
                    r = await client.post(url + "/v1/chat/completions", json=_chat(f"request {i}: what?", n=2))
                else:
                    r = await client.post(url + "/v1/completions",
                                          json={"model": MODEL, "prompt": f"request {i}: what?", "n": 2})
                return i, r
            return await asyncio.gather(*(one(i) for i in range(count)))

    with _reranker(prm, policy.url, batch_window_ms=0, max_queue=count) as srv:
        results = asyncio.run(run(srv.url))
        health = httpx.get(srv.url + "/health").json()
    assert len(results) == count
    for i, r in results:
        assert r.status_code == 200, r.text
        _check_choices(prm, f"request {i}: what?", r.json(), f"request {i}")
    # 32 requests, one PRM pass
    assert health["scored_requests"] == count
    assert health["scoring_batches"] == 1, health


# --------------------------------------------------------------------------
# failure modes
# --------------------------------------------------------------------------


def test_queue_full_gives_503(prm, policy):
    policy.gate.clear()  # the policy holds the admitted requests until the others were turned away

    async def run(url):
        async with httpx.AsyncClient(timeout=60) as client:
            admitted = [asyncio.ensure_future(client.post(url + "/v1/chat/completions", json=_chat(f"request {i}: q")))
                        for i in range(2)]
            while policy.calls < 2:  # both are in flight, at the policy
                await asyncio.sleep(0.005)
            turned_away = await asyncio.gather(*(client.post(url + "/v1/chat/completions",
                                                             json=_chat(f"request {i}: q")) for i in range(2, 6)))
            policy.gate.set()
            return await asyncio.gather(*admitted), turned_away

    with _reranker(prm, policy.url, max_queue=2) as srv:
        admitted, turned_away = asyncio.run(run(srv.url))
    codes = sorted(r.status_code for r in admitted + turned_away)
    assert codes.count(200) == 2 and codes.count(503) == 4, codes
    assert [r.status_code for r in admitted] == [200, 200]
    busy = turned_away[0]
    assert "limit of 2" in busy.json()["error"]["message"] and busy.headers["retry-after"] == "1"


def test_upstream_errors_are_retried_then_502(prm, policy):
    with _reranker(prm, policy.url, retries=2) as srv:
        httpx.get(srv.url + "/v1/models")  # learn the model name first
        policy.calls = 0
        policy.fail = [500, 503]  # two failures, then fine
        r = httpx.post(srv.url + "/v1/chat/completions", json=_chat("request 3: q"))
        assert r.status_code == 200 and policy.calls == 3
        policy.calls = 0
        policy.fail = [500, 500, 500]
        r = httpx.post(srv.url + "/v1/chat/completions", json=_chat("request 3: q"))
        assert r.status_code == 502 and policy.calls == 3
        # the kind of failure, never the policy's own error text or its address (nothing of the deployment exposed)
        message = r.json()["error"]["message"]
        assert "3 attempt" in message and "HTTP 500" in message
        assert "boom" not in message and policy.url.split("//")[1].split("/")[0] not in message


def test_upstream_bad_request_is_400(prm, policy):
    with _reranker(prm, policy.url) as srv:
        httpx.get(srv.url + "/v1/models")
        policy.fail = [400]
        policy.error_message = "max_tokens is too large"
        r = httpx.post(srv.url + "/v1/chat/completions", json=_chat("request 4: q", max_tokens=10 ** 9))
        assert r.status_code == 400 and "max_tokens is too large" in r.json()["error"]["message"]


def test_upstream_timeout_is_504(prm, policy):
    with _reranker(prm, policy.url, upstream_timeout=0.3, retries=1, policy_model="fake-policy") as srv:
        policy.gate.clear()  # the policy never answers while the test waits
        try:
            r = httpx.post(srv.url + "/v1/chat/completions", json=_chat("request 9: q"), timeout=30)
        finally:
            policy.gate.set()
        assert r.status_code == 504 and "timed out (2 attempt(s))" in r.json()["error"]["message"]
        assert policy.calls == 2


def test_upstream_down_is_502(prm):
    with _reranker(prm, f"http://127.0.0.1:{free_port()}/v1", retries=1) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json=_chat("request 10: q"))
        assert r.status_code == 502 and "ConnectError" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, needle", [
    ({"model": "m"}, "messages: Field required"),
    ({"messages": []}, "messages: List should have at least 1 item"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n: Input should be greater than or equal to 1"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "sometimes"}, "stream: Input should be a valid"),
    ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "no question for the PRM"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}},
                                                {"type": "text", "text": "q"}]}]}, "invalid base64"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                                                {"type": "text", "text": "q"}]}]}, "not fetched"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/no/such/file.png"}},
                                                {"type": "text", "text": "q"}]}]}, "local image paths are off"),
])
def test_bad_chat_requests_are_400(prm, policy, body, needle):
    # ignore_images: the text-only PRM reads the images (for the policy) instead of refusing them up front
    with _reranker(prm, policy.url, ignore_images=True) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"], r.json()
    assert policy.calls == 0  # nothing went upstream


def test_other_bad_requests(prm, policy):
    with _reranker(prm, policy.url) as srv:
        image = _data_url(Image.new("RGB", (8, 8), (1, 2, 3)))
        msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                            {"type": "text", "text": "q"}]}]
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": msg})
        assert r.status_code == 400 and "text-only" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/prm/score", json={"question": "q", "candidates": ["a"], "aggregate": "median"})
        assert r.status_code == 400 and "unknown aggregation" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/prm/score", json={"question": "q", "candidates": []})
        assert r.status_code == 400 and "candidates" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": ["a", "b"], "question": ["only one"]})
        assert r.status_code == 400 and "2 prompts" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/chat/completions", content=b"{not json",
                       headers={"content-type": "application/json"})
        assert r.status_code == 400
        r = httpx.get(srv.url + "/v1/no-such-endpoint")  # OpenAI-style error bodies for the framework's errors too
        assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"
    with pytest.raises(ValueError, match="policy_url"):
        ServerConfig(policy_url="127.0.0.1:8000")


def test_serve_cli_arguments():
    args = build_parser().parse_args(["serve", "--policy-url", "http://127.0.0.1:8000/v1", "--prm", "d", "--n", "16",
                                      "--batch-window-ms", "5", "--max-queue", "64", "--retries", "0"])
    assert (args.command, args.n, args.batch_window_ms, args.max_queue, args.retries) == ("serve", 16, 5.0, 64, 0)
    # aggregate None: the PRM format's release default, resolved when the app is built (rerank.resolve_aggregate)
    assert (args.host, args.port, args.aggregate, args.strategy, args.upstream_timeout) == (
        "127.0.0.1", 8080, None, "best_of_n", 60.0)


# --------------------------------------------------------------------------
# images reach the PRM
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mm_prm(image_sensitive_mm_prm):
    return image_sensitive_mm_prm


def test_images_go_to_the_prm(mm_prm, policy, tmp_path):
    rng = np.random.RandomState(0)
    img_a = Image.fromarray((rng.rand(40, 40, 3) * 255).astype("uint8"))
    img_b = Image.fromarray((rng.rand(40, 40, 3) * 255).astype("uint8"))
    path_b = tmp_path / "b.png"
    img_b.save(path_b)
    q = "request 11: what is the area?"
    with _reranker(mm_prm, policy.url, n=2, image_root=str(tmp_path)) as srv:
        results = {}
        for name, url, image in (("data", _data_url(img_a), img_a), ("path", str(path_b), img_b)):
            msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                {"type": "text", "text": q}]}]
            r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": msg, "n": 2})
            assert r.status_code == 200, r.text
            sent = policy.bodies[-1]["messages"][0]["content"][0]["image_url"]["url"]
            assert sent.startswith("data:image/")  # local files reach the policy as data URLs
            data = r.json()
            texts = [c["message"]["content"] for c in data["choices"]]
            ref = mm_prm.score(q, texts, image=image, engine="reference")
            for c, rewards in zip(data["choices"], ref):
                torch.testing.assert_close(torch.tensor(c["prm"]["step_rewards"]), torch.tensor(rewards),
                                           rtol=0, atol=TOL)
            results[name] = (texts, [c["prm"]["step_rewards"] for c in data["choices"]])
        assert sorted(results["data"][0]) == sorted(results["path"][0])  # same samples ...
        assert results["data"][1] != results["path"][1]  # ... scored against different images
        # outside --image-root
        msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/hostname"}},
                                            {"type": "text", "text": q}]}]
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": msg})
        assert (r.status_code == 400
                and "not an image file under the server's image root" in r.json()["error"]["message"])
        r = httpx.post(srv.url + "/v1/prm/score", json={"question": q, "candidates": ["a b", "c"],
                                                        "image": _data_url(img_a)})
        assert r.status_code == 200
        ref = mm_prm.score(q, ["a b", "c"], image=img_a, engine="reference")
        torch.testing.assert_close(torch.tensor(r.json()["step_rewards"]), torch.tensor(ref), rtol=0, atol=TOL)
