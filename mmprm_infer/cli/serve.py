"""``mmprm serve``: the OpenAI-compatible reranking server in front of a policy server.

Its flags and checks live here; the server itself is ``mmprm_infer.integrations.serve`` (fastapi,
imported only when the server starts, so ``mmprm -h`` works without the 'serve' extra).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mmprm_infer.aggregation import AGGREGATIONS, ALIASES
from mmprm_infer.cli.arguments import (
    FORMAT_NAMES,
    add_device,
    add_dtype,
    announce_device,
    arg_type,
    at_least,
    non_negative_int,
    positive_int,
    resolve_device,
)
from mmprm_infer.integrations.serve.options import (
    BODY_TIMEOUT_S,
    CLIENT_KEY_ENV,
    HEADER_TIMEOUT_S,
    IMAGE_TIMEOUT_S,
    IMAGE_WORKERS,
    MAX_BODY_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_IMAGES,
    MAX_SAMPLES,
    MAX_TEXT_CHARS,
    POLICY_KEY_ENV,
    ServerConfig,
    existing_directory,
    http_url,
    read_key_file,
)

HELP = ("OpenAI-compatible reranking server in front of a policy server (needs the 'serve' extra: fastapi, uvicorn, "
        "httpx)")
DESCRIPTION = HELP


def configure(serve: argparse.ArgumentParser) -> None:
    """The ``mmprm serve`` flags (read by ``config_from_args`` and ``run``)."""
    serve.add_argument("--policy-url", required=True, type=arg_type(http_url, "url"),
                       help="the policy's OpenAI API root, e.g. http://127.0.0.1:8000/v1")
    serve.add_argument("--policy-model", default=None, help="model name to ask the policy for (default: its first)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients must use, listed by /v1/models (default: the policy's model)")
    serve.add_argument("--api-key", default=None, help=f"Bearer token for the policy (or ${POLICY_KEY_ENV})")
    serve.add_argument("--client-api-key-file", default=None, metavar="PATH",
                       help=f"require clients to send one of the keys in PATH (one per line) as 'Authorization: "
                            f"Bearer KEY' (or set ${CLIENT_KEY_ENV}); default: no key asked; /health stays open")
    serve.add_argument("--prm", required=True, help="PRM checkpoint directory")
    serve.add_argument("--format", choices=FORMAT_NAMES, help="PRM format (default: read from the checkpoint)")
    serve.add_argument("--engine", default=None, help="scoring engine (default: fast)")
    add_device(serve)
    add_dtype(serve)
    serve.add_argument("--max-tiles", type=positive_int, default=None, help="InternVL formats: tiles per image")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=non_negative_int, default=8080)
    serve.add_argument("--n", type=positive_int, default=8, help="samples drawn from the policy per request")
    serve.add_argument("--aggregate", default=None, choices=sorted([*AGGREGATIONS, *ALIASES]),
                       help="default: the PRM format's release default (mean for visualprm, last for rlhflow, "
                            "else min)")
    serve.add_argument("--strategy", default="best_of_n", choices=("best_of_n", "weighted_vote", "majority_vote"))
    serve.add_argument("--max-queue", type=positive_int, default=256,
                       help="requests admitted at once; more get HTTP 503")
    serve.add_argument("--batch-window-ms", type=at_least(0, float), default=10.0,
                       help="how long the scorer waits to batch concurrent requests into one PRM pass")
    serve.add_argument("--upstream-timeout", type=at_least(0.001, float), default=60.0,
                       help="seconds per policy request attempt")
    serve.add_argument("--retries", type=non_negative_int, default=2,
                       help="retries toward the policy (errors, 429, 5xx, timeouts)")
    serve.add_argument("--image-root", default=None, type=arg_type(existing_directory, "directory"),
                       help="allow local image paths, only for files under this folder (default: data: URLs only)")
    serve.add_argument("--ignore-images", action="store_true", help="text-only PRM: score image requests on text")
    serve.add_argument("--threads", type=positive_int, default=None,
                       help="torch CPU threads for the PRM (default: torch's; leave cores to a policy on the same box)")
    limits = serve.add_argument_group("limits (a request over one gets 400, or 413 for the body)")
    limits.add_argument("--max-body-bytes", type=positive_int, default=MAX_BODY_BYTES,
                        help=f"request body size (default {MAX_BODY_BYTES})")
    limits.add_argument("--max-text-chars", type=positive_int, default=MAX_TEXT_CHARS,
                        help=f"characters per question, candidate, prompt or message (default {MAX_TEXT_CHARS})")
    limits.add_argument("--max-samples", type=positive_int, default=MAX_SAMPLES,
                        help=f"samples asked of the policy per request: prompts x max(n, best_of, --n) "
                             f"(default {MAX_SAMPLES})")
    limits.add_argument("--max-images", type=positive_int, default=MAX_IMAGES,
                        help=f"images per request (default {MAX_IMAGES})")
    limits.add_argument("--max-image-pixels", type=positive_int, default=MAX_IMAGE_PIXELS,
                        help=f"width x height per image, read from the header before decoding (default "
                             f"{MAX_IMAGE_PIXELS})")
    limits.add_argument("--image-timeout", type=at_least(0.001, float), default=IMAGE_TIMEOUT_S,
                        help=f"seconds to decode one image (default {IMAGE_TIMEOUT_S:g})")
    limits.add_argument("--image-workers", type=positive_int, default=IMAGE_WORKERS,
                        help=f"threads decoding images, beside the event loop (default {IMAGE_WORKERS})")
    limits.add_argument("--max-connections", type=positive_int, default=None,
                        help="open connections; the next one gets 503 and is closed (default: half the process's "
                             "file-descriptor limit, at most 1024)")
    limits.add_argument("--header-timeout", type=at_least(0.001, float), default=HEADER_TIMEOUT_S,
                        help=f"seconds for a request's line and headers to arrive (default {HEADER_TIMEOUT_S:g}); "
                             "then 408 and the connection is closed")
    limits.add_argument("--body-timeout", type=at_least(0.001, float), default=BODY_TIMEOUT_S,
                        help=f"seconds for a request's body to arrive after its headers (default {BODY_TIMEOUT_S:g})")
    serve.add_argument("--decode-token-prompts", action="store_true",
                       help="/v1/completions: turn token-id prompts into the PRM's question with the PRM's "
                            "tokenizer (only right when the policy uses the same tokenizer); default: such "
                            "requests must carry 'question'")
    serve.add_argument("--log-level", default="info")


def config_from_args(args: argparse.Namespace, environ=os.environ) -> ServerConfig:
    """The server's config from parsed flags; ValueError naming the option when they do not fit together."""
    keys = read_key_file(args.client_api_key_file) if args.client_api_key_file else ()
    if not keys and CLIENT_KEY_ENV in environ:
        if not environ[CLIENT_KEY_ENV].strip():  # set, to nothing: a deployment mistake, not "no key wanted"
            raise ValueError(f"${CLIENT_KEY_ENV} is set but empty, which would leave the server open to every "
                             "client; set it to the key clients must send, or unset it to run without a key")
        keys = (environ[CLIENT_KEY_ENV].strip(),)
    return ServerConfig(
        policy_url=args.policy_url, policy_model=args.policy_model, served_model_name=args.served_model_name,
        api_key=args.api_key or environ.get(POLICY_KEY_ENV), client_api_keys=keys,
        n=args.n, aggregate=args.aggregate, strategy=args.strategy, max_queue=args.max_queue,
        batch_window_ms=args.batch_window_ms, upstream_timeout=args.upstream_timeout, retries=args.retries,
        engine=args.engine, image_root=args.image_root, ignore_images=args.ignore_images,
        max_images=args.max_images, max_image_pixels=args.max_image_pixels, image_timeout_s=args.image_timeout,
        image_workers=args.image_workers, max_body_bytes=args.max_body_bytes, max_text_chars=args.max_text_chars,
        max_samples=args.max_samples, decode_token_prompts=args.decode_token_prompts,
        max_connections=args.max_connections, header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
    )


def open_server_warning(config: ServerConfig, host: str, port: int) -> str | None:
    """What to say when clients need no key: anyone who reaches the port uses the PRM and the policy."""
    if config.client_api_keys:
        return None
    where = "this machine" if host in ("127.0.0.1", "localhost", "::1") else f"{host}:{port}"
    return (f"mmprm serve: warning: clients need no key (no --client-api-key-file, no ${CLIENT_KEY_ENV}): anyone "
            f"who can reach {where} can use the server, and its policy")


def run(args: argparse.Namespace) -> int:
    """``mmprm serve``: check every option, then load the PRM (minutes for an 8B model), then start uvicorn."""
    from mmprm_infer.integrations.serve.app import run_server  # fastapi: the 'serve' extra
    from mmprm_infer.io.records import PRMSpec  # torch: not needed for `mmprm -h`

    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise SystemExit(f"mmprm serve: {exc}") from None
    if not Path(args.prm).is_dir():
        raise SystemExit(f"mmprm serve: --prm {args.prm!r} is not a directory; give the PRM checkpoint's folder")
    args.device = resolve_device(args.device)
    announce_device("mmprm serve", args.device, args.dtype)
    try:
        prm = PRMSpec(args.prm, format=args.format, dtype=args.dtype, max_tiles=args.max_tiles).load(
            args.device, args.threads)
    except Exception as exc:  # noqa: BLE001 - a checkpoint can fail in many ways; name it and the cause
        raise SystemExit(f"mmprm serve: cannot load the PRM from {args.prm}: {type(exc).__name__}: {exc}") from None
    # the engine's one-time costs (path measurements, packed weights, kernel set-up) paid before the first request
    seconds = prm.warmup()
    print(f"mmprm serve: engine warmed up in {sum(seconds.values()):.1f} s ("
          + (", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()) or "nothing to do") + ")", file=sys.stderr)
    warning = open_server_warning(config, args.host, args.port)
    if warning:
        print(warning, file=sys.stderr)
    run_server(prm, config, host=args.host, port=args.port, log_level=args.log_level)
    return 0
