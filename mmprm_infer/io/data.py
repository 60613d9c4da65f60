"""The one reader of record files: every command and every loader that reads records goes through here.

What it reads (a file, or a folder of them):

- JSONL (one object a line; blank lines skipped, a UTF-8 byte-order mark ignored), JSON (a list of objects,
  or ``{"split": [...]}``), Parquet, and Arrow (``.arrow``: IPC stream or file, as the ``datasets`` library
  writes them);
- Hugging Face dataset shards: ``train-00000-of-00002.parquet`` and ``train-00001-of-00002.parquet`` are one
  split, ``train`` (the hub's ``data/`` folders; a trailing ``-<hash>`` of older exports is allowed);
- the ``datasets`` library's ``save_to_disk`` folders: a ``Dataset`` (``state.json`` naming its
  ``data-*.arrow`` files) is one split named after its folder, a ``DatasetDict`` (``dataset_dict.json``) one
  split per sub-folder.

Every record keeps where it came from (``Record.where``: "file.jsonl line 3", "file.parquet row 3",
"file.json item 3") and the file (``Record.path``: relative image paths are relative to its folder), so a
bad one is named by file, place and field (``field``).  Parquet and Arrow need ``pyarrow`` (a dependency).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Record", "DataError", "read_records", "read_splits", "data_files", "split_name", "field", "line_limit",
           "LINE_CHARS_PER_CONTEXT_TOKEN",
           "string_list", "SUFFIXES", "decode_line"]

SUFFIXES = (".jsonl", ".json", ".parquet", ".pq", ".arrow")
_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}(?:-[0-9a-f]{8,})?$")


class DataError(ValueError):
    """A record file that cannot be read, or a record without the layout asked of it; the message names
    the file, the line (row, item) and the field."""


# A line (a record as JSON text) longer than this many characters per token of the PRM's context is refused
# before it is tokenized: a question and its candidates each fit the context, so 64 per context token leaves
# room for dozens of long candidates, while a runaway line (tokenizing 50 MB took 12 GB) never reaches the
# tokenizer.  `mmprm score --max-line-chars` overrides it.
LINE_CHARS_PER_CONTEXT_TOKEN = 64
CONTEXT_WHEN_UNKNOWN = 131_072  # tokens, for a PRM that does not say (and for --strategy majority_vote)


def line_limit(prm, override: int | None = None) -> tuple[int, str]:
    """The longest line (characters) to parse and score, and where the number comes from."""
    if override is not None:
        return override, "--max-line-chars"
    context = getattr(getattr(prm, "adapter", None), "max_positions", None) if prm is not None else None
    what = f"the PRM's {context}-token context" if context else f"a {CONTEXT_WHEN_UNKNOWN}-token context"
    return LINE_CHARS_PER_CONTEXT_TOKEN * (context or CONTEXT_WHEN_UNKNOWN), \
        f"--max-line-chars; default {LINE_CHARS_PER_CONTEXT_TOKEN} per token of {what}"



@dataclass
class Record:
    data: dict
    where: str  # "file.jsonl line 3" / "file.parquet row 3" / "file.json item 3"
    path: Path | None = None  # the file it came from

    def error(self, message: str) -> DataError:
        return DataError(f"{self.where}: {message}")


def decode_line(data: bytes, line: int) -> str:
    """One input line as text: UTF-8 (a byte-order mark before line 1 is dropped), else a ValueError
    naming the line and the byte."""
    if line == 1 and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"line {line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {exc.start + 1}); "
                         "save the file as UTF-8") from None


def _plain(value: Any) -> Any:
    """numpy arrays and scalars (as Parquet readers give them) as lists and Python numbers."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _pyarrow(path: Path):
    try:
        # pyarrow: heavy, loaded where used
        import pyarrow  # noqa: F401
    except ImportError:
        raise DataError(f"{path}: reading {path.suffix} files needs pyarrow (pip install pyarrow); or convert the "
                        "file to JSONL") from None


def _arrow_table(path: Path):
    """An Arrow IPC file, stream (``datasets``' own) or file format."""
    import pyarrow as pa  # pyarrow: heavy, loaded where used

    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            pass
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid as exc:
            raise DataError(f"{path}: not an Arrow file ({exc})") from None


def _table_records(path: Path, kind: str) -> Iterator[Record]:
    _pyarrow(path)
    if kind == "parquet":
        import pyarrow as pa  # pyarrow: heavy, loaded where used
        import pyarrow.parquet as pq  # pyarrow: heavy, loaded where used

        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{path}: not a Parquet file ({exc})") from None
    else:
        table = _arrow_table(path)
    for i, row in enumerate(table.to_pylist(), 1):
        yield Record(_plain(row), f"{path} row {i}", path)


def _json_records(path: Path) -> Iterator[Record]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                        "save it as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    items = data if isinstance(data, list) else None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        items = next(iter(data.values()))  # {"split": [...]}
    if items is None:
        raise DataError(f"{path}: expected a list of records (or {{split: [records]}}), got a JSON "
                        f"{type(data).__name__}")
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise DataError(f"{path} item {i}: expected a JSON object, got {type(item).__name__}")
        yield Record(item, f"{path} item {i}", path)


def _jsonl_records(path: Path) -> Iterator[Record]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path} line {number}"
            try:
                text = decode_line(raw.rstrip(b"\r\n"), number)
            except ValueError as exc:
                raise DataError(f"{path} {exc}") from None
            if not text.strip():
                continue
            try:
                item = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(item, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
            yield Record(item, where, path)


def _is_json_document(path: Path) -> bool:
    """A JSON list or {"split": [...]} rather than JSON Lines: a file starting with "[", or holding one
    object (``datasets``' ``to_json`` writes JSON Lines under a .json name, so the name alone cannot say)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        return True
    if not head.startswith(b"{") or path.suffix.lower() != ".json":
        return False
    try:
        json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        return exc.msg != "Extra data"  # a second object: JSON Lines
    except UnicodeDecodeError:
        return True
    return True


def _file_records(path: Path) -> Iterator[Record]:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        yield from _table_records(path, "parquet")
    elif suffix == ".arrow":
        yield from _table_records(path, "arrow")
    elif _is_json_document(path):
        yield from _json_records(path)
    else:
        yield from _jsonl_records(path)


def split_name(path: Path) -> str:
    """The split a file holds: its stem, less a Hugging Face shard suffix (``gsm8k-00000-of-00001`` -> gsm8k)."""
    stem = path.name[:-len(path.suffix)] if path.suffix else path.name
    match = _SHARD.match(stem)
    return match.group("split") if match else stem


def _saved_dataset(folder: Path) -> list[Path] | None:
    """The Arrow files of a ``datasets`` ``save_to_disk`` folder of one split (None if it is not one)."""
    state = folder / "state.json"
    if not state.is_file() or not (folder / "dataset_info.json").is_file():
        return None
    try:
        files = [folder / f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{state}: not a datasets state.json ({type(exc).__name__}: {exc})") from None
    return files


def data_files(path: str | os.PathLike, exclude: Iterable[str | Path] = ()) -> dict[str, list[Path]]:
    """``{split name: its files}`` under ``path`` (see the module docstring), leaving out ``exclude`` (this
    run's own outputs, when they sit in the data folder)."""
    path = Path(path)
    skip = {Path(p).resolve() for p in exclude}
    if path.is_file():
        return {split_name(path): [path]}
    if not path.is_dir():
        raise DataError(f"{path} does not exist")
    saved = _saved_dataset(path)
    if saved is not None:
        return {path.name: saved}
    dict_file = path / "dataset_dict.json"
    if dict_file.is_file():  # datasets' DatasetDict.save_to_disk
        try:
            names = json.loads(dict_file.read_text(encoding="utf-8"))["splits"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{dict_file}: not a datasets dataset_dict.json ({type(exc).__name__}: {exc})") from None
        splits: dict[str, list[Path]] = {}
        for name in names:
            files = _saved_dataset(path / name)
            if files is None:
                raise DataError(f"{path / name}: split {name!r} of {dict_file} has no state.json / dataset_info.json")
            splits[name] = files
        return splits
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES
                   and not p.name.startswith(".") and p.resolve() not in skip)
    if not files and (path / "data").is_dir():  # a hub dataset's checkout: data/<split>-*.parquet
        return data_files(path / "data", exclude)
    if not files:
        raise DataError(f"{path}: no {', '.join(SUFFIXES)} files in this folder")
    out: dict[str, list[Path]] = {}
    for f in files:
        out.setdefault(split_name(f), []).append(f)
    return out


def read_records(path: str | os.PathLike, exclude: Iterable[str | Path] = ()) -> Iterator[Record]:
    """Every record of a file, or of every split of a folder (in split order, shards in order)."""
    for files in data_files(path, exclude).values():
        for f in files:
            yield from _file_records(f)


def read_splits(path: str | Path, exclude: Iterable[str | Path] = ()) -> dict[str, list[Record]]:
    """``{split name: records}``: a file is one split, a folder one split per file or per group of shards."""
    return {name: [r for f in files for r in _file_records(f)] for name, files in data_files(path, exclude).items()}


_MISSING = object()


def field(record: Record, name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    """``record.data[name]`` (dotted names reach into objects), checked against ``kind``."""
    value: Any = record.data
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            if default is not _MISSING:
                return default
            raise record.error(f"missing field '{name}'")
        value = value[part]
    if isinstance(kind, type) and kind is int and isinstance(value, bool):
        raise record.error(f"field '{name}' must be an integer, got a bool")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise record.error(f"field '{name}' must be {names}, got {type(value).__name__}")
    return value


def string_list(record: Record, name: str) -> list[str]:
    """A non-empty list of strings (a solution's steps)."""
    value = field(record, name, list)
    if not value or not all(isinstance(s, str) for s in value):
        raise record.error(f"field '{name}' must be a non-empty list of strings")
    return value
