"""Directory-of-shards sink: ``file:///abs/dir?format=jsonl|csv|parquet``.

Each batch becomes one shard, ``<table>-<load token>-<batch:06d>.<ext>``: written under a
temporary dot-name in the same directory, fsynced, then renamed to its final name (and the
directory fsynced). The rename is the commit, and the set of final shard names is the
ledger: a crash leaves at most a dot-prefixed temporary file (removed by the next run), a
re-run skips batches whose shard exists, and a replayed batch replaces its shard rather
than adding a second one. Load metadata (batch size, schema) lives in ``_fetcher/``; names
starting with ``.`` or ``_`` are ignored by pyarrow and pandas dataset readers.

Value encoding: parquet uses Arrow types (json columns as JSON text); CSV writes a header,
empty fields for nulls, ISO dates, JSON text for lists/dicts; JSONL writes one object per
row with ISO dates and base64 bytes.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import datetime as dt
import hashlib
import io
import json
import os
import re
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import ConfigError, SinkError
from .base import Batch, LedgerState, LoadPlan
from .schema import (
    Column,
    RowError,
    Schema,
    apply_converters,
    column_converters,
    extract,
    iso,
    json_text,
)

FORMATS = {"jsonl": "jsonl", "csv": "csv", "parquet": "parquet"}
META_DIR = "_fetcher"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _json_default(v: Any) -> Any:
    if isinstance(v, (dt.date, dt.datetime)):
        return v.isoformat()
    if isinstance(v, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(v)).decode("ascii")
    return str(v)


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if v is True or v is False:
        return "true" if v else "false"
    if isinstance(v, (list, dict, tuple)):
        return json_text(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    return iso(v)


class FileSink:
    """Writes each batch as one shard file in a directory."""

    max_workers: int | None = None
    supports_key = False

    def __init__(self, url: str, *, table: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"{url}: file URLs need an absolute path: file:///abs/dir")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ConfigError(f"{url}: file URLs need an absolute path: file:///abs/dir")
        query = parse_qs(parts.query)
        fmt = query.get("format", ["jsonl"])[0].lower()
        if fmt not in FORMATS:
            raise ConfigError(f"{url}: format must be one of jsonl, csv, parquet (got {fmt!r})")
        if fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError as exc:
                raise ConfigError("parquet shards need pyarrow: pip install 'fetcher[parquet]'"
                                  ) from exc
        self.format = fmt
        self.dir = Path(path)
        self.url = url
        self.table = table

    def check(self) -> None:
        """Create the directory if needed and prove it is writable."""
        probe = self.dir / f".fetcher-probe-{os.getpid()}-{threading.get_ident()}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise SinkError(f"directory {self.dir} is not writable: {exc.strerror or exc}",
                            sink=self.url) from exc

    def default_batch_size(self, ncols: int) -> int:
        """~800k values per shard (shards of a few MB; fewer, larger files for parquet)."""
        return max(1_000, min(250_000, 800_000 // max(1, ncols)))

    @staticmethod
    def token(load_id: str) -> str:
        """A short, filename-safe token for a load id."""
        return hashlib.sha256(load_id.encode()).hexdigest()[:10]

    def _prefix(self, table: str, load_id: str) -> str:
        safe = re.sub(r"[^0-9A-Za-z_.-]+", "_", table).lstrip("._") or "part"
        return f"{safe}-{self.token(load_id)}"

    def shard_name(self, table: str, load_id: str, batch: int) -> str:
        """The final name of batch ``batch``'s shard."""
        return f"{self._prefix(table, load_id)}-{batch:06d}.{FORMATS[self.format]}"

    def _meta_path(self, table: str, load_id: str) -> Path:
        return self.dir / META_DIR / f"{self._prefix(table, load_id)}.json"

    def ledger_state(self, table: str, load_id: str) -> LedgerState:
        """Committed batches: the shards present under their final names."""
        meta = self._read_meta(table, load_id)
        pattern = re.compile(re.escape(self._prefix(table, load_id)) + r"-(\d{6,})\."
                             + re.escape(FORMATS[self.format]) + "$")
        committed: dict[int, int | None] = {}
        try:
            for entry in os.scandir(self.dir):
                m = pattern.match(entry.name)
                if m:
                    committed[int(m.group(1))] = None
        except OSError as exc:
            raise SinkError(f"cannot list {self.dir}: {exc}", sink=self.url) from exc
        return LedgerState(batch_size=meta.get("batch_size") if meta else None,
                           committed=committed)

    def _read_meta(self, table: str, load_id: str) -> dict[str, Any] | None:
        path = self._meta_path(table, load_id)
        try:
            data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise SinkError(f"cannot read {path}: {exc}", sink=self.url) from exc
        return data

    def prepare(self, plan: LoadPlan) -> Schema:
        """Record the load's batch size and schema (first run) and clear stale temp files."""
        meta = self._read_meta(plan.table, plan.load_id)
        if meta is not None and isinstance(meta.get("schema"), dict):
            schema = Schema.from_mapping(meta["schema"])
        else:
            schema = plan.schema
            path = self._meta_path(plan.table, plan.load_id)
            doc = {"load_id": plan.load_id, "table": plan.table, "format": self.format,
                   "batch_size": plan.batch_size, "schema": schema.as_dict()}
            try:
                path.parent.mkdir(exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
                _fsync_file(tmp)
                os.replace(tmp, path)
                _fsync_dir(path.parent)
            except OSError as exc:
                raise SinkError(f"cannot write {path}: {exc.strerror or exc}",
                                sink=self.url) from exc
        self._clean_stale(plan)
        return schema

    def _clean_stale(self, plan: LoadPlan) -> None:
        """Remove temporary shards of this load left by processes that died."""
        stale = re.compile(r"^\." + re.escape(self._prefix(plan.table, plan.load_id))
                           + r"-\d+\.\w+\.(\d+)\.\d+\.tmp$")
        try:
            for entry in os.scandir(self.dir):
                m = stale.match(entry.name)
                if m and not _pid_alive(int(m.group(1))):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
        except OSError:
            pass

    def writer(self, plan: LoadPlan) -> _ShardWriter:
        """A BatchWriter that writes shards."""
        return _ShardWriter(self, plan)

    def close(self) -> None:
        """Nothing held."""


class _ShardWriter:
    def __init__(self, sink: FileSink, plan: LoadPlan) -> None:
        self.sink = sink
        self.plan = plan
        self.tmp: Path | None = None
        self.final: Path | None = None
        self.arrow_schema: Any = None
        self.arrow_struct: Any = None
        self.json_convs = column_converters(plan.schema.types, {"json": json_text})
        if sink.format == "parquet":
            import pyarrow as pa

            self.arrow_schema = _arrow_schema(plan.schema)
            self.arrow_struct = pa.struct(list(self.arrow_schema))

    def stage(self, batch: Batch) -> None:
        name = self.sink.shard_name(self.plan.table, self.plan.load_id, batch.number)
        self.final = self.sink.dir / name
        self.tmp = self.sink.dir / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        names = self.plan.schema.names
        try:
            if batch.table is not None and self.sink.format == "parquet":
                self._parquet_arrow(batch.table)
                _fsync_file(self.tmp)
                return
            tuples = extract(batch.records(), names, target=self.plan.table)
            if self.sink.format == "parquet":
                self._parquet(tuples)
            elif self.sink.format == "csv":
                self._csv(tuples)
            else:
                self._jsonl(tuples)
            _fsync_file(self.tmp)
        except OSError as exc:
            self.rollback()
            raise SinkError(f"cannot write shard {name}: {exc.strerror or exc}",
                            sink=self.sink.url, batch=batch.number) from exc
        except BaseException:
            self.rollback()
            raise

    def _parquet(self, tuples: list[tuple[Any, ...]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = apply_converters(tuples, self.json_convs)
        try:
            # Tuples -> one struct array: the cheapest conversion from Python objects.
            struct = pa.array(rows, type=self.arrow_struct)
            table = pa.Table.from_batches([pa.RecordBatch.from_struct_array(struct)])
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
            # Column by column: coerces text columns, or names the row that does not fit.
            columns = [list(c) for c in zip(*rows, strict=True)] if rows else \
                [[] for _ in self.plan.schema.columns]
            arrays = [_to_arrow(col, values, field.type) for col, values, field
                      in zip(self.plan.schema.columns, columns, self.arrow_schema, strict=True)]
            table = pa.Table.from_arrays(arrays, schema=self.arrow_schema)
        assert self.tmp is not None
        pq.write_table(table, self.tmp)

    def _parquet_arrow(self, table: Any) -> None:
        """Arrow input goes out with its own column types (nested types stay nested)."""
        import pyarrow.parquet as pq

        names = list(self.plan.schema.names)
        if table.column_names != names:
            extra = [c for c in table.column_names if c not in names]
            if extra:
                raise RowError(0, f"column(s) {', '.join(map(repr, extra))} not in the schema "
                                  f"of {self.plan.table} (columns: {', '.join(names)})")
            table = table.select([c for c in names if c in table.column_names])
        assert self.tmp is not None
        pq.write_table(table, self.tmp)

    def _csv(self, tuples: list[tuple[Any, ...]]) -> None:
        assert self.tmp is not None
        with open(self.tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(self.plan.schema.names)
            w.writerows([tuple(map(_csv_value, t)) for t in tuples])

    def _jsonl(self, tuples: list[tuple[Any, ...]]) -> None:
        assert self.tmp is not None
        names = self.plan.schema.names
        buf = io.StringIO()
        dumps = json.JSONEncoder(default=_json_default, ensure_ascii=False,
                                 separators=(",", ":")).encode
        for t in tuples:
            buf.write(dumps(dict(zip(names, t, strict=True))))
            buf.write("\n")
        with open(self.tmp, "w", encoding="utf-8", newline="") as f:
            f.write(buf.getvalue())

    def commit(self, batch: Batch) -> bool:
        assert self.tmp is not None and self.final is not None
        existed = self.final.exists()
        try:
            os.replace(self.tmp, self.final)
        except OSError as exc:
            self.rollback()
            raise SinkError(f"cannot rename shard into place: {exc.strerror or exc}",
                            sink=self.sink.url, batch=batch.number) from exc
        _fsync_dir(self.sink.dir)
        self.tmp = None
        return not existed

    def rollback(self) -> None:
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                self.tmp.unlink()
            self.tmp = None

    def close(self) -> None:
        self.rollback()


def _arrow_schema(schema: Schema) -> Any:
    import pyarrow as pa

    types = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(),
             "text": pa.string(), "timestamp": pa.timestamp("us"),
             "timestamptz": pa.timestamp("us", tz="UTC"), "date": pa.date32(),
             "json": pa.string(), "bytes": pa.binary()}
    return pa.schema([pa.field(c.name, types[c.type]) for c in schema.columns])


def _to_arrow(col: Column, values: list[Any], typ: Any) -> Any:
    """One column as an Arrow array; json columns as JSON text, other values coerced to
    text for text columns; anything else that does not fit raises RowError."""
    import pyarrow as pa

    try:
        return pa.array(values, type=typ)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
        pass
    if col.type == "text":
        values = [v if v is None or isinstance(v, str) else str(_csv_value(v)) for v in values]
        return pa.array(values, type=typ)
    for i, v in enumerate(values):
        try:
            pa.array([v], type=typ)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError) as exc:
            raise RowError(i, f"column {col.name!r}: {v!r} is not a valid {col.type} "
                              f"({exc})") from exc
    return pa.array(values, type=typ)  # pragma: no cover - per-value conversion succeeded
