"""``mmprm serve``'s options: the flags, their defaults and the checks made before the PRM loads.

No fastapi here: ``mmprm -h`` and the other subcommands build this parser
without the 'serve' extra installed.  Every check that needs no model runs
at parse time (argparse ``type=``) or in ``config_from_args``, so a typo
costs a second, not the minutes an 8B PRM takes to load.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from mmprm_infer.aggregation import AGGREGATIONS, ALIASES, get_aggregation
from mmprm_infer.arguments import DTYPES, arg_type, at_least, non_negative_int, positive_int
from mmprm_infer.formats import FORMATS
from mmprm_infer.selection import get_strategy

__all__ = ["ServerConfig", "add_serve_arguments", "config_from_args", "read_key_file",
           "CLIENT_KEY_ENV", "POLICY_KEY_ENV"]

CLIENT_KEY_ENV = "MMPRM_SERVER_API_KEY"  # the key clients must send, when no --client-api-key-file
POLICY_KEY_ENV = "MMPRM_POLICY_API_KEY"  # the key sent to the policy, when no --api-key

# Limits (see README "Limits and safety"); each has a flag.
MAX_SAMPLES = 128  # samples the policy is asked for per request (prompts x n)
MAX_IMAGES = 4  # images per request
MAX_IMAGE_PIXELS = 4096 * 4096  # ~16.8 MP, 48 MB as RGB; Pillow's own bomb limit is ~89.5 MP
MAX_BODY_BYTES = 16 * 2 ** 20
MAX_TEXT_CHARS = 100_000  # a question, candidate, prompt or message; ~25k tokens, past most PRMs' context
IMAGE_TIMEOUT_S = 10.0
IMAGE_WORKERS = 2


@dataclass
class ServerConfig:
    policy_url: str
    policy_model: str | None = None  # default: the first model the policy lists at /models
    served_model_name: str | None = None  # the name clients use and /v1/models lists (default: policy_model)
    api_key: str | None = None  # sent to the policy as a Bearer token
    client_api_keys: tuple[str, ...] = ()  # when set, clients must send one of them as a Bearer token
    n: int = 8
    aggregate: str | None = None  # None: the PRM format's release default (rerank.resolve_aggregate)
    strategy: str = "best_of_n"
    max_queue: int = 256
    batch_window_ms: float = 10.0
    max_batch_candidates: int = 512
    upstream_timeout: float = 60.0
    retries: int = 2
    backoff_s: float = 0.2
    engine: str | None = None
    image_root: str | None = None  # local image paths are refused unless set; then only files under it
    ignore_images: bool = False  # a text-only PRM scores image requests on their text alone
    max_images: int = MAX_IMAGES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    image_timeout_s: float = IMAGE_TIMEOUT_S
    image_workers: int = IMAGE_WORKERS
    max_body_bytes: int = MAX_BODY_BYTES
    max_text_chars: int = MAX_TEXT_CHARS
    max_samples: int = MAX_SAMPLES
    decode_token_prompts: bool = False  # token-id prompts -> PRM question via the PRM's tokenizer

    def __post_init__(self) -> None:
        _http_url(self.policy_url, "policy_url")
        for name in ("n", "max_queue", "max_batch_candidates", "max_images", "max_image_pixels", "image_workers",
                     "max_body_bytes", "max_text_chars", "max_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n > self.max_samples:
            raise ValueError(f"n ({self.n}) must be <= max_samples ({self.max_samples}); lower --n or raise "
                             "--max-samples")
        if self.retries < 0 or self.upstream_timeout <= 0 or self.batch_window_ms < 0 or self.image_timeout_s <= 0:
            raise ValueError("retries and batch_window_ms must be >= 0, upstream_timeout and image_timeout_s > 0")
        if self.image_root is not None:
            self.image_root = os.path.realpath(_directory(self.image_root, "image_root"))
        if any(not k for k in self.client_api_keys):
            raise ValueError("client_api_keys holds an empty key")
        if self.aggregate is not None:
            get_aggregation(self.aggregate)
        get_strategy(self.strategy)


# --------------------------------------------------------------------------
# argparse types: a bad value is a usage error naming the flag (`mmprm serve: error: argument --n: ...`)
# --------------------------------------------------------------------------


def _http_url(value: str, name: str = "--policy-url") -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{name} must be an http(s) URL such as http://127.0.0.1:8000/v1, got {value!r}")
    return value


def _directory(value: str, name: str = "--image-root") -> str:
    if not os.path.isdir(value):
        raise ValueError(f"{name} {value!r} is not an existing directory; create it or give another folder")
    return value


def read_key_file(path: str) -> tuple[str, ...]:
    """The keys in a file, one per line (several allow rotation); blank lines are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            keys = tuple(line.strip() for line in f if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--client-api-key-file {path!r} cannot be read ({exc}); give a readable text file "
                         "holding the key") from None
    if not keys:
        raise ValueError(f"--client-api-key-file {path!r} holds no key; write the key on its first line")
    return keys


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """The ``mmprm serve`` flags (read by ``config_from_args`` and ``integrations.serve.app.serve_main``)."""
    serve.add_argument("--policy-url", required=True, type=arg_type(_http_url, "url"),
                       help="the policy's OpenAI API root, e.g. http://127.0.0.1:8000/v1")
    serve.add_argument("--policy-model", default=None, help="model name to ask the policy for (default: its first)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients must use, listed by /v1/models (default: the policy's model)")
    serve.add_argument("--api-key", default=None, help=f"Bearer token for the policy (or ${POLICY_KEY_ENV})")
    serve.add_argument("--client-api-key-file", default=None, metavar="PATH",
                       help=f"require clients to send one of the keys in PATH (one per line) as 'Authorization: "
                            f"Bearer KEY' (or set ${CLIENT_KEY_ENV}); default: no key asked; /health stays open")
    serve.add_argument("--prm", required=True, help="PRM checkpoint directory")
    serve.add_argument("--format", choices=sorted(FORMATS), help="PRM format (default: read from the checkpoint)")
    serve.add_argument("--engine", default=None, help="scoring engine (default: fast)")
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--dtype", default=None, choices=DTYPES, help="default: float32 on CPU, bfloat16 on CUDA")
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
    serve.add_argument("--image-root", default=None, type=arg_type(_directory, "directory"),
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
    serve.add_argument("--decode-token-prompts", action="store_true",
                       help="/v1/completions: turn token-id prompts into the PRM's question with the PRM's "
                            "tokenizer (only right when the policy uses the same tokenizer); default: such "
                            "requests must carry 'question'")
    serve.add_argument("--log-level", default="info")


def config_from_args(args: argparse.Namespace, environ=os.environ) -> ServerConfig:
    """The server's config from parsed flags; ValueError naming the option when they do not fit together."""
    keys = read_key_file(args.client_api_key_file) if args.client_api_key_file else ()
    if not keys and environ.get(CLIENT_KEY_ENV, "").strip():
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
    )
