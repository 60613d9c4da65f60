"""Output files that are never half-written: a temp file beside the target, renamed at the end.

A run that fails (bad record, full disk, Ctrl-C) leaves the previous output
as it was and no temp file behind; readers see the old file or the whole new
one.  ``check_output_path`` refuses, before any work starts, an output that
cannot be written or that is the input itself.  ``existing_files``: the
image paths of input records, relative to their data file, as files that exist.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

__all__ = ["OutputError", "atomic_output", "check_output_path", "existing_files", "write_json_atomic"]


def _target(path: str | os.PathLike) -> Path:
    # an output given as a symlink is written where the link points, and the link stays
    return Path(os.path.realpath(path))


def check_output_path(output: str | os.PathLike, input: str | os.PathLike | None = None) -> Path:
    """The real path ``output`` will be written to; ValueError naming the problem when the
    folder is missing, the path is a folder, or it is ``input`` (directly or through a link)."""
    target = _target(output)
    if target.is_dir():
        raise ValueError(f"output {output} is a folder; give a file path, e.g. {Path(output) / 'out.jsonl'}")
    if not target.parent.is_dir():
        raise ValueError(f"the folder of output {output} ({target.parent}) does not exist; create it first")
    if input is not None and (target == _target(input) or (target.exists() and os.path.samefile(target, input))):
        raise ValueError(f"output {output} is the input file {input}; writing it would destroy the input, "
                         "choose another output path")
    return target


class OutputError(Exception):
    """Writing an output file failed (full disk, read-only folder); the previous file is untouched."""

    def __init__(self, path: str | os.PathLike, error: OSError):
        super().__init__(f"cannot write {path}: {error.strerror or error}; nothing was written "
                         "(a previous file there is untouched)")
        self.path, self.error = path, error


class _Guarded:
    """A file handle whose write errors are OutputErrors naming the target."""

    def __init__(self, handle: IO[Any], path: str | os.PathLike):
        self._handle, self._path = handle, path

    def write(self, data):
        try:
            return self._handle.write(data)
        except OSError as exc:
            raise OutputError(self._path, exc) from exc

    def __getattr__(self, name):
        return getattr(self._handle, name)


@contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """A handle on a temp file beside ``path``; on a clean exit it is fsynced and renamed onto
    ``path``, on any exception (KeyboardInterrupt included) it is removed and ``path`` is untouched.
    A failed write, flush or rename raises OutputError."""
    target = _target(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    encoding = None if "b" in mode else "utf-8"
    try:
        try:
            handle = open(tmp, mode, encoding=encoding)
        except OSError as exc:
            raise OutputError(path, exc) from exc
        with handle:
            yield _Guarded(handle, path)
            try:
                handle.flush()
                os.fsync(handle.fileno())
            except OSError as exc:
                raise OutputError(path, exc) from exc
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise OutputError(path, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """``data`` as JSON at ``path``, all or nothing (``atomic_output``)."""
    with atomic_output(path) as f:
        json.dump(data, f, ensure_ascii=False)


def existing_files(paths: Sequence[str], base_dir: str | os.PathLike,
                   missing: Callable[[str, Path], Exception]) -> list[str]:
    """Each path as a file that exists: an absolute one as given, a relative one under ``base_dir`` (a data
    file's folder, say); the first that is not a file raises ``missing(path as given, where it was looked)``."""
    out = []
    for p in paths:
        full = Path(p) if Path(p).is_absolute() else Path(base_dir) / p
        if not full.is_file():
            raise missing(p, full)
        out.append(str(full))
    return out
