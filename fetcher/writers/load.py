"""``load_file``: stream a CSV, TSV, JSONL or Parquet file into a sink (``fetcher write``).

The input is read in chunks, never whole. Column types come from the file: Parquet's own
schema; JSONL's JSON types; for CSV, the first rows decide per column (int, float,
true/false, ISO date, ISO timestamp, else text; empty fields are NULL), and a later value
that does not parse is an error naming the file, line and column.

The load id is ``file:<table>:<absolute input path>``: re-running the same command on the
same file (also after fixing a bad row in place, or after a crash) skips the batches the
ledger shows as committed and continues after them.
"""

from __future__ import annotations

import bisect
import csv
import datetime as dt
import gzip
import io
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import ConfigError, SinkError
from ..progress import NullProgress, Progress
from .base import WriteSummary, redact_url
from .parallel import ParallelWriter
from .schema import Record, sanitize_name

CHUNK = 4096
INFER_ROWS = 10_000
_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
            ".parquet": "parquet", ".pq": "parquet"}


class InputRowError(SinkError):
    """A row of the input file cannot be read or does not fit (names file, line, column).

    A :class:`~fetcher.errors.SinkError` because batches before it may already be
    committed: a re-run continues after them."""


def detect_format(path: Path) -> tuple[str, bool]:
    """``(format, gzipped)`` from the file name: .csv .tsv .jsonl .ndjson .parquet .pq,
    optionally + .gz (not for parquet)."""
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    if gz:
        suffixes = suffixes[:-1]
    fmt = _FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None or (gz and fmt == "parquet"):
        raise ConfigError(f"{path}: unknown input format (expected .csv, .tsv, .jsonl, "
                          ".ndjson or .parquet; .gz for the text formats)")
    return fmt, gz


def default_table(path: Path) -> str:
    """The table name for an input file: its stem without format suffixes, sanitised."""
    name = path.name
    for _ in range(2):
        stem, dot, ext = name.rpartition(".")
        if dot and ("." + ext.lower() in _FORMATS or ext.lower() == "gz"):
            name = stem
    return sanitize_name(name)


def load_id_for(path: Path, table: str) -> str:
    """The load id ``fetcher write`` uses: stable per (table, absolute input path)."""
    return f"file:{table}:{path.resolve()}"


class _BadInput(Exception):
    """Raised by the readers; load_file turns it into InputRowError."""

    def __init__(self, row: int | None, message: str) -> None:
        super().__init__(message)
        self.row = row
        self.message = message


class _LineMap:
    """Row index -> input line, storing only the places where the offset changes."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._offsets: list[int] = []

    def note(self, row: int, line: int) -> None:
        offset = line - row
        if not self._offsets or self._offsets[-1] != offset:
            self._starts.append(row)
            self._offsets.append(offset)

    def line(self, row: int) -> int | None:
        i = bisect.bisect_right(self._starts, row) - 1
        return row + self._offsets[i] if i >= 0 else None


class _Reader:
    """Yields lists of records; knows where each row came from."""

    def __init__(self, path: Path, fmt: str, gz: bool) -> None:
        self.path = path
        self.fmt = fmt
        self.gz = gz
        self.lines = _LineMap()
        self.hints: dict[str, str] | None = None
        self.total: int | None = None

    def where(self, row: int) -> str:
        line = self.lines.line(row) if self.fmt != "parquet" else None
        return f"{self.path} line {line}" if line is not None else f"{self.path} row {row}"

    def _open_text(self) -> IO[str]:
        if self.gz:
            return io.TextIOWrapper(gzip.open(self.path, "rb"), encoding="utf-8-sig",
                                    newline="")
        return open(self.path, encoding="utf-8-sig", newline="")

    def count_rows(self) -> int | None:
        """A quick estimate of the row count for the progress bar (None if costly)."""
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(self.path).metadata.num_rows)
        if self.gz:
            return None
        n = 0
        last = b"\n"
        with open(self.path, "rb") as f:
            while chunk := f.read(1 << 20):
                n += chunk.count(b"\n")
                last = chunk[-1:]
        if last != b"\n":
            n += 1
        return max(0, n - 1) if self.fmt in ("csv", "tsv") else n

    def chunks(self) -> Iterator[Any]:
        """Lists of records (CSV, JSONL) or Arrow tables (Parquet)."""
        if self.fmt in ("csv", "tsv"):
            return self._csv()
        if self.fmt == "jsonl":
            return self._jsonl()
        return self.arrow_chunks()

    def _bad(self, row: int, message: str) -> _BadInput:
        return _BadInput(row, f"{self.where(row)}: {message}")

    # -- CSV -------------------------------------------------------------------------
    def _csv(self) -> Iterator[list[Record]]:
        with self._open_text() as f:
            reader = csv.reader(f, delimiter="\t" if self.fmt == "tsv" else ",")
            try:
                header = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise self._bad(0, f"cannot read the header: {exc}") from exc
            header = [h.strip() for h in header]
            if not header or any(not h for h in header):
                raise _BadInput(None, f"{self.path} line 1: empty column name in the header")
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes:
                raise _BadInput(None, f"{self.path} line 1: duplicate column(s) "
                                      f"{', '.join(dupes)} in the header")
            width = len(header)
            raw: list[list[str]] = []
            row = 0
            end = reader.line_num
            rows_iter = iter(reader)
            convert: Callable[[int, list[str]], Record] | None = None
            failure: _BadInput | None = None
            while True:
                start = end + 1
                try:
                    fields = next(rows_iter)
                except StopIteration:
                    break
                except csv.Error as exc:
                    self.lines.note(row, start)
                    failure = self._bad(row, f"malformed CSV: {exc}")
                    break
                end = reader.line_num
                if not fields:  # blank line
                    continue
                self.lines.note(row, start)
                if len(fields) != width:
                    failure = self._bad(row, f"expected {width} fields, found {len(fields)}")
                    break
                raw.append(fields)
                row += 1
                if convert is None and len(raw) >= INFER_ROWS:
                    convert = self._csv_converter(header, raw)
                if convert is not None and len(raw) >= CHUNK:
                    yield from self._converted(convert, raw, row - len(raw))
                    raw = []
            if raw:
                if convert is None:
                    convert = self._csv_converter(header, raw)
                yield from self._converted(convert, raw, row - len(raw))
            if failure is not None:
                raise failure

    @staticmethod
    def _converted(convert: Callable[[int, list[str]], Record], raw: list[list[str]],
                   first: int) -> Iterator[list[Record]]:
        """Convert a chunk; on a bad value, yield the good rows before it, then raise."""
        out: list[Record] = []
        for i, fields in enumerate(raw):
            try:
                out.append(convert(first + i, fields))
            except _BadInput:
                if out:
                    yield out
                raise
        yield out

    def _csv_converter(self, header: list[str],
                       sample: list[list[str]]) -> Callable[[int, list[str]], Record]:
        types = [_infer_text_column([r[i] for r in sample]) for i in range(len(header))]
        self.hints = dict(zip(header, types, strict=True))
        parsers = [(i, name, _PARSERS[t], t) for i, (name, t)
                   in enumerate(zip(header, types, strict=True)) if t != "text"]

        def convert(row: int, fields: list[str]) -> Record:
            values: list[Any] = [v if v != "" else None for v in fields]
            for i, name, parse, typ in parsers:
                v = values[i]
                if v is not None:
                    try:
                        values[i] = parse(v)
                    except ValueError:
                        raise self._bad(row, f"column {name!r}: {v!r} is not a valid {typ} "
                                             "(the type the first rows set)") from None
            return dict(zip(header, values, strict=True))

        return convert

    # -- JSONL -------------------------------------------------------------------------
    def _jsonl(self) -> Iterator[list[Record]]:
        chunk: list[Record] = []
        row = 0
        failure: _BadInput | None = None
        with self._open_text() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                self.lines.note(row, lineno)
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    failure = self._bad(row, f"invalid JSON: {exc}")
                    break
                if not isinstance(obj, dict):
                    failure = self._bad(row, f"expected a JSON object, got {type(obj).__name__}")
                    break
                chunk.append(obj)
                row += 1
                if len(chunk) >= CHUNK:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk  # the rows before a bad line still load
        if failure is not None:
            raise failure

    # -- Parquet -----------------------------------------------------------------------
    def arrow_chunks(self) -> Iterator[Any]:
        """Parquet input as Arrow tables, one per record batch (decimals as float64)."""
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigError("reading Parquet needs pyarrow: pip install 'fetcher[parquet]'"
                              ) from exc
        pf = pq.ParquetFile(self.path)
        fields = list(pf.schema_arrow)
        target = pa.schema([pa.field(f.name, pa.float64()) if pa.types.is_decimal(f.type)
                            else f for f in fields])
        for batch in pf.iter_batches(batch_size=65_536):
            table = pa.Table.from_batches([batch])
            yield table.cast(target) if target != batch.schema else table


_INT = re.compile(r"^[+-]?(0|[1-9]\d{0,17})$")
_FLOAT = re.compile(r"^[+-]?((0|[1-9]\d*)(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TS = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:?\d{2})?$")
_BOOLS = {"true": True, "false": False}


def _parse_bool(s: str) -> bool:
    try:
        return _BOOLS[s.lower()]
    except KeyError:
        raise ValueError(s) from None


def _parse_int(s: str) -> int:
    if not _INT.match(s.strip()):
        raise ValueError(s)
    return int(s)


def _parse_ts(s: str) -> dt.datetime:
    if not _TS.match(s):
        raise ValueError(s)
    return dt.datetime.fromisoformat(s)


def _parse_date(s: str) -> dt.date:
    if not _DATE.match(s):
        raise ValueError(s)
    return dt.date.fromisoformat(s)


_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": _parse_int, "float": float, "bool": _parse_bool, "date": _parse_date,
    "timestamp": _parse_ts, "timestamptz": _parse_ts,
}


def _infer_text_column(values: list[str]) -> str:
    """The narrowest type every non-empty value parses as (leading zeros stay text)."""
    vals = [v for v in values if v != ""]
    if not vals:
        return "text"
    if all(_INT.match(v) for v in vals):
        return "int"
    if all(_FLOAT.match(v) for v in vals):
        return "float"
    if all(v.lower() in _BOOLS for v in vals):
        return "bool"
    if all(_DATE.match(v) for v in vals):
        try:
            for v in vals:
                dt.date.fromisoformat(v)
            return "date"
        except ValueError:
            return "text"
    if all(_TS.match(v) for v in vals):
        try:
            parsed = [dt.datetime.fromisoformat(v) for v in vals]
        except ValueError:
            return "text"
        aware = {p.tzinfo is not None for p in parsed}
        if aware == {True}:
            return "timestamptz"
        if aware == {False}:
            return "timestamp"
    return "text"


def load_file(
    input_path: Path,
    sink_url: str,
    *,
    table: str | None,
    workers: int,
    key: str | None,
    progress: Progress | None,
    batch_size: int | None = None,
    run_id: str | None = None,
) -> WriteSummary:
    """Load a CSV/TSV/JSONL/Parquet file into ``sink_url``, exactly once per batch.

    ``table`` defaults to the file's stem (sanitised); the load id defaults to
    :func:`load_id_for` so a re-run continues where a crashed or failed run stopped.
    Raises ConfigError before any work for a missing file or unknown format, and
    SinkError (naming the file and line or row, the sink and the batch) for bad rows and
    sink failures; batches before the failing one stay committed."""
    path = Path(input_path)
    fmt, gz = detect_format(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    table = table or default_table(path)
    reader = _Reader(path, fmt, gz)
    prog: Progress = progress if progress is not None else NullProgress()
    try:
        total = reader.count_rows()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    except Exception as exc:  # pyarrow: not a parquet file
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    chunks = reader.chunks()
    try:
        first = next(chunks, None)
    except _BadInput as exc:  # the very first row is bad: nothing to load before it
        raise InputRowError(exc.message, sink=redact_url(sink_url),
                            batch=0 if exc.row is not None else None, row=exc.row) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    writer = ParallelWriter(sink_url, workers=workers, batch_size=batch_size, key=key,
                            table=table, progress=prog, run_id=run_id or load_id_for(path, table),
                            schema=reader.hints)
    prog.start(total, unit="row", desc=table)
    add = writer.write_arrow if fmt == "parquet" else writer.write_many
    try:
        with writer:
            if first is not None:
                add(first)
            for chunk in chunks:
                add(chunk)
        summary = writer.close()
    except _BadInput as exc:
        bs = writer.batch_size
        batch = exc.row // bs if bs and exc.row is not None else None
        raise InputRowError(exc.message, sink=redact_url(sink_url), batch=batch,
                            row=exc.row) from None
    except SinkError as exc:
        if exc.row is not None and exc.sink and "line" not in str(exc):
            raise SinkError(f"{reader.where(exc.row)}: {_reason(exc)}", sink=exc.sink,
                            batch=exc.batch, row=exc.row) from exc
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise SinkError(f"{path}: cannot read: {exc}", sink=redact_url(sink_url)) from exc
    finally:
        prog.close()
    return summary


def _reason(exc: SinkError) -> str:
    text = str(exc)
    prefix = exc.sink if exc.batch is None else f"{exc.sink} batch {exc.batch}"
    if exc.row is not None:
        prefix += f" row {exc.row}"
    return text[len(prefix) + 2:] if text.startswith(prefix + ": ") else text
