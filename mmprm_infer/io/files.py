"""Output files that are never half-written: a temp file beside the target, renamed at the end.

A run that fails (bad record, full disk, Ctrl-C, SIGTERM) leaves the previous
output as it was and no temp file behind; readers see the old file or the
whole new one.  A temp file a killed run left (``kill -9``: nothing runs at
the kill) is removed by the next run that writes the same output, once the
process that made it is gone.  An output that exists and is not a regular
file -- a character device such as /dev/null, a FIFO, /dev/stdout -- is
written in place and never renamed over; a socket, a block device or another
kind of file is refused.  ``check_output_path`` refuses, before any work
starts, an output that cannot be written or that is the input itself.
``existing_files``: the image paths of input records, relative to their data
file, as files that exist.
"""

from __future__ import annotations

import errno
import json
import math
import os
import platform
import re
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["OutputError", "atomic_output", "check_output_path", "existing_files", "write_json_atomic",
           "written_in_place", "remove_stale_temps", "sweep_stale_temps", "temp_name", "json_safe", "lone_surrogate"]


def _target(path: str | os.PathLike) -> Path:
    # an output given as a symlink is written where the link points, and the link stays
    return Path(os.path.realpath(path))


def written_in_place(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an existing character device or FIFO (through links): written in place, never
    replaced.  ValueError for a kind of file that is neither that nor a regular file (socket, block device)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ValueError(f"output {path} cannot be examined: {exc.strerror or exc}") from None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return False
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        return True
    kind = "a socket" if stat.S_ISSOCK(mode) else "a block device" if stat.S_ISBLK(mode) else "not a regular file"
    raise ValueError(f"output {path} is {kind}; give a regular file path (or a character device or FIFO, which "
                     "are written in place)")


def check_output_path(output: str | os.PathLike, input: str | os.PathLike | None = None) -> Path:
    """The real path ``output`` will be written to; ValueError naming the problem when the folder is
    missing or cannot be written in, the path is a folder, a socket or a block device, or it is ``input``
    (directly or through a link)."""
    if written_in_place(output):
        if not os.access(output, os.W_OK):
            raise ValueError(f"output {output} is not writable (permission denied)")
        return Path(output)
    target = _target(output)
    if target.is_dir():
        raise ValueError(f"output {output} is a folder; give a file path, e.g. {Path(output) / 'out.jsonl'}")
    if not target.parent.is_dir():
        raise ValueError(f"the folder of output {output} ({target.parent}) does not exist; create it first")
    if input is not None and (target == _target(input) or (target.exists() and os.path.samefile(target, input))):
        raise ValueError(f"output {output} is the input file {input}; writing it would destroy the input, "
                         "choose another output path")
    try:  # the temp file and the rename need the folder writable: try it now, not after the model loaded
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write in the folder of output {output} ({target.parent}): "
                         f"{exc.strerror or exc}; choose a writable folder") from None
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


def _host() -> str:
    return "".join(c for c in platform.node() if c.isalnum() or c == ".") or "host"


def temp_name(target: Path, kind: str = "tmp") -> Path:
    """``.NAME.tmp-HOST-PID-TID`` beside ``target``: whose it is, so a later run can tell a dead one's."""
    return target.with_name(f".{target.name}.{kind}-{_host()}-{os.getpid()}-{threading.get_ident()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


# .NAME.KIND-HOST-PID-TID (temp_name), or .NAME.KIND-PID-TID as earlier versions named them
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<host>[A-Za-z0-9.]+)-)?(?P<pid>\d+)-\d+$")
_swept: set[str] = set()  # folders this process has swept for stale temp files (each once)


def _stale(name: str) -> re.Match | None:
    """The parts of a temp file's name when a process of this host that no longer runs left it, else None."""
    m = _TEMP_NAME.match(name)
    if m is None or (m["host"] or _host()) != _host():  # another host's (a shared folder): not ours to judge
        return None
    pid = int(m["pid"])
    return None if pid == os.getpid() or _pid_alive(pid) else m


def remove_stale_temps(target: Path, kind: str = "tmp", remove: Callable[[Path], None] | None = None) -> list[Path]:
    """Remove the temp files or folders (``temp_name``) of ``target`` that processes of this host which no longer
    run left behind (a SIGKILL, a power cut); another host's, or a running process's, are left alone."""
    removed: list[Path] = []
    try:
        names = os.listdir(target.parent)
    except OSError:
        return removed
    for name in names:
        m = _stale(name)
        if m is None or m["name"] != target.name or m["kind"] != kind:
            continue
        try:
            (remove or Path.unlink)(target.parent / name)
            removed.append(target.parent / name)
        except OSError:
            pass
    return removed


def sweep_stale_temps(folder: Path) -> None:
    """``remove_stale_temps`` for every output file in ``folder``, listed once per process: a folder that
    receives thousands of outputs (annotation trees) is not listed again for each."""
    key = os.fspath(folder)
    if key in _swept:
        return
    _swept.add(key)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = _stale(name)
        if m is not None and m["kind"] == "tmp" and (folder / name).is_file() and not (folder / name).is_symlink():
            try:
                (folder / name).unlink()
            except OSError:
                pass


def _close_quietly(handle: IO[Any]) -> None:
    try:
        handle.close()
    except OSError:  # a failed run is reported by the error that failed it, not by its close
        pass


def _open(path, mode: str, output) -> IO[Any]:
    try:
        return open(path, mode, encoding=None if "b" in mode else "utf-8")
    except OSError as exc:
        raise OutputError(output, exc) from exc


def _finish(handle: IO[Any], output, sync: bool) -> None:
    """Flush (fsync a regular file) and close; any failure, the close's included, is an OutputError."""
    try:
        handle.flush()
        if sync:
            os.fsync(handle.fileno())
        handle.close()
    except OSError as exc:
        raise OutputError(output, exc) from exc


@contextmanager
def _writing(path, mode: str, output, sync: bool) -> Iterator[IO[Any]]:
    """A handle on ``path`` whose errors name ``output``: flushed (fsynced when ``sync``) and closed on a clean
    exit, where any failure is an OutputError; closed quietly when the block fails."""
    handle = _open(path, mode, output)
    try:
        # _Guarded wraps the handle, with IO's methods
        yield _Guarded(handle, output)  # type: ignore[misc]
        _finish(handle, output, sync)
    except BaseException:
        _close_quietly(handle)
        raise


@contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """A handle on a temp file beside ``path``; on a clean exit it is fsynced and renamed onto
    ``path``, on any exception (KeyboardInterrupt included) it is removed and ``path`` is untouched.
    A failed write, flush, close or rename raises OutputError.  A character device or FIFO at ``path``
    is written in place (``written_in_place``)."""
    try:
        in_place = written_in_place(path)
    except ValueError as exc:
        raise OutputError(path, OSError(errno.EINVAL, str(exc))) from None
    if in_place:
        with _writing(path, mode, path, sync=False) as handle:
            yield handle
        return
    target = _target(path)
    sweep_stale_temps(target.parent)
    tmp = temp_name(target)
    try:
        with _writing(tmp, mode, path, sync=True) as handle:
            yield handle
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise OutputError(path, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def json_safe(data: Any, path: str = "") -> tuple[Any, list[str]]:
    """``data`` with every NaN or infinite float replaced by None (strict JSON has no NaN), and the
    paths (``a.b[2]``) of the values replaced."""
    replaced: list[str] = []

    def walk(value, where):
        if isinstance(value, float) and not math.isfinite(value):
            replaced.append(where or "(top)")
            return None
        if isinstance(value, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    return walk(data, path), replaced


def lone_surrogate(value: Any, where: str = "") -> str | None:
    """Where in ``value`` (``field``, ``a.b[2]``) the first string holding a lone UTF-16 surrogate sits (JSON's
    ``"\\ud800"`` escape decodes to one; UTF-8 cannot encode it, so it is not text), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return repr(where) if where else "a string"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{where}.{key}" if where else str(key)
            found = lone_surrogate(key, f"{inner} (its name)") if isinstance(key, str) else None
            found = found or lone_surrogate(item, inner)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = lone_surrogate(item, f"{where}[{i}]")
            if found:
                return found
    return None


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """``data`` as JSON at ``path``, all or nothing (``atomic_output``).  Text that UTF-8 cannot hold (a lone
    surrogate) is written as a JSON escape."""
    try:
        text = json.dumps(data, ensure_ascii=False)
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(data)
    with atomic_output(path) as f:
        f.write(text)


def existing_files(paths: Sequence[str], base_dir: str | os.PathLike,
                   missing: Callable[[str, Path], Exception]) -> list[str]:
    """Each path as a file that exists: an absolute one as given, a relative one under ``base_dir`` (a data
    file's folder, say); the first that is not a file raises ``missing(path as given, where it was looked)``."""
    out = []
    for p in paths:
        full = Path(p) if Path(p).is_absolute() else Path(base_dir) / p
        try:
            found = full.is_file()
        except (OSError, ValueError):  # a NUL byte, a name the file system cannot hold
            found = False
        if not found:
            raise missing(p, full)
        out.append(str(full))
    return out
