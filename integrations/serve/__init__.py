"""An OpenAI-compatible reranking server: any policy server behind it, a PRM inside it.

    mmprm serve --policy-url http://127.0.0.1:8000/v1 --prm DIR --n 8 --aggregate min

Endpoints:

- ``POST /v1/chat/completions``, ``POST /v1/completions``: the request goes
  to the upstream policy with ``n`` = the server's ``--n`` (or the request's
  ``best_of``, or its ``n`` if larger); the samples are scored by the PRM and
  the best ``n`` (the client's ``n``, default 1) come back as ``choices``,
  best first.  Each choice carries ``prm``: ``score`` (null when the PRM could
  not read the sample), ``step_rewards``, ``rank``, ``sample_index``,
  ``answer`` and ``error``; the response carries ``prm`` with the scores of
  all samples.  The PRM's question is the last user message's text (chat),
  the prompt (completions), or the request's ``question`` field.  Images:
  ``image_url`` content parts holding ``data:`` URLs (or, with
  ``--image-root``, paths of files under it) go to the PRM and, as data URLs,
  to the policy.  ``stream=true`` gets the chosen choices as server-sent
  events once scoring is done (stream.py).  Completions prompts may be
  token ids: they go to the policy as given; the PRM's question then comes
  from ``question`` (or, with ``--decode-token-prompts``, from the PRM's
  tokenizer -- right only when policy and PRM share a tokenizer).
- ``POST /v1/prm/score``: ``{question, candidates, image?, aggregate?,
  strategy?}`` -> step rewards, scores, ranking.
- ``GET /health`` (never asks for a key), ``GET /v1/models``: the one model
  name clients may use -- ``--served-model-name``, else the policy's model.
  A request naming another model gets 404 (code ``model_not_found``); the
  response's ``model`` is the name asked for.

Scoring: one scorer task pulls requests from an asyncio queue, waits up to
``--batch-window-ms`` for more (up to ``max_batch_candidates`` candidates),
and scores them all with one PRM engine call in a worker thread; each
request gets back only its own candidates' results (batcher.py).  At most ``--max-queue``
requests are admitted at once (waiting for the policy or the PRM); more get
503.  Toward the policy: ``--upstream-timeout`` per attempt, ``--retries``
retries with exponential backoff on connection errors, timeouts, 429 and
5xx; then 502 (504 when the last attempt timed out); a malformed answer is
502 too.  A request the policy rejects with 400/422 is answered 400 with the
policy's message.

Limits and safety (options.py has the defaults, mmprm_infer/cli/serve.py the flags): a client
key (401), body bytes (413), characters per text (policy samples included),
samples per request (prompts x n), images per request and pixels per image
(400); local image paths only under ``--image-root``, and only PNG, JPEG,
GIF, WebP, BMP and TIFF decoded (images.py); open connections and the time
a request's head and body may take (connections.py: 503, 408).  Client
errors are 400/401/404/408/413 with an OpenAI-style ``{"error": {"message":
...}}``, never 500; the policy's URL and error text stay in the server's log.
A request whose client disconnects is cancelled, upstream call and scoring
included.

The package: ``protocol`` (request models, reranked responses), ``app``
(``create_app``, the routes, ``run_server``), ``batcher`` (the PRM scorer),
``upstream`` (the policy client), ``guard`` (key and body size), ``images``,
``connections`` (uvicorn's settings, connection and time bounds, log rate limit),
``stream``, ``errors``, and ``options`` (``ServerConfig`` and its defaults;
no fastapi there, so the CLI builds its parser without the 'serve' extra).
``from mmprm_infer.integrations.serve import create_app`` imports the app (and fastapi) only when asked for.
"""

from __future__ import annotations

import importlib

__all__ = ["ServerConfig", "create_app", "run_server",
           "PRMBatcher", "Upstream", "APIError", "UpstreamError"]

_HOMES = {"ServerConfig": "options", "create_app": "app", "run_server": "app", "PRMBatcher": "batcher",
          "Upstream": "upstream", "APIError": "errors", "UpstreamError": "errors"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
