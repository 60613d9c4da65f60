"""Input records of `mmprm score|rerank`: read in fixed windows, parse, score, write in input order.

A record is {"question": str, "candidates": [str | [str, ...]], "image":
optional path or list of paths relative to the input file, "id": optional},
one per JSONL line or one per Parquet row; JSON, Arrow and folders of record
files (Hugging Face shards, ``datasets.save_to_disk``) are read whole by the
one record reader (``mmprm_infer.io.data``) and cut into the same windows.

Inputs are cut into *windows* of ``window`` consecutive lines (Parquet: rows):
window k holds lines k*window+1 .. (k+1)*window.  A window is the unit of
work everywhere: the single-machine loop scores one window per engine call,
and the Ray path (``integrations.ray_scoring``) hands whole windows to its
actors.  Both therefore make the same engine calls on the same inputs, so
their outputs are identical, and one question's candidates never leave the
actor that holds their shared prefix.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from mmprm_infer.aggregation import aggregate as reduce_steps
from mmprm_infer.io import data as record_files
from mmprm_infer.io.data import DataError, _pyarrow, line_limit, read_records
from mmprm_infer.io.files import existing_files, lone_surrogate
from mmprm_infer.prm import PRM, ScoringItem, batch_then_each
from mmprm_infer.rerank import rerank_batch, resolve_aggregate

__all__ = ["RecordError", "BLANK_LINE", "decode_line", "Window", "WindowResult", "PRMSpec",
           "ScoringOptions", "parse_record", "input_kind", "plan_windows",
           "read_windows", "iter_windows", "base_dir", "process_window", "ResultWriter",
           "EXIT_RECORDS_FAILED", "finished"]


class RecordError(ValueError):
    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message

    def __reduce__(self):  # picklable, so it can travel from a worker process
        return RecordError, (self.line, self.message)




@dataclass
class Window:
    index: int
    # (line number, or Parquet row number from 1; the record as JSON text, or the RecordError
    # of a line that is not UTF-8)
    rows: list[tuple[int, str | RecordError]]


BLANK_LINE = "blank line"  # the "skipped" value of a blank input line's output record


def decode_line(data: bytes, line: int) -> str:
    """One input line as text: UTF-8 (a byte-order mark before line 1 is dropped), else a
    RecordError for this line alone, so the lines around it still count."""

    try:
        return record_files.decode_line(data, line)
    except ValueError as exc:
        raise RecordError(line, str(exc).split(": ", 1)[1]) from None


@dataclass
class PRMSpec:
    """How to load the PRM (``PRM.from_pretrained`` arguments): on this machine or in each Ray actor."""

    path: str
    format: str | None = None
    dtype: str | None = None
    engine: str | None = None
    max_tiles: int | None = None

    def load(self, device: str = "cpu", threads: int | None = None):
        import torch  # torch: heavy, loaded where used

        if threads:
            torch.set_num_threads(threads)
        options: dict[str, Any] = {"max_tiles": self.max_tiles} if self.max_tiles is not None else {}
        return PRM.from_pretrained(self.path, format=self.format, device=device, dtype=self.dtype,
                                   engine=self.engine, **options)


@dataclass
class WindowResult:
    results: list  # one dict (or RecordError) per row of the window, in row order
    candidates: int  # candidates of the records that parsed (for throughput)


@dataclass
class ScoringOptions:
    command: str = "score"  # "score" | "rerank"
    aggregate: str | None = None  # None: the PRM format's release default (rerank.resolve_aggregate)
    strategy: str = "best_of_n"
    engine: str | None = None
    max_line_chars: int | None = None  # None: line_limit(prm)


def parse_record(raw: str, line: int, base_dir: Path) -> tuple[dict, ScoringItem]:
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RecordError(line, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise RecordError(line, "each line must be a JSON object with 'question' and 'candidates'")
    bad = lone_surrogate(record) if "\\u" in raw.lower() else None  # only a \udXXX escape can make one
    if bad is not None:
        raise RecordError(line, f"field {bad} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                                "escape), which is not text; fix how the record was encoded")
    missing = [k for k in ("question", "candidates") if k not in record]
    if missing:
        raise RecordError(line, f"missing field(s) {missing}; each record needs 'question' and 'candidates'")
    if not isinstance(record["question"], str):
        raise RecordError(line, f"'question' must be a string, got {type(record['question']).__name__}")
    if not isinstance(record["candidates"], list) or not record["candidates"]:
        raise RecordError(line, "'candidates' must be a non-empty list of solutions")
    image = record.get("image", record.get("images"))
    if image is not None:
        paths = image if isinstance(image, list) else [image]
        if not paths or not all(isinstance(p, str) and p for p in paths):
            raise RecordError(line, "'image' must be a path or a non-empty list of paths (strings, relative to "
                                    f"the input file), got {json.dumps(image)[:80]}")
        resolved = existing_files(paths, base_dir, lambda _, full: RecordError(
            line, f"image file {full} does not exist (paths are relative to the input file)"))
        image = resolved if isinstance(image, list) else resolved[0]
    return record, ScoringItem(record["question"], record["candidates"], image)


# --------------------------------------------------------------------------
# reading windows
# --------------------------------------------------------------------------
def input_kind(path: str | Path) -> str:
    """jsonl (streamed by byte offsets), parquet (by row groups), or records (JSON, Arrow, a folder: read whole
    by ``mmprm_infer.io.data``)."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() in (".json", ".arrow"):
        return "records"
    return "parquet" if path.suffix.lower() in (".parquet", ".pq") else "jsonl"


def base_dir(path: str | Path) -> Path:
    """The folder an input's relative image paths are relative to: the file's folder, or the folder given."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def _all_records(path: Path) -> list[dict]:
    """Every record of a JSON / Arrow file or a folder (a file that cannot be read raises io.data.DataError)."""

    return [r.data for r in read_records(path)]


def _jsonl_window_offsets(path: Path, window: int) -> list[int]:
    """Byte offsets where each window starts, plus the file size (one pass, no parsing)."""
    offsets, line, pos = [0], 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            start = 0
            while (nl := chunk.find(b"\n", start)) >= 0:
                line += 1
                if line % window == 0:
                    offsets.append(pos + nl + 1)
                start = nl + 1
            pos += len(chunk)
    if offsets[-1] != pos:
        offsets.append(pos)
    return offsets


def _not_parquet(path: Path, exc: Exception) -> DataError:
    return DataError(f"input {path} cannot be read as Parquet ({type(exc).__name__}: {str(exc)[:200]}); files "
                      "ending in .parquet or .pq are read as Parquet, any other name as JSONL")


def _parquet_rows(path: Path) -> int:
    _pyarrow(path)
    import pyarrow.parquet as pq  # pyarrow: heavy, loaded where used

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors (ArrowInvalid, OSError) for a damaged file
        raise _not_parquet(path, exc) from None


def plan_windows(path: str | Path, window: int) -> list[int]:
    """The plan ``read_windows`` reads from: JSONL byte offsets of every window
    boundary, or for Parquet [0, window, 2*window, ..., rows]."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    kind = input_kind(path)
    if kind != "jsonl":
        rows = _parquet_rows(path) if kind == "parquet" else len(_all_records(path))
        return [*range(0, rows, window), rows] if rows else [0]
    return _jsonl_window_offsets(path, window)


def read_windows(path: str | Path, plan: list[int], window: int, first: int, last: int) -> Iterator[Window]:
    """Windows ``first`` .. ``last - 1`` of the plan, every line a row (blank ones too)."""
    path = Path(path)
    kind = input_kind(path)
    if kind == "parquet":
        yield from _read_parquet_windows(path, plan, first, last)
        return
    if kind == "records":
        records = _all_records(path) if last > first else []
        for k in range(first, last):
            yield Window(k, [(plan[k] + i + 1, json.dumps(r, ensure_ascii=False, default=str))
                             for i, r in enumerate(records[plan[k]:plan[k + 1]])])
        return
    with open(path, "rb") as f:
        for k in range(first, last):
            f.seek(plan[k])
            data = f.read(plan[k + 1] - plan[k])
            lines = data.split(b"\n")
            if data.endswith(b"\n"):
                lines.pop()
            rows: list[tuple[int, str | RecordError]] = []
            for i, raw in enumerate(lines):  # decoded one by one: a bad byte fails its own line only
                number = k * window + i + 1
                try:
                    rows.append((number, decode_line(raw, number)))
                except RecordError as exc:
                    rows.append((number, exc))
            yield Window(k, rows)


def _read_parquet_windows(path: Path, plan: list[int], first: int, last: int) -> Iterator[Window]:
    """Reads only the row groups that hold rows plan[first] .. plan[last] - 1."""
    import pyarrow.parquet as pq  # pyarrow: heavy, loaded where used

    if last <= first:
        return
    lo, hi = plan[first], plan[last]
    try:
        parquet = pq.ParquetFile(path)
        groups, start, group_starts = [], 0, []
        for g in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(g).num_rows
            if start < hi and start + rows > lo:
                groups.append(g)
                group_starts.append(start)
            start += rows
        records = parquet.read_row_groups(groups).slice(lo - group_starts[0], hi - lo).to_pylist() if groups else []
    except Exception as exc:  # noqa: BLE001 - a damaged row group
        raise _not_parquet(path, exc) from None
    for k in range(first, last):
        chunk = records[plan[k] - lo: plan[k + 1] - lo]
        yield Window(k, [(plan[k] + i + 1, json.dumps(r, ensure_ascii=False, default=str)) for i, r in
                         enumerate(chunk)])


def iter_windows(path: str | Path, window: int) -> Iterator[Window]:
    plan = plan_windows(path, window)
    yield from read_windows(path, plan, window, 0, len(plan) - 1)


# --------------------------------------------------------------------------
# scoring a window
# --------------------------------------------------------------------------
def _result_record(record: dict, line: int, step_rewards, rerank_result, aggregate: str | Callable[..., Any]) -> dict:
    out: dict[str, Any] = {"line": line}
    if "id" in record:
        out["id"] = record["id"]
    if rerank_result is None:
        out["step_rewards"] = step_rewards
        out["scores"] = [reduce_steps(r, aggregate) for r in step_rewards]
        out["aggregate"] = aggregate
    else:
        out.update(rerank_result.to_dict())
    return out


def _score(batch: list[tuple[int, dict, ScoringItem]], prm, options: ScoringOptions) -> list[dict | RecordError]:
    """Score parsed records in one engine call; if it fails, one by one so only the bad record fails."""

    aggregate = resolve_aggregate(options.aggregate, prm)

    def run(entries: list[tuple[int, dict, ScoringItem]]) -> list[dict]:
        items = [item for _, _, item in entries]
        if options.command == "rerank":
            results = rerank_batch(items, prm, aggregate, options.strategy, options.engine)
            return [_result_record(rec, ln, None, res, aggregate) for (ln, rec, _), res in zip(entries, results)]
        rewards = prm.score_batch(items, engine=options.engine)
        return [_result_record(rec, ln, r, None, aggregate) for (ln, rec, _), r in zip(entries, rewards)]

    return batch_then_each(run, batch, lambda entry, exc: RecordError(entry[0], f"{type(exc).__name__}: {exc}"))


def process_window(window: Window, prm, options: ScoringOptions, base_dir: Path) -> WindowResult:
    """One result (or RecordError) per row of the window, in row order."""
    parsed: list[tuple[int, dict, ScoringItem]] = []
    results: dict[int, Any] = {}  # line -> dict or RecordError
    limit, why = line_limit(prm, options.max_line_chars)
    for line, raw in window.rows:
        if isinstance(raw, RecordError):
            results[line] = raw
            continue
        if len(raw) > limit:  # before json.loads and the tokenizer: memory stays bounded by the limit
            results[line] = RecordError(line, f"the line is {len(raw)} characters long, more than the limit of "
                                              f"{limit} ({why}); it was not parsed: split the record, or raise "
                                              "--max-line-chars")
            continue
        if not raw.strip():  # one output record per input line, so line k of both files match
            results[line] = {"line": line, "skipped": BLANK_LINE}
            continue
        try:
            record, item = parse_record(raw, line, base_dir)
        except RecordError as exc:
            results[line] = exc
        except Exception as exc:  # noqa: BLE001 - whatever the record holds, it fails alone
            results[line] = RecordError(line, f"{type(exc).__name__}: {exc}")
        else:
            parsed.append((line, record, item))
    if parsed:
        for (line, _, _), out in zip(parsed, _score(parsed, prm, options)):
            results[line] = out
    return WindowResult([results[line] for line, _ in window.rows],
                        sum(len(item.candidates) for _, _, item in parsed))


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------
@dataclass
class ResultWriter:
    """Writes results in input order; a RecordError stops the run (on_error="fail")
    or becomes an {"line", "error"} record (on_error="skip", up to ``max_errors``)."""

    handle: IO[str]
    on_error: str = "fail"
    prog: str = "mmprm"
    errors: int = 0
    written: int = 0
    max_errors: int | None = None  # on_error="skip": more failed records than this stop the run

    def write(self, results: Iterable[dict | RecordError]) -> None:
        for out in results:
            if isinstance(out, RecordError):
                if self.on_error == "fail":
                    raise SystemExit(f"{self.prog}: {out} (nothing was written; use --on-error skip to write an "
                                     "error record and go on)")
                self.errors += 1
                if self.max_errors is not None and self.errors > self.max_errors:
                    raise SystemExit(f"{self.prog}: {out}; more than --max-errors {self.max_errors} records failed, "
                                     "stopping (nothing was written)")
                tqdm.write(f"{self.prog}: skipped {out}", file=sys.stderr)
                out = {"line": out.line, "error": str(out)}
            try:
                self.handle.write(json.dumps(out, ensure_ascii=False) + "\n")
            except UnicodeEncodeError:  # text UTF-8 cannot hold (a lone surrogate): as a JSON escape instead
                self.handle.write(json.dumps(out) + "\n")
            self.written += 1


EXIT_RECORDS_FAILED = 3  # the run finished, and some records are error records (--on-error skip)


def finished(errors: int, written: int, output, prog: str = "mmprm") -> int:
    """The exit status of a finished run: 0, or EXIT_RECORDS_FAILED when records became error records."""
    if not errors:
        return 0
    print(f"{prog}: {errors} of {written} record(s) failed; see the 'error' records in {output}", file=sys.stderr)
    return EXIT_RECORDS_FAILED
