"""The reranking server's settings (``ServerConfig``), their defaults and the checks made before the PRM loads.

No fastapi here: ``mmprm -h`` builds ``mmprm serve``'s parser (mmprm_infer/cli/serve.py) from these defaults
without the 'serve' extra installed.  Every check that needs no model runs at parse time or in
``ServerConfig``, so a typo costs a second, not the minutes an 8B PRM takes to load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from mmprm_infer.aggregation import get_aggregation
from mmprm_infer.selection import get_strategy

__all__ = ["ServerConfig", "read_key_file", "http_url", "existing_directory", "CLIENT_KEY_ENV", "POLICY_KEY_ENV"]

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
HEADER_TIMEOUT_S = 10.0  # a request's line and headers must arrive within this
BODY_TIMEOUT_S = 60.0  # and its body within this after them (16 MiB at ~280 KB/s)
KEEP_ALIVE_S = 5.0  # an idle keep-alive connection is closed after this
# A policy's answer may hold at most this many bytes per character of --max-text-chars per sample (JSON
# escapes, token log-probabilities), plus ANSWER_SLACK_BYTES; a larger answer is a 502, not read on.
ANSWER_BYTES_PER_CHAR = 16
ANSWER_SLACK_BYTES = 2 ** 20


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
    max_connections: int | None = None  # open connections (None: from the file-descriptor limit, connections.py)
    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    keep_alive_s: float = KEEP_ALIVE_S

    def __post_init__(self) -> None:
        http_url(self.policy_url, "policy_url")
        for name in ("n", "max_queue", "max_batch_candidates", "max_images", "max_image_pixels", "image_workers",
                     "max_body_bytes", "max_text_chars", "max_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n > self.max_samples:
            raise ValueError(f"n ({self.n}) must be <= max_samples ({self.max_samples}); lower --n or raise "
                             "--max-samples")
        if self.retries < 0 or self.upstream_timeout <= 0 or self.batch_window_ms < 0 or self.image_timeout_s <= 0:
            raise ValueError("retries and batch_window_ms must be >= 0, upstream_timeout and image_timeout_s > 0")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if min(self.header_timeout_s, self.body_timeout_s, self.keep_alive_s) <= 0:
            raise ValueError("header_timeout_s, body_timeout_s and keep_alive_s must be > 0")
        if self.image_root is not None:
            self.image_root = os.path.realpath(existing_directory(self.image_root, "image_root"))
        if any(not k for k in self.client_api_keys):
            raise ValueError("client_api_keys holds an empty key")
        if self.aggregate is not None:
            get_aggregation(self.aggregate)
        get_strategy(self.strategy)


# --------------------------------------------------------------------------
# checks shared by ServerConfig and the command's argparse types (mmprm_infer/cli/serve.py)
# --------------------------------------------------------------------------


def http_url(value: str, name: str = "--policy-url") -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{name} must be an http(s) URL such as http://127.0.0.1:8000/v1, got {value!r}")
    return value


def existing_directory(value: str, name: str = "--image-root") -> str:
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
