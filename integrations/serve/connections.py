"""Connections to the reranking server, bounded: how many, how long a request may take to arrive, and logs.

``--max-queue`` counts requests the server works on; a connection that sends
half a request head and then nothing never becomes one, so without these
bounds a few hundred such sockets use up the file descriptors (every
``accept()`` then fails, and logs it).  uvicorn's own settings do part of it
(``limit_concurrency``: a request arriving while every connection slot is in
use gets 503; ``timeout_keep_alive``: an idle keep-alive connection is closed;
``h11_max_incomplete_event_size``: the request line and headers are capped);
``BoundedH11Protocol`` adds the rest to uvicorn's h11 protocol:

- at most ``--max-connections`` connections are open: the next one gets a bare
  503 and is closed at once, freeing its descriptor;
- a request's head (request line and headers) must arrive within
  ``--header-timeout`` seconds of its first byte (or of the connection), its
  body within ``--body-timeout`` seconds after the head; otherwise 408 and the
  connection is closed.  The time counts from the start, so a client that
  trickles a byte now and then gains nothing.

``RepeatedLogFilter`` lets the same log line through a few times per window
and then counts it, so an attack or a broken client cannot fill the disk with
one message.  For a server reachable from the internet, put a reverse proxy
(nginx, a cloud load balancer) in front as well: it buffers slow clients.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from collections.abc import Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["BoundedH11Protocol", "RepeatedLogFilter", "default_max_connections", "uvicorn_config",
           "MAX_HEADER_BYTES", "LOGGERS"]

log = logging.getLogger("mmprm.server")

MAX_HEADER_BYTES = 16 * 1024  # request line and headers (h11's default, made explicit)
# the loggers whose repeated lines are rate-limited (not uvicorn.access: one line per request is its point)
LOGGERS = ("asyncio", "uvicorn.error", "mmprm.server")


def default_max_connections() -> int:
    """Open connections allowed by default: half the file descriptors this process may open (each admitted
    request may hold one more toward the policy), less a margin for the model's files; 1024 at most."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(8, min(1024, (soft - 64) // 2))


def _reply(status: bytes) -> bytes:
    return b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a cap on open connections and time limits on a request's head and body
    (see the module's doc).  The settings are class attributes: ``bounded_protocol`` makes a subclass."""

    max_connections: int = 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._timer = None
        self._phase: str | None = None
        if len(self.connections) > self.max_connections:
            log.warning("refused a connection: %d are open, the limit (--max-connections)", self.max_connections)
            transport.write(_reply(b"503 Service Unavailable"))
            transport.close()
            return
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc) -> None:
        self._set_phase(None)
        super().connection_lost(exc)

    def _watch(self) -> None:
        """Which part of a request the connection waits for, if any: its head (no keep-alive timer covers the
        wait), or its body; the timer of that part runs from when the wait began."""
        if self.transport.is_closing():
            return self._set_phase(None)
        state = self.conn.their_state
        if state is h11.IDLE and self.timeout_keep_alive_task is None:
            self._set_phase("head")
        elif state is h11.SEND_BODY:
            self._set_phase("body")
        else:
            self._set_phase(None)

    def _set_phase(self, phase: str | None) -> None:
        if phase == getattr(self, "_phase", None):
            return
        if getattr(self, "_timer", None) is not None:
            # _timer is first set below (hence the getattr)
            self._timer.cancel()  # type: ignore[attr-defined]
        self._phase, self._timer = phase, None
        if phase is not None:
            limit = self.header_timeout_s if phase == "head" else self.body_timeout_s
            self._timer = self.loop.call_later(limit, self._too_slow, phase, limit)  # type: ignore[assignment]

    def _too_slow(self, phase: str, limit: float) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        flag = "--header-timeout" if phase == "head" else "--body-timeout"
        log.info("closed a connection whose request %s did not arrive within %g s (%s)", phase, limit, flag)
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_reply(b"408 Request Timeout"))
        self.transport.close()  # an app waiting for the body sees the client leave


def bounded_protocol(max_connections: int, header_timeout_s: float, body_timeout_s: float) -> type:
    return type("BoundedH11Protocol", (BoundedH11Protocol,), {
        "max_connections": max_connections, "header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s})


class RepeatedLogFilter(logging.Filter):
    """Lets a line (same logger, level and message template) through ``burst`` times per ``window_s``; the
    others are dropped and counted, and the next line let through says how many were."""

    def __init__(self, window_s: float = 10.0, burst: int = 5, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 4096):
        super().__init__()
        self.window_s, self.burst, self.clock, self.max_keys = window_s, burst, clock, max_keys
        self._seen: dict[tuple, list] = {}  # key -> [window start, lines let through in it, lines dropped]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg)[:300])
        now = self.clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is None:
                if len(self._seen) >= self.max_keys:
                    self._seen.clear()
                entry = self._seen[key] = [now, 0, 0]
            if now - entry[0] >= self.window_s:
                entry[0], entry[1] = now, 0
            if entry[1] >= self.burst:
                entry[2] += 1
                return False
            entry[1] += 1
            dropped, entry[2] = entry[2], 0
        if dropped:
            record.msg = f"{record.msg} [{dropped} more like this were not logged]"
        return True


def install_log_filter(loggers=LOGGERS, **options) -> RepeatedLogFilter | None:
    """One RepeatedLogFilter on each of ``loggers`` (once: a second call finds it there)."""
    shared: RepeatedLogFilter | None = None  # None where no logger is named
    for name in loggers:
        logger = logging.getLogger(name)
        found = next((f for f in logger.filters if isinstance(f, RepeatedLogFilter)), None)
        if found is None:
            shared = shared or RepeatedLogFilter(**options)
            logger.addFilter(shared)
        else:
            shared = shared or found
    return shared


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings for the app ``create_app`` made, its bounds from the app's ``ServerConfig``."""
    config = app.state.mmprm.config
    max_connections = config.max_connections or default_max_connections()
    server = uvicorn.Config(
        app, host=host, port=port, log_level=log_level,
        http=bounded_protocol(max_connections, config.header_timeout_s, config.body_timeout_s),
        limit_concurrency=max_connections, timeout_keep_alive=config.keep_alive_s,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES)
    install_log_filter()  # after uvicorn.Config, which (re)configures its loggers
    return server
