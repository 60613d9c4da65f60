"""Progress bars that suit where the output goes.

On a terminal, ``progress_bar`` is an ordinary tqdm bar.  Where stderr is not
a terminal (a CI log, ``> run.log 2>&1``), redrawn bars would flood the file
with carriage-return frames, so it counts silently instead and writes one
line when the stage ends::

    train PRM: 600/600 steps in 61.3 s (loss=0.3469, lr=1.52e-08)

Both kinds take the calls the library makes on a bar: iteration, ``update``,
``set_postfix``, ``close`` and use as a context manager.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["progress_bar", "StageLine", "interactive", "quiet_transformers_progress"]


def interactive(stream=None) -> bool:
    """Whether ``stream`` (default stderr, where bars go) is a terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class StageLine:
    """A stand-in for a tqdm bar that prints one summary line at ``close`` (see the module docstring)."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, file=None, **_ignored: Any):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None or iterable is None else _length(iterable)
        self.n, self.initial = initial, initial
        self.file = file
        self.postfix = ""
        self.start = time.perf_counter()
        self.closed = False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.n += 1
        finally:
            self.close()

    def __enter__(self) -> StageLine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        tail = f" ({self.postfix})" if self.postfix else ""
        print(f"{self.desc}: {done} {self.unit} in {time.perf_counter() - self.start:.1f} s{tail}",
              file=self.file or sys.stderr, flush=True)


def _length(iterable) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 disable: bool = False, initial: int = 0, **tqdm_kwargs: Any):
    """A tqdm bar on a terminal, a one-line-per-stage ``StageLine`` elsewhere; nothing at all with
    ``disable``.  Arguments as tqdm's."""
    from tqdm.auto import tqdm  # tqdm: only where a bar is drawn

    if disable:
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=True)
    if not interactive(tqdm_kwargs.get("file")):
        return StageLine(iterable, total=total, desc=desc, unit=unit, initial=initial, file=tqdm_kwargs.get("file"))
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, **tqdm_kwargs)


def quiet_transformers_progress() -> None:
    """Turn off transformers' and huggingface_hub's own bars ("Loading weights", "Writing model shards"):
    the commands show their own stages.  Before transformers is imported this only sets
    ``HF_HUB_DISABLE_PROGRESS_BARS`` (which both read when they load); after, it also tells transformers."""

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging  # transformers: heavy, loaded where used

        hf_logging.disable_progress_bar()
