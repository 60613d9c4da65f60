"""Reading benchmark files as their releases ship them: JSONL, JSON (a list, or {"split": [...]}),
Parquet; one file per split, or a folder of them.  Every record keeps where it came from
(file, line or row) so a bad one is named by place and field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mmprm_infer.io.records import decode_line

__all__ = ["Record", "BenchmarkDataError", "read_records", "read_splits", "field", "string_list", "SUFFIXES"]

SUFFIXES = (".jsonl", ".json", ".parquet", ".pq")


class BenchmarkDataError(ValueError):
    """A record that does not have the benchmark's layout; the message names file, line and field."""


@dataclass
class Record:
    data: dict
    where: str  # "file.jsonl line 3" / "file.parquet row 3" / "file.json item 3"

    def error(self, message: str) -> BenchmarkDataError:
        return BenchmarkDataError(f"{self.where}: {message}")


def _plain(value: Any) -> Any:
    """numpy arrays and scalars (as Parquet readers give them) as lists and Python numbers."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_records(path: str | Path) -> Iterator[Record]:
    path = Path(path)
    if path.suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield Record(_plain(row), f"{path.name} row {i}")
        return
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BenchmarkDataError(f"{path.name}: not a JSON file ({exc})") from None
        items = data if isinstance(data, list) else None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            items = next(iter(data.values()))  # {"split": [...]}
        if items is None:
            raise BenchmarkDataError(f"{path.name}: expected a list of records (or {{split: [records]}})")
        for i, item in enumerate(items, 1):
            if not isinstance(item, dict):
                raise BenchmarkDataError(f"{path.name} item {i}: expected a JSON object")
            yield Record(item, f"{path.name} item {i}")
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path.name} line {number}"
            try:
                text = decode_line(raw.rstrip(b"\r\n"), number)
            except ValueError as exc:
                raise BenchmarkDataError(f"{path.name} {exc}") from None
            if not text.strip():
                continue
            try:
                item = json.loads(text)
            except json.JSONDecodeError as exc:
                raise BenchmarkDataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(item, dict):
                raise BenchmarkDataError(f"{where}: expected a JSON object")
            yield Record(item, where)


def read_splits(path: str | Path) -> dict[str, list[Record]]:
    """``{split name: records}``: a file is one split named by its stem, a folder one split per file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and not p.name.startswith("."))
        if not files:
            raise BenchmarkDataError(f"{path}: no {', '.join(SUFFIXES)} files in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise BenchmarkDataError(f"{path} does not exist")
    return {f.stem: list(read_records(f)) for f in files}


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
