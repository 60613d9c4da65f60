"""Server safety (and serve's option checks): what a client can make the reranking server do.

Each test failed against the server before the fix
(checked by running this file against the previous commit's code).
"""

from __future__ import annotations

import base64
import os
import threading

import pytest

pytest.importorskip("fastapi", reason="the server tests need the 'serve' extra (fastapi, uvicorn, httpx)")
httpx = pytest.importorskip("httpx")

import server_fakes  # noqa: E402
from PIL import Image, ImageFile  # noqa: E402
from server_fakes import MODEL, chat, data_url, image_chat, png_header_only, reranker  # noqa: E402

from mmprm_infer.cli import main  # noqa: E402
from mmprm_infer.integrations.serve import ServerConfig  # noqa: E402
from mmprm_infer.io import records as records_module  # noqa: E402

# the fixtures these tests take (assigned, not imported: a linter would drop an "unused" import)
prm, policy = server_fakes.prm, server_fakes.policy


@pytest.fixture
def pixel_loads(monkeypatch):
    """Counts full decodes (ImageFile.load) anywhere in the process, the server's threads included."""
    calls = []
    load = ImageFile.ImageFile.load

    def counting(self):
        calls.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting)
    return calls


def _png(path, size=(16, 16), color=(10, 200, 30)):
    Image.new("RGB", size, color).save(path)
    return str(path)


def _error(r) -> dict:
    return r.json()["error"]


# --------------------------------------------------------------------------
# 6. the server's files
# --------------------------------------------------------------------------


def test_local_paths_are_off_without_image_root(prm, policy, tmp_path):
    png = _png(tmp_path / "secret.png")
    os.makedirs(tmp_path / "sub")
    urls = [png, "file://" + png, str(tmp_path / "sub" / ".." / "secret.png"), "../../../etc/hostname"]
    with reranker(prm, policy.url, ignore_images=True) as srv:
        for url in urls:
            r = httpx.post(srv.url + "/v1/chat/completions", json=image_chat(url))
            assert r.status_code == 400 and "local image paths are off" in _error(r)["message"], (url, r.text)
    assert policy.calls == 0  # the file never reached the policy as a data URL


def test_local_path_failures_are_indistinguishable(prm, policy, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    good = _png(root / "good.png")
    secret = _png(outside / "secret.png")
    (root / "notes.txt").write_text("not an image")
    (root / "dir.png").mkdir()
    (root / "escape.png").symlink_to(secret)
    bad = {"missing": str(root / "missing.png"), "directory": str(root / "dir.png"),
           "not an image": str(root / "notes.txt"), "outside the root": secret,
           "dot-dot": "../outside/secret.png", "symlink escape": str(root / "escape.png"),
           "file URL outside": "file://" + secret, "system file": "/etc/hostname"}
    with reranker(prm, policy.url, ignore_images=True, image_root=str(root)) as srv:
        messages = {}
        for what, url in bad.items():
            r = httpx.post(srv.url + "/v1/chat/completions", json=image_chat(url))
            assert r.status_code == 400, (what, r.text)
            messages[what] = _error(r)["message"].replace(repr(url), "<url>")
        assert len(set(messages.values())) == 1, messages  # no existence oracle
        assert "is not an image file under the server's image root" in messages["missing"]
        assert policy.calls == 0
        for url in (good, "good.png", "file://" + good):  # inside the root: allowed, relative to it too
            r = httpx.post(srv.url + "/v1/chat/completions", json=image_chat(url))
            assert r.status_code == 200, (url, r.text)
            sent = policy.bodies[-1]["messages"][0]["content"][0]["image_url"]["url"]
            assert sent == "data:image/png;base64," + base64.b64encode((root / "good.png").read_bytes()).decode()


def test_text_only_prm_refuses_images_before_opening_them(prm, policy, tmp_path, monkeypatch):
    opened = []
    image_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or image_open(*a, **k))
    png = _png(tmp_path / "a.png")
    with reranker(prm, policy.url, image_root=str(tmp_path)) as srv:
        for url in (png, data_url(Image.open(png))):
            opened.clear()
            r = httpx.post(srv.url + "/v1/chat/completions", json=image_chat(url))
            assert r.status_code == 400 and "text-only" in _error(r)["message"]
            assert opened == []
        r = httpx.post(srv.url + "/v1/prm/score", json={"question": "q", "candidates": ["a"], "image": png})
        assert r.status_code == 400 and "text-only" in _error(r)["message"] and opened == []


# --------------------------------------------------------------------------
# 7. nothing blocks the event loop
# --------------------------------------------------------------------------


def test_fifo_is_refused_without_being_opened(prm, policy, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with reranker(prm, policy.url, ignore_images=True, image_root=str(tmp_path)) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json=image_chat(str(fifo)), timeout=20)
        assert r.status_code == 400 and "not an image file under" in _error(r)["message"]
        assert httpx.get(srv.url + "/health", timeout=20).json()["status"] == "ok"
    for dev in ("/dev/zero", "/dev/stdin"):  # devices: same refusal, never read
        with reranker(prm, policy.url, ignore_images=True, image_root="/dev") as srv:
            r = httpx.post(srv.url + "/v1/chat/completions", json=image_chat(dev), timeout=20)
            assert r.status_code == 400 and "not an image file under" in _error(r)["message"]


@pytest.fixture
def blocking_decode(monkeypatch):
    """Full decodes wait until the test opens `release`; `entered` says one has started."""
    entered, release = threading.Event(), threading.Event()
    load = ImageFile.ImageFile.load

    def blocked(self):
        entered.set()
        release.wait(60)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", blocked)
    yield entered, release
    release.set()


def test_image_decoding_runs_beside_the_event_loop(prm, policy, blocking_decode):
    entered, release = blocking_decode
    image = data_url(Image.new("RGB", (8, 8), (1, 2, 3)))
    with reranker(prm, policy.url, ignore_images=True) as srv:
        result = {}
        worker = threading.Thread(target=lambda: result.update(r=httpx.post(
            srv.url + "/v1/chat/completions", json=image_chat(image), timeout=60)))
        worker.start()
        assert entered.wait(30)
        # the decode is stuck, the server is not
        assert httpx.get(srv.url + "/health", timeout=10).json()["in_flight"] == 1
        release.set()
        worker.join(60)
        assert result["r"].status_code == 200, result["r"].text


def test_image_decoding_has_a_time_limit(prm, policy, blocking_decode):
    entered, release = blocking_decode
    image = data_url(Image.new("RGB", (8, 8), (1, 2, 3)))
    with reranker(prm, policy.url, ignore_images=True, image_timeout_s=0.2) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json=image_chat(image), timeout=30)
        assert r.status_code == 400 and "--image-timeout" in _error(r)["message"], r.text
        assert entered.is_set() and policy.calls == 0


# --------------------------------------------------------------------------
# 8. images are bounded before they are decoded
# --------------------------------------------------------------------------


def test_pixels_are_checked_from_the_header_before_decoding(prm, policy, pixel_loads):
    huge = "data:image/png;base64," + base64.b64encode(png_header_only(5000, 5000)).decode()
    assert len(huge) < 200  # 25 MP in a few bytes
    with reranker(prm, policy.url, ignore_images=True) as srv:  # default --max-image-pixels: 4096 x 4096
        for r in (httpx.post(srv.url + "/v1/chat/completions", json=image_chat(huge)),
                  httpx.post(srv.url + "/v1/prm/score", json={"question": "q", "candidates": ["a"], "image": huge})):
            assert r.status_code == 400 and "--max-image-pixels" in _error(r)["message"], r.text
            assert "5000x5000" in _error(r)["message"]
    assert pixel_loads == [] and policy.calls == 0


def test_images_per_request_are_capped(prm, policy, pixel_loads):
    image = data_url(Image.new("RGB", (8, 8), (1, 2, 3)))
    with reranker(prm, policy.url, ignore_images=True) as srv:  # default --max-images: 4
        r = httpx.post(srv.url + "/v1/prm/score", json={"question": "q", "candidates": ["a"], "image": [image] * 5})
        assert r.status_code == 400 and "--max-images" in _error(r)["message"], r.text
        body = image_chat(image)
        body["messages"][0]["content"] = [body["messages"][0]["content"][0]] * 5 + [{"type": "text", "text": "q"}]
        r = httpx.post(srv.url + "/v1/chat/completions", json=body)
        assert r.status_code == 400 and "--max-images" in _error(r)["message"], r.text
    assert pixel_loads == [] and policy.calls == 0


# --------------------------------------------------------------------------
# 9. body and text sizes
# --------------------------------------------------------------------------


def test_body_over_the_cap_is_413(prm, policy):
    padding = "x" * (17 * 2 ** 20)  # past the default --max-body-bytes (16 MiB)
    with reranker(prm, policy.url) as srv:
        r = httpx.post(srv.url + "/v1/prm/score", json={"question": "q", "candidates": ["a"], "pad": padding})
        assert r.status_code == 413 and _error(r)["code"] == "request_too_large", r.text
        assert "--max-body-bytes" in _error(r)["message"]
    with reranker(prm, policy.url, max_body_bytes=1000) as srv:
        body = b'{"question": "q", "candidates": ["' + b"a" * 2000 + b'"]}'
        for content in (body, iter([body[:500], body[500:]])):  # with a Content-Length, and chunked without
            r = httpx.post(srv.url + "/v1/prm/score", content=content, headers={"content-type": "application/json"})
            assert r.status_code == 413, r.text
        r = httpx.post(srv.url + "/v1/prm/score", json={"question": "q", "candidates": ["a b"]})
        assert r.status_code == 200  # under the cap
    assert policy.calls == 0


def test_texts_over_the_cap_are_400(prm, policy):
    long = "word " * 20_001  # 100,005 characters: past the default --max-text-chars
    with reranker(prm, policy.url) as srv:
        cases = [("/v1/prm/score", {"question": "q", "candidates": ["a", long]}, "candidates[1]"),
                 ("/v1/prm/score", {"question": "q", "candidates": [["a", long]]}, "candidates[0]"),
                 ("/v1/prm/score", {"question": long, "candidates": ["a"]}, "question"),
                 ("/v1/chat/completions", chat(long), "question"),
                 ("/v1/chat/completions", chat("q", question="q", messages=[
                     {"role": "system", "content": long}, {"role": "user", "content": "q"}]), "messages[0].content"),
                 ("/v1/completions", {"model": MODEL, "prompt": ["q", long]}, "prompt[1]")]
        for path, body, name in cases:
            r = httpx.post(srv.url + path, json=body)
            assert r.status_code == 400, (name, r.text)
            assert _error(r)["param"] == name and "--max-text-chars" in _error(r)["message"], r.text
        health = httpx.get(srv.url + "/health").json()
    assert policy.calls == 0 and health["scoring_batches"] == 0  # refused before any tokenizing


def test_question_longer_than_the_context_fails_once(prm, policy, monkeypatch):
    encodes = []
    encode = type(prm.format).encode
    monkeypatch.setattr(type(prm.format), "encode", lambda self, *a, **k: encodes.append(1) or encode(self, *a, **k))
    question = "so we compute x + y and " * 600  # ~3000 tokens, past the tiny PRM's 2048, under the char cap
    with reranker(prm, policy.url) as srv:
        r = httpx.post(srv.url + "/v1/prm/score", json={"question": question, "candidates": ["a", "b", "c", "d"]})
    assert r.status_code == 400 and "the question is" in _error(r)["message"], r.text
    assert encodes == []  # not tokenized again for each candidate


# --------------------------------------------------------------------------
# 10. samples per request
# --------------------------------------------------------------------------


def test_prompts_times_n_is_capped(prm, policy):
    with reranker(prm, policy.url) as srv:  # default --max-samples: 128
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "best_of": 65})
        assert r.status_code == 400 and "--max-samples" in _error(r)["message"], r.text
        assert "65 samples for each of 2 prompts" in _error(r)["message"]
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat("q", n=129))
        assert r.status_code == 400 and "--max-samples" in _error(r)["message"], r.text
        assert policy.calls == 0
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "best_of": 64},
                       timeout=300)  # 128 samples to score: seconds on a loaded machine, past httpx's default 5 s
        assert r.status_code == 200 and policy.bodies[-1]["n"] == 64
    with reranker(prm, policy.url, max_samples=8) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat("q", n=2, best_of=9))
        assert r.status_code == 400 and "limit of 8" in _error(r)["message"]
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": ["a", "b", "c"]})  # 3 x --n 4
        assert r.status_code == 400 and "4 samples for each of 3 prompts" in _error(r)["message"]
    with pytest.raises(ValueError, match="max_samples"):
        ServerConfig(policy_url="http://127.0.0.1:1/v1", n=16, max_samples=8)


# --------------------------------------------------------------------------
# 11. 400 and 502, not 500
# --------------------------------------------------------------------------


def test_pillow_bomb_is_400(prm, policy):
    bomb = "data:image/png;base64," + base64.b64encode(png_header_only(14000, 14000)).decode()  # > 2x Pillow's limit
    for limit in (None, 10 ** 9):  # ours catches it first; with ours raised past Pillow's, Pillow's does
        options = {} if limit is None else {"max_image_pixels": limit}
        with reranker(prm, policy.url, ignore_images=True, **options) as srv:
            r = httpx.post(srv.url + "/v1/chat/completions", json=image_chat(bomb))
            assert r.status_code == 400 and "decompression-bomb limit" in _error(r)["message"], r.text


def test_malformed_upstream_choices_are_502(prm, policy):
    def string_message(data):
        data["choices"][0]["message"] = "hello"
        return data

    def number_text(data):
        data["choices"][0]["text"] = 5
        return data

    with reranker(prm, policy.url) as srv:
        for mangle, path, body in ((string_message, "/v1/chat/completions", chat("q")),
                                   (number_text, "/v1/completions", {"model": MODEL, "prompt": "q"}),
                                   (lambda d: {**d, "choices": "none"}, "/v1/chat/completions", chat("q"))):
            policy.mangle = mangle
            r = httpx.post(srv.url + path, json=body)
            assert r.status_code == 502 and _error(r)["type"] == "upstream_error", r.text


# --------------------------------------------------------------------------
# 12. client keys and model names
# --------------------------------------------------------------------------


def test_client_key_is_required(prm, policy):
    with reranker(prm, policy.url, client_api_keys=("old-key", "new-key")) as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "new-key"},
                        {"Authorization": "Basic new-key"}):
            for method, path, body in (("POST", "/v1/chat/completions", chat("q")), ("GET", "/v1/models", None),
                                       ("POST", "/v1/prm/score", {"question": "q", "candidates": ["a"]})):
                r = httpx.request(method, srv.url + path, json=body, headers=headers)
                assert r.status_code == 401, (headers, path, r.text)
                assert _error(r)["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert policy.calls == 0
        assert httpx.get(srv.url + "/health").status_code == 200  # probes hold no key
        for key in ("old-key", "new-key"):
            r = httpx.post(srv.url + "/v1/chat/completions", json=chat("request 1: q"),
                           headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
        assert "old-key" not in policy.bodies[-1].values()


def test_client_key_from_file_or_environment(tmp_path):
    from mmprm_infer.cli import build_parser
    from mmprm_infer.cli.serve import config_from_args
    from mmprm_infer.integrations.serve.options import CLIENT_KEY_ENV

    key_file = tmp_path / "keys"
    key_file.write_text("k1\n\nk2\n")
    base = ["serve", "--policy-url", "http://127.0.0.1:8000/v1", "--prm", str(tmp_path)]
    args = build_parser().parse_args(base + ["--client-api-key-file", str(key_file)])
    assert config_from_args(args, environ={CLIENT_KEY_ENV: "env"}).client_api_keys == ("k1", "k2")
    args = build_parser().parse_args(base)
    assert config_from_args(args, environ={CLIENT_KEY_ENV: " env \n"}).client_api_keys == ("env",)
    assert config_from_args(args, environ={}).client_api_keys == ()


def test_unknown_model_is_404_and_the_response_names_the_model(prm, policy):
    with reranker(prm, policy.url) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat("q", model="gpt-4o"))
        assert r.status_code == 404 and _error(r)["code"] == "model_not_found" and "fake-policy" in _error(r)["message"]
        r = httpx.post(srv.url + "/v1/completions", json={"model": "gpt-4o", "prompt": "q"})
        assert r.status_code == 404 and _error(r)["code"] == "model_not_found"
        assert policy.calls == 0
        assert httpx.post(srv.url + "/v1/chat/completions", json=chat("request 1: q")).json()["model"] == MODEL
    policy.mangle = lambda data: {**data, "model": "/models/some-checkpoint"}  # what vLLM may call it
    with reranker(prm, policy.url, served_model_name="best-of-4") as srv:
        assert [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]] == ["best-of-4"]
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat("request 1: q", model="best-of-4"))
        assert r.status_code == 200 and r.json()["model"] == "best-of-4"
        assert policy.bodies[-1]["model"] == MODEL  # the policy is asked for its own model
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat("request 1: q", model=MODEL))
        assert r.status_code == 404


# --------------------------------------------------------------------------
# 14. serve checks its options before loading the PRM
# --------------------------------------------------------------------------


@pytest.mark.parametrize("extra, needle", [
    (["--policy-url", "ftp://127.0.0.1/v1"], "argument --policy-url: --policy-url must be an http(s) URL"),
    (["--policy-url", "127.0.0.1:8000"], "argument --policy-url"),
    (["--n", "0"], "argument --n: must be >= 1"),
    (["--max-samples", "0"], "argument --max-samples: must be >= 1"),
    (["--max-body-bytes", "-5"], "argument --max-body-bytes: must be >= 1"),
    (["--n", "two"], "argument --n: expected a whole number"),
    (["--image-root", "/no/such/folder"], "argument --image-root: --image-root '/no/such/folder' is not an existing"),
    (["--n", "200"], "mmprm serve: n (200) must be <= max_samples (128)"),
    (["--client-api-key-file", "/no/such/keys"], "mmprm serve: --client-api-key-file '/no/such/keys' cannot be read"),
    (["--prm", "/no/such/prm"], "mmprm serve: --prm '/no/such/prm' is not a directory"),
])
def test_serve_checks_options_before_loading_the_prm(tmp_path, monkeypatch, capsys, extra, needle):
    class NoLoad:
        def __init__(self, *a, **k):
            pass

        def load(self, *a, **k):
            raise AssertionError("the PRM was loaded before the options were checked")

    monkeypatch.setattr(records_module, "PRMSpec", NoLoad)  # `mmprm serve` imports it when it runs
    argv = ["serve", "--policy-url", "http://127.0.0.1:8000/v1", "--prm", str(tmp_path)]
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    # argparse's usage errors go to stderr (exit 2); the later checks are the SystemExit's message
    message = capsys.readouterr().err if isinstance(exc.value.code, int) else exc.value.code
    assert "mmprm serve: " in message and needle in message, message


def test_empty_key_file_is_refused(tmp_path):
    from mmprm_infer.cli import build_parser
    from mmprm_infer.cli.serve import config_from_args

    (tmp_path / "keys").write_text("\n  \n")
    args = build_parser().parse_args(["serve", "--policy-url", "http://h:1/v1", "--prm", str(tmp_path),
                                      "--client-api-key-file", str(tmp_path / "keys")])
    with pytest.raises(ValueError, match="holds no key"):
        config_from_args(args, environ={})
