"""Hardening, the reranking server's part (and the image decoding it shares with the CLI): connections and
slow requests bounded, client data never handed to a decoder outside the allowlist, 4xx/502 instead of 500,
nothing of the deployment exposed, policy samples bounded.  Each test failed against the
code before the fix."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import struct

import pytest

pytest.importorskip("fastapi", reason="the server tests need the 'serve' extra (fastapi, uvicorn, httpx)")
httpx = pytest.importorskip("httpx")

import server_fakes  # noqa: E402
from PIL import Image  # noqa: E402
from server_fakes import MODEL, chat, image_chat, reranker, wait_until  # noqa: E402

from mmprm_infer.integrations.serve import ServerConfig  # noqa: E402
from mmprm_infer.vision import ImageLoadError, open_rgb  # noqa: E402

prm, policy = server_fakes.prm, server_fakes.policy

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")


def _error(r) -> dict:
    return r.json()["error"]


def _raw_post(url: str, body: str) -> httpx.Response:
    """A body httpx's json= cannot send (a lone surrogate escape, NaN): the JSON text as the client wrote it."""
    return httpx.post(url, content=body.encode("ascii"), headers={"content-type": "application/json"}, timeout=60)


# --------------------------------------------------------------------------
# 3. images: only raster formats are decoded, on the server and in the CLI
# --------------------------------------------------------------------------


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch):
    """A `gs` on PATH that only leaves a mark when it runs; Pillow looks for it afresh."""
    from PIL import EpsImagePlugin

    bin_dir, mark = tmp_path / "bin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return mark


def test_the_server_never_hands_client_data_to_ghostscript(prm, policy, fake_ghostscript):
    url = "data:image/png;base64," + base64.b64encode(EPS).decode()
    with reranker(prm, policy.url, ignore_images=True) as srv:
        for path, body in (("/v1/chat/completions", image_chat(url)),
                           ("/v1/prm/score", {"question": "q", "candidates": ["a"], "image": url})):
            r = httpx.post(srv.url + path, json=body, timeout=60)
            assert r.status_code == 400 and "not a PNG, JPEG, GIF, WebP, BMP or TIFF image" in _error(r)["message"]
    assert not fake_ghostscript.exists() and policy.calls == 0


def test_the_cli_never_hands_an_image_file_to_ghostscript(tmp_path, fake_ghostscript):
    path = tmp_path / "figure.png"  # the name says PNG, the bytes are PostScript
    path.write_bytes(EPS)
    with pytest.raises(ImageLoadError, match="is not a PNG, JPEG, GIF, WebP, BMP or TIFF image"):
        open_rgb(path)
    assert not fake_ghostscript.exists()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_the_allowed_formats_still_decode(tmp_path, fmt):
    from mmprm_infer.vision import IMAGE_FORMATS

    assert fmt in IMAGE_FORMATS
    path = tmp_path / f"pic.{fmt.lower()}"
    Image.new("RGB", (12, 8), (200, 30, 10)).save(path, format=fmt)
    rgb = open_rgb(path)
    assert rgb.size == (12, 8) and rgb.mode == "RGB"


# --------------------------------------------------------------------------
# 7. client input is a 4xx, a policy's bad answer a 502: never a 500
# --------------------------------------------------------------------------


def _dds(pixel_flags: int) -> bytes:
    """A DDS header with the given pixel-format flags (17: a combination Pillow's DDS reader does not implement)."""
    header = struct.pack("<6I44x", 0x1007, 4, 4, 16, 0, 0)  # flags, height, width, pitch, depth, mipmaps
    pixel_format = struct.pack("<8I", 32, pixel_flags, 0, 32, 0xFF0000, 0xFF00, 0xFF, 0xFF000000)
    caps = struct.pack("<5I", 0x1000, 0, 0, 0, 0)
    return b"DDS " + struct.pack("<I", 124) + header + pixel_format + caps + b"\0" * 64


def test_client_input_that_is_not_text_or_json_is_400(prm, policy):
    chat_body = '{"model": "%s", "messages": [{"role": "user", "content": %s}]%s}'
    with reranker(prm, policy.url) as srv:
        cases = [
            ("/v1/chat/completions", chat_body % (MODEL, '"x\\ud800"', ""), "messages[0].content"),
            ("/v1/chat/completions", chat_body % (MODEL, '"q"', ', "user": "x\\udc00"'), "'user'"),
            ("/v1/chat/completions", chat_body % (MODEL, '"q"', ', "temperature": NaN'), "'temperature' is NaN"),
            ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "p\\ud800"}}', "'prompt'"),
            ("/v1/prm/score", '{"question": "q\\ud800", "candidates": ["a"]}', "'question'"),
        ]
        for path, body, needle in cases:
            r = _raw_post(srv.url + path, body)
            assert r.status_code == 400, (body, r.text)
            assert needle in _error(r)["message"], (body, r.text)
    assert policy.calls == 0


def test_a_dds_image_pillow_cannot_read_is_400(prm, policy):
    import io

    with pytest.raises(NotImplementedError):  # what Pillow's own DDS reader does with these pixel-format flags
        Image.open(io.BytesIO(_dds(17)))
    url = "data:image/png;base64," + base64.b64encode(_dds(17)).decode()
    with reranker(prm, policy.url, ignore_images=True) as srv:  # the text-only PRM decodes it (for the policy)
        r = httpx.post(srv.url + "/v1/chat/completions", json=image_chat(url))
    assert r.status_code == 400 and _error(r)["param"] == "image_url", r.text
    assert policy.calls == 0


@pytest.mark.parametrize("poison", ["nan", "surrogate"])
def test_a_policy_answer_that_is_not_strict_json_is_502(prm, policy, poison):
    from starlette.responses import Response

    def mangle(data):
        data["usage"]["prompt_tokens"] = float("nan") if poison == "nan" else "x\ud800"
        return Response(json.dumps(data), media_type="application/json")  # NaN, and \ud800 as an escape

    policy.mangle = mangle
    with reranker(prm, policy.url) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat("request 1: q"), timeout=60)
    assert r.status_code == 502 and _error(r)["type"] == "upstream_error", r.text


# --------------------------------------------------------------------------
# 12. a client that leaves costs one info line, not an exception
# --------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_a_client_leaving_raises_nothing(prm, policy):
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "mmprm.server")]
    server = reranker(prm, policy.url, policy_model=MODEL)  # uvicorn's config resets its loggers' handlers: first
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with server as srv:
            policy.gate.clear()  # the policy holds the request until the client has gone
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(srv.url + "/v1/chat/completions", json=chat("request 1: q"), timeout=1.0)
            # the gate is still closed: the request ends because its client left, its work cancelled
            wait_until(lambda: httpx.get(srv.url + "/health").json()["in_flight"] == 0, "the request to end")
            policy.gate.set()
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    problems = [r.getMessage() for r in handler.records if r.levelno >= logging.WARNING]
    assert problems == [] and not any(r.exc_info for r in handler.records), problems


# --------------------------------------------------------------------------
# 15. nothing of the deployment exposed
# --------------------------------------------------------------------------


def test_health_does_not_name_the_policy(prm, policy):
    with reranker(prm, policy.url) as srv:
        r = httpx.get(srv.url + "/health")
    host = policy.url.split("//")[1].split("/")[0]
    assert r.status_code == 200 and "policy_url" not in r.json() and host not in r.text


def test_policy_errors_reach_the_client_without_its_address_key_or_text(prm, policy):
    host = policy.url.split("//")[1].split("/")[0]
    with reranker(prm, policy.url, api_key="sk-secret-123", policy_model=MODEL) as srv:
        policy.fail, policy.error_message = [404], "internal trace: /srv/models/ckpt token sk-secret-123"
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat("request 1: q"))
        assert r.status_code == 502 and "HTTP 404" in _error(r)["message"]
        assert "internal trace" not in r.text and "sk-secret-123" not in r.text and host not in r.text
        policy.fail = [400]  # the policy's word on the client's own request comes back, its secrets taken out
        policy.error_message = f"max_tokens too large (policy {policy.url}, key sk-secret-123)"
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat("request 1: q"))
        assert r.status_code == 400 and "max_tokens too large" in _error(r)["message"]
        assert "sk-secret-123" not in r.text and host not in r.text


def test_decoder_messages_hold_no_memory_addresses(prm, policy):
    garbage = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40).decode()
    with reranker(prm, policy.url, ignore_images=True) as srv:  # the text-only PRM decodes them (for the policy)
        for url in (garbage, "data:image/png;base64," + base64.b64encode(b"plain text").decode()):
            r = httpx.post(srv.url + "/v1/chat/completions", json=image_chat(url))
            assert r.status_code == 400 and "image" in _error(r)["message"], r.text
            assert " at 0x" not in r.text and "BytesIO" not in r.text, r.text


def test_an_empty_key_variable_is_refused_and_no_key_is_warned_about(tmp_path, monkeypatch, capsys):
    from mmprm_infer.cli import build_parser, main
    from mmprm_infer.cli import serve as serve_command
    from mmprm_infer.cli.serve import config_from_args
    from mmprm_infer.integrations.serve import app as app_module
    from mmprm_infer.integrations.serve.options import CLIENT_KEY_ENV
    from mmprm_infer.io import records

    argv = ["serve", "--policy-url", "http://127.0.0.1:8000/v1", "--prm", str(tmp_path)]
    args = build_parser().parse_args(argv)
    with pytest.raises(ValueError, match=f"\\${CLIENT_KEY_ENV} is set but empty"):
        config_from_args(args, environ={CLIENT_KEY_ENV: "  "})
    monkeypatch.setenv(CLIENT_KEY_ENV, "")
    with pytest.raises(SystemExit, match=f"mmprm serve: \\${CLIENT_KEY_ENV} is set but empty"):
        main(argv)
    monkeypatch.delenv(CLIENT_KEY_ENV)
    started = []
    loaded = type("LoadedPRM", (), {"warmup": lambda self: {}})()  # what serve touches before starting
    monkeypatch.setattr(records.PRMSpec, "load", lambda *a, **k: loaded)
    monkeypatch.setattr(app_module, "run_server", lambda *a, **k: started.append(a))
    assert serve_command.run(args) == 0 and started
    assert "warning: clients need no key" in capsys.readouterr().err


# --------------------------------------------------------------------------
# 17. policy samples bounded by --max-text-chars
# --------------------------------------------------------------------------


def test_a_sample_over_max_text_chars_is_ranked_last_unread(prm, policy, monkeypatch):
    read = []
    encode = type(prm.format).encode
    monkeypatch.setattr(type(prm.format), "encode",
                        lambda self, tok, q, steps, *a, **k: read.append(sum(map(len, steps))) or
                        encode(self, tok, q, steps, *a, **k))

    def long_first(data):
        for c in data["choices"]:
            if c["index"] == 0:
                c["message"]["content"] = "so we compute x + y and " * 200  # 4800 characters
        return data

    policy.mangle = long_first
    with reranker(prm, policy.url, max_text_chars=2000) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat("request 1: q", n=4), timeout=120)
    assert r.status_code == 200, r.text
    last = r.json()["choices"][-1]["prm"]
    assert last["sample_index"] == 0 and last["score"] is None and "--max-text-chars" in last["error"]
    assert read and max(read) < 2000  # the long sample never reached the tokenizer


def test_an_answer_larger_than_the_samples_allow_is_502(prm, policy):
    def huge(data):
        data["choices"][0]["message"]["content"] = "x" * (3 * 2 ** 20)
        return data

    policy.mangle = huge
    with reranker(prm, policy.url, max_text_chars=1000) as srv:  # 4 samples: 4 x 16 x 1000 + 1 MiB bytes
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat("request 1: q"), timeout=120)
    assert r.status_code == 502 and "larger than this server reads" in _error(r)["message"], r.text


# --------------------------------------------------------------------------
# 5. connections: a cap, and time limits on a request's head and body
# --------------------------------------------------------------------------


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)  # the timeout only turns a hang into a failure
    return s


def _read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return data


def test_connections_are_capped_and_slow_requests_are_closed(prm, policy):
    with reranker(prm, policy.url, max_connections=4, header_timeout_s=1.0, body_timeout_s=1.0) as srv:
        connections = srv.server.server_state.connections
        slow = [_connect(srv.port) for _ in range(4)]
        for s in slow:  # a request line and one header, then nothing
            s.sendall(b"POST /v1/prm/score HTTP/1.1\r\nHost: x\r\n")
        wait_until(lambda: len(connections) == 4, "the server to hold the four slow connections")
        extra = _connect(srv.port)  # one more: answered 503 and closed at once, before it sends anything
        assert _read_all(extra).startswith(b"HTTP/1.1 503"), "a connection past --max-connections stayed open"
        extra.close()
        for s in slow:  # closed by the server once --header-timeout passed, with a 408
            assert _read_all(s).startswith(b"HTTP/1.1 408")
            s.close()
        body = _connect(srv.port)  # a head, then a body that stops short of its Content-Length
        body.sendall(b"POST /v1/prm/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"question\":")
        assert _read_all(body).startswith(b"HTTP/1.1 408")
        body.close()
        assert httpx.get(srv.url + "/health").status_code == 200  # and the server serves on


def test_uvicorn_runs_with_the_bounds(prm):
    from mmprm_infer.integrations.serve import create_app
    from mmprm_infer.integrations.serve.connections import LOGGERS, RepeatedLogFilter, uvicorn_config

    config = ServerConfig(policy_url="http://127.0.0.1:1/v1", max_connections=7, header_timeout_s=3.0,
                          body_timeout_s=9.0)
    server = uvicorn_config(create_app(prm, config))
    assert server.limit_concurrency == 7 and server.timeout_keep_alive == config.keep_alive_s
    assert server.h11_max_incomplete_event_size == 16 * 1024
    assert (server.http.max_connections, server.http.header_timeout_s, server.http.body_timeout_s) == (7, 3.0, 9.0)
    assert all(any(isinstance(f, RepeatedLogFilter) for f in logging.getLogger(n).filters) for n in LOGGERS)


def test_repeated_log_lines_are_rate_limited():
    from mmprm_infer.integrations.serve.connections import RepeatedLogFilter

    now = [0.0]
    flt = RepeatedLogFilter(window_s=10.0, burst=3, clock=lambda: now[0])

    def record(msg, *args):
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, args, None)

    passed = [flt.filter(record("socket.accept() out of system resource")) for _ in range(1000)]
    assert passed.count(True) == 3
    assert flt.filter(record("another message"))  # other lines are not held back
    now[0] = 11.0
    later = record("socket.accept() out of system resource")
    assert flt.filter(later) and "[997 more like this were not logged]" in later.getMessage()
    args = record("client left %s before its answer", "/v1/chat")  # the template counts, not the arguments
    assert flt.filter(args) and args.getMessage() == "client left /v1/chat before its answer"

