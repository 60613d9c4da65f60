"""Policy protocol, TransformersPolicy (tiny local models) and OpenAIPolicy (a local stdlib HTTP server)."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from mmprm_infer.integrations.policy import OpenAIPolicy, TransformersPolicy
from mmprm_infer.policy import (
    DEFAULT_SAMPLING,
    Policy,
    PolicyError,
    PolicyPrompt,
    join_steps,
    sampling_options,
    split_steps,
)


def test_prompt_defaults_and_helpers():
    p = PolicyPrompt("q")
    assert p.images == [] and p.partial_steps == []
    assert PolicyPrompt("q").images is not p.images
    assert split_steps(" a \n\n\n\nb\n\n ") == ["a", "b"]
    assert join_steps(["a ", " b"]) == "a\n\nb"
    assert (DEFAULT_SAMPLING["temperature"] == 1.0 and DEFAULT_SAMPLING["top_p"] == 0.9
            and DEFAULT_SAMPLING["top_k"] == 50)
    assert sampling_options(DEFAULT_SAMPLING, {"top_k": 5})["top_k"] == 5
    with pytest.raises(TypeError, match="unknown sampling option"):
        sampling_options(DEFAULT_SAMPLING, {"temprature": 0.5})
    with pytest.raises(ValueError, match="top_p"):
        sampling_options(DEFAULT_SAMPLING, {"top_p": 0})


# --------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmprm_infer.testing.tiny import build_tiny_causal_lm

    path = build_tiny_causal_lm(tmp_path_factory.mktemp("policy_lm"), arch="qwen2", seed=5)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_transformers_policy_prompt_continues_the_assistant_turn(tiny_lm):
    model, tok = tiny_lm
    pol = TransformersPolicy(model, tok, system_prompt="Be brief.")
    assert isinstance(pol, Policy)
    fresh = pol.build_prompt(PolicyPrompt("What is 2 + 3?"))
    assert fresh.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWhat is 2 + 3?<|im_end|>" in fresh
    assert "<|im_start|>system\nBe brief.<|im_end|>" in fresh
    cont = pol.build_prompt(PolicyPrompt("What is 2 + 3?", partial_steps=["Step one.", "Step two."]))
    assert cont.endswith("<|im_start|>assistant\nStep one.\n\nStep two.\n\n")
    assert "<|im_end|>" not in cont.split("<|im_start|>assistant\n")[-1]


def test_transformers_policy_samples_n_per_prompt_reproducibly(tiny_lm):
    model, tok = tiny_lm
    prompts = [PolicyPrompt("What is 2 + 3?"), PolicyPrompt("Add 4 and 5.", partial_steps=["4 + 5 = 9."])]
    pol = TransformersPolicy(model, tok, seed=11, batch_size=3, max_new_tokens=6)
    out = pol.generate(prompts, n=3)
    assert len(out) == 2 and all(len(x) == 3 and all(isinstance(s, str) for s in x) for x in out)
    again = TransformersPolicy(model, tok, seed=11, batch_size=3, max_new_tokens=6).generate(prompts, n=3)
    assert again == out
    assert pol.generate(prompts, n=3) != out  # the next call samples afresh
    greedy = pol.generate(prompts[:1], n=2, temperature=0.0)
    assert greedy[0][0] == greedy[0][1]
    with pytest.raises(ValueError, match="takes no images"):
        pol.generate([PolicyPrompt("q", images=[Image.new("RGB", (8, 8))])], n=1)
    assert len(TransformersPolicy(model, tok, ignore_images=True, max_new_tokens=2).generate(
        [PolicyPrompt("q", images=[Image.new("RGB", (8, 8))])], n=1)[0]) == 1
    with pytest.raises(ValueError, match="positive integer"):
        pol.generate(prompts, n=0)


def test_transformers_policy_with_an_internvl_image(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from mmprm_infer.testing.tiny_internvl import build_tiny_internvl

    path = build_tiny_internvl(tmp_path / "vl", seed=1)
    model = AutoModelForImageTextToText.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    pol = TransformersPolicy(model, tok, seed=0, max_new_tokens=3, image_config=None)
    img = Image.new("RGB", (200, 160), "white")
    prompts = [PolicyPrompt("What does the table show?", [img], ["Row 1 is 1, 2, 3."]),
               PolicyPrompt("And this one?", [img])]
    enc = pol._encode(prompts)
    assert enc["pixel_values"].shape[0] == 2  # one tile per image
    ids = enc["input_ids"]
    assert int((ids == model.config.image_token_id).sum()) == 2 * model.config.image_seq_length
    out = pol.generate(prompts, n=2)
    assert [len(x) for x in out] == [2, 2]


# --------------------------------------------------------------------------
# OpenAI-compatible HTTP (a stdlib server on 127.0.0.1)
# --------------------------------------------------------------------------


class _Server:
    def __init__(self):
        self.requests: list[dict] = []
        self.fail_next: list[int] = []  # status codes to answer before succeeding
        self.max_choices: int | None = None
        self.bad_body = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                if server.fail_next:
                    code = server.fail_next.pop(0)
                    self._send(code, {"error": {"message": f"status {code}"}})
                    return
                if server.bad_body:
                    self._send(200, {"nothing": True})
                    return
                n = body.get("n", 1)
                if server.max_choices:
                    n = min(n, server.max_choices)
                k = len(server.requests)
                self._send(200, {"choices": [{"index": i, "message": {"role": "assistant",
                                                                       "content": f" Step {k}.{i}\n\nThe answer is 1."}}
                                             for i in range(n)]})

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def test_openai_policy_request_and_prefill(server):
    pol = OpenAIPolicy(server.url, "my-model", api_key="sk-test", top_k=20, max_new_tokens=64, backoff_s=0.01)
    assert isinstance(pol, Policy)
    assert pol.backend in ("httpx", "urllib")
    img = Image.new("RGB", (10, 10), "red")
    out = pol.generate([PolicyPrompt("Q?", [img], ["First step."])], n=3, temperature=0.7)
    assert out == [["Step 1.0\n\nThe answer is 1.", "Step 1.1\n\nThe answer is 1.", "Step 1.2\n\nThe answer is 1."]]
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    b = req["body"]
    assert b["model"] == "my-model" and b["n"] == 3 and b["temperature"] == 0.7 and b["top_p"] == 0.9
    assert b["top_k"] == 20 and b["max_tokens"] == 64
    assert b["continue_final_message"] is True and b["add_generation_prompt"] is False
    roles = [m["role"] for m in b["messages"]]
    assert roles == ["system", "user", "assistant"]
    assert b["messages"][2]["content"] == "First step.\n\n"
    parts = b["messages"][1]["content"]
    assert parts[-1] == {"type": "text", "text": "Q?"}
    url = parts[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (10, 10)


def test_openai_policy_fresh_prompt_and_prompt_mode(server, tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(path)
    pol = OpenAIPolicy(server.url, "m", send_top_k=False, system_prompt=None, continuation="prompt", max_concurrency=4)
    out = pol.generate([PolicyPrompt("A?", [str(path)], ["s1", "s2"]), PolicyPrompt("B?")], n=2)
    assert [len(x) for x in out] == [2, 2]
    bodies = sorted((r["body"] for r in server.requests), key=lambda b: str(b["messages"]))
    for b in bodies:
        assert "top_k" not in b and "continue_final_message" not in b
        assert [m["role"] for m in b["messages"]] == ["user"]
    texts = [json.dumps(b["messages"]) for b in bodies]
    assert any("Previous steps:\\ns1\\n\\ns2" in t for t in texts)
    assert all(r["auth"] is None for r in server.requests)


def test_openai_policy_retries_then_fails_clearly(server):
    server.fail_next = [503, 429]
    pol = OpenAIPolicy(server.url, "m", retries=3, backoff_s=0.01)
    assert len(pol.generate([PolicyPrompt("Q")], n=2)[0]) == 2
    assert len(server.requests) == 3
    server.fail_next = [500] * 5
    with pytest.raises(PolicyError, match="failed 3 times"):
        OpenAIPolicy(server.url, "m", retries=2, backoff_s=0.01).generate([PolicyPrompt("Q")], n=1)
    server.fail_next = [400]
    with pytest.raises(PolicyError, match="refused.*400"):
        pol.generate([PolicyPrompt("Q")], n=1)
    server.fail_next = []
    server.bad_body = True
    with pytest.raises(PolicyError, match="without choices"):
        pol.generate([PolicyPrompt("Q")], n=1)
    dead = OpenAIPolicy("http://127.0.0.1:9/v1", "m", retries=1, backoff_s=0.01, timeout=2)
    with pytest.raises(PolicyError, match="failed 2 times"):
        dead.generate([PolicyPrompt("Q")], n=1)


def test_openai_policy_asks_again_when_a_server_ignores_n(server):
    server.max_choices = 1
    out = OpenAIPolicy(server.url, "m").generate([PolicyPrompt("Q")], n=3)
    assert len(out[0]) == 3 and len(server.requests) == 3
    assert [r["body"]["n"] for r in server.requests] == [3, 2, 1]


def test_synthetic_policy_is_a_policy():
    from mmprm_infer.train.synthetic.policy import SyntheticPolicy

    assert isinstance(SyntheticPolicy(), Policy)
