"""ParallelWriter, the Sink protocol, open_sink and the exactly-once bookkeeping.

How a batch travels::

    write()/write_many() ──> buffer ──(batch_size rows)──> Batch n ──> bounded queue
         (any thread)         (lock)   committed in ledger? skip it      │
                                                                        ▼
                      N worker threads, each with its own BatchWriter (connection / files)
                        stage(batch)   data sent inside an open transaction / temp file
                        wait for turn  batches commit strictly in order
                        commit(batch)  data + ledger row in one transaction / one rename

Committing in order keeps the committed batches a prefix of the input: after a crash
or a bad row at batch k, batches < k are committed and recorded, batches >= k are not,
and a re-run with the same load id continues at batch k.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from ..errors import ConfigError, SinkError
from ..progress import NullProgress, Progress
from .schema import Record, RowError, Schema, as_record, infer_schema, schema_from_arrow

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 2
_PUT_POLL_S = 0.1


@dataclass(slots=True)
class Batch:
    """Rows ``[first_row, first_row + size)`` of a load, numbered ``number``: Python
    records in ``rows``, or a ``pyarrow.Table`` in ``table`` (loads fed by write_arrow)."""

    number: int
    first_row: int
    rows: list[Record]
    table: Any = None

    @property
    def size(self) -> int:
        """Rows in the batch."""
        return int(self.table.num_rows) if self.table is not None else len(self.rows)

    def records(self) -> list[Record]:
        """The rows as dicts (converted from Arrow when the batch holds a table)."""
        if self.table is not None:
            rows: list[Record] = self.table.to_pylist()
            return rows
        return self.rows


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """What a sink needs to know to create the target and write batches."""

    table: str
    schema: Schema
    key: str | None
    load_id: str
    batch_size: int


@dataclass(frozen=True, slots=True)
class LedgerState:
    """What the ledger says about a load: its batch size and committed batches
    (``{batch: rows}``, rows ``None`` when the sink does not record counts)."""

    batch_size: int | None = None
    committed: Mapping[int, int | None] = field(default_factory=dict)


@runtime_checkable
class BatchWriter(Protocol):
    """One worker's handle on a sink (a connection, or a shard writer). Single-threaded."""

    def stage(self, batch: Batch) -> None:
        """Send the batch's rows without making them visible (open transaction, temp file).

        Raises :class:`SinkError` (naming batch and row when known)."""

    def commit(self, batch: Batch) -> bool:
        """Make the staged batch visible together with its ledger entry, atomically.

        Returns False when the ledger shows the batch was already committed (by a
        concurrent run): the staged rows are discarded instead."""

    def rollback(self) -> None:
        """Discard a staged batch, if any. Never raises."""

    def close(self) -> None:
        """Release the connection or files."""


@runtime_checkable
class Sink(Protocol):
    """A datastore the writer can load into. Built by :func:`open_sink`."""

    url: str
    """The sink URL with any password redacted; used in messages."""
    max_workers: int | None
    """Upper bound on writer threads (SQLite: 1), None for no bound."""
    supports_key: bool
    """True when ``key=`` upserts are supported."""
    table: str | None
    """The table named in ``open_sink(..., table=)``, if any."""

    def check(self) -> None:
        """Fail early with SinkError if the sink is unreachable or not writable."""

    def default_batch_size(self, ncols: int) -> int:
        """Rows per batch when the caller gives none (never hits parameter limits)."""

    def ledger_state(self, table: str, load_id: str) -> LedgerState:
        """What is already committed for ``load_id`` into ``table``."""

    def prepare(self, plan: LoadPlan) -> Schema:
        """Create the table (or reuse it) and the ledger; return the schema rows must fit
        (the existing table's columns, when it exists)."""

    def writer(self, plan: LoadPlan) -> BatchWriter:
        """A new BatchWriter; called in the worker thread that will use it."""

    def close(self) -> None:
        """Release anything the sink holds."""


@dataclass(frozen=True, slots=True)
class WriteSummary:
    """What a load did."""

    rows: int
    """Rows committed by this run."""
    batches: int
    """Batches committed by this run."""
    skipped_batches: int = 0
    """Batches the ledger showed as already committed (not written again)."""
    skipped_rows: int = 0
    seconds: float = 0.0
    workers: int = 0
    sink: str = ""
    table: str = ""
    load_id: str = ""

    @property
    def rows_per_s(self) -> float | None:
        """Committed rows per second of wall time."""
        return self.rows / self.seconds if self.seconds > 0 else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        rps = self.rows_per_s
        return {
            "rows": self.rows, "batches": self.batches,
            "skipped_batches": self.skipped_batches, "skipped_rows": self.skipped_rows,
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(rps, 1) if rps is not None else None,
            "workers": self.workers, "sink": self.sink, "table": self.table,
            "load_id": self.load_id,
        }


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}"
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is not None:
        netloc += f":{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def open_sink(url: str, *, table: str | None = None) -> Sink:
    """Open a sink by URL: ``sqlite:///rel.db``, ``sqlite:////abs.db``,
    ``postgresql://user@host[:port]/db`` (or ``postgres://``) and
    ``file:///abs/dir?format=jsonl|csv|parquet``.

    Nothing is written yet; unknown schemes and missing extras raise ConfigError."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"not a sink URL: {url!r} (expected sqlite:///path.db, "
                          "postgresql://user@host/db or file:///dir?format=parquet)")
    scheme = url.split("://", 1)[0].lower()
    if scheme == "sqlite":
        from .sqlite import SQLiteSink
        return SQLiteSink(url, table=table)
    if scheme in ("postgresql", "postgres"):
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:
            raise ConfigError("postgresql sinks need psycopg: pip install 'fetcher[postgres]'"
                              ) from exc
        from .postgres import PostgresSink
        return PostgresSink(url, table=table)
    if scheme == "file":
        from .files import FileSink
        return FileSink(url, table=table)
    raise ConfigError(f"unknown sink URL scheme {scheme!r} in {redact_url(url)} "
                      "(use sqlite://, postgresql:// or file://)")


def sink_error(exc: BaseException, *, sink: str, batch: Batch | None) -> SinkError:
    """Wrap any exception from a sink as SinkError naming the sink and batch."""
    if isinstance(exc, SinkError):
        return exc
    if isinstance(exc, RowError) and batch is not None:
        return SinkError(exc.message, sink=sink, batch=batch.number,
                         row=batch.first_row + exc.index)
    msg = f"{type(exc).__name__}: {exc}".strip()
    return SinkError(msg, sink=sink, batch=batch.number if batch is not None else None)


class _Abandon(Exception):
    """An earlier batch failed (or the load was cancelled): roll this one back."""


class ParallelWriter:
    """Load records into a sink with N writer threads, each batch exactly once.

    ``write(record)`` and ``write_many(records)`` may be called from any thread. Records
    are dicts (or dataclass instances); the schema is inferred from the first batch,
    with ``schema={"col": "int", ...}`` giving (some) column types explicitly. The
    queue between the callers and the workers is bounded, so a slow sink slows the
    producers instead of filling memory.

    Exactly once: batch *n* holds rows ``[n*batch_size, (n+1)*batch_size)`` in the order
    they were written; its rows and its ledger entry ``(load_id, n)`` are committed in
    one transaction (or one rename), and batches commit in order. With ``run_id`` the
    load id is stable, so re-running the same input skips committed batches. With
    ``key`` every batch is an upsert on that column, so replays change nothing even
    without a stable run id.

    Errors surface as :class:`SinkError` naming the sink, batch and row, from
    ``write``/``write_many`` as soon as a worker fails and from ``close``.
    """

    def __init__(
        self,
        sink: Sink | str,
        *,
        workers: int = DEFAULT_WORKERS,
        batch_size: int | None = None,
        key: str | None = None,
        table: str | None = None,
        progress: Progress | None = None,
        run_id: str | None = None,
        schema: Mapping[str, str] | None = None,
        flush_interval: float | None = None,
    ) -> None:
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if flush_interval is not None and flush_interval <= 0:
            raise ConfigError(f"flush_interval must be > 0, got {flush_interval}")
        if flush_interval is not None and run_id is not None:
            raise ConfigError("flush_interval makes batch boundaries depend on timing, so it "
                              "cannot be combined with run_id (replay needs fixed batches)")
        self._owns_sink = isinstance(sink, str)
        self.sink: Sink = open_sink(sink, table=table) if isinstance(sink, str) else sink
        self.table = table or self.sink.table or "data"
        if key is not None and not self.sink.supports_key:
            raise ConfigError(f"{self.sink.url}: this sink cannot upsert by key; use run_id "
                              "for replay-safe loads, or a database sink for key=")
        self.key = key
        self.load_id = run_id if run_id is not None else f"run-{uuid.uuid4().hex}"
        self._deterministic = run_id is not None
        self._hints = dict(schema) if schema else None
        if self._hints is not None:
            try:
                Schema.from_mapping(self._hints)  # validate the types now
            except ValueError as exc:
                raise ConfigError(f"schema: {exc}") from exc
        self._progress: Progress = progress if progress is not None else NullProgress()
        self._flush_interval = flush_interval
        self._nworkers = min(workers, self.sink.max_workers or workers)

        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._buf: list[Record] = []
        self._abuf: list[Any] = []  # pyarrow tables (write_arrow)
        self._abuf_rows = 0
        self._mode: str | None = None  # "rows" or "arrow", fixed by the first write
        self._buf_since = 0.0
        self._next_batch = 0
        self._next_row = 0
        self._seq = 0  # dispatched batches
        self._turn = 0  # next seq allowed to commit
        self._failed_seq: int | None = None
        self._errors: dict[int, SinkError] = {}
        self._cancel = False
        self._closed = False
        self._started = False
        self._plan: LoadPlan | None = None
        # Memory bound: workers staging + this many queued + the one being filled.
        self._queue: queue.Queue[tuple[int, Batch] | None] = queue.Queue(
            maxsize=self._nworkers + 1)
        self._threads: list[threading.Thread] = []
        self._ticker: threading.Thread | None = None
        self._stop_ticker = threading.Event()
        self._rows = 0
        self._batches = 0
        self._skipped_batches = 0
        self._skipped_rows = 0
        self._t0 = time.perf_counter()
        self._summary: WriteSummary | None = None

        try:
            self.sink.check()
            state = (self.sink.ledger_state(self.table, self.load_id)
                     if self._deterministic else LedgerState())
        except BaseException:
            if self._owns_sink:
                self.sink.close()
            raise
        self._committed = dict(state.committed)
        if batch_size is not None and state.batch_size is not None \
                and batch_size != state.batch_size and self._committed:
            raise ConfigError(f"{self.sink.url}: load {self.load_id!r} was started with "
                              f"batch_size={state.batch_size}; re-run with the same batch size")
        self._batch_size = batch_size or state.batch_size
        if flush_interval is not None:
            self._ticker = threading.Thread(target=self._tick, name="fetcher-writer-flush",
                                            daemon=True)
            self._ticker.start()

    # ------------------------------------------------------------------ producer side
    @property
    def batch_size(self) -> int | None:
        """Rows per batch (None until the first record when the sink picks it)."""
        return self._batch_size

    @property
    def workers(self) -> int:
        """Writer threads actually used (a sink may cap it: SQLite uses one)."""
        return self._nworkers

    def write(self, record: Any) -> None:
        """Add one record. Blocks while the queue is full; raises SinkError if a batch failed."""
        if self._failed_seq is not None or self._closed:
            self._raise_state()
        rec = record if type(record) is dict else as_record(record)
        with self._lock:
            if self._mode != "rows":
                self._set_mode("rows")
            if not self._buf:
                self._buf_since = time.monotonic()
            self._buf.append(rec)
            if self._batch_size is None:
                self._batch_size = self.sink.default_batch_size(
                    len(set(rec) | set(self._hints or ())))
            if len(self._buf) >= self._batch_size:
                self._cut_locked()

    def write_many(self, records: Iterable[Any]) -> int:
        """Add many records (any iterable, consumed lazily). Returns how many were added."""
        limit = min(4096, self._batch_size or 4096)
        if isinstance(records, list):  # slices, no per-record Python loop
            for i in range(0, len(records), limit):
                part = records[i:i + limit]
                if not all(type(r) is dict for r in part):
                    part = [as_record(r) for r in part]
                self._add_chunk(part)
            return len(records)
        n = 0
        chunk: list[Record] = []
        for rec in records:
            chunk.append(rec if type(rec) is dict else as_record(rec))
            if len(chunk) >= limit:
                self._add_chunk(chunk)
                n += len(chunk)
                chunk = []
        if chunk:
            self._add_chunk(chunk)
            n += len(chunk)
        return n

    def _add_chunk(self, chunk: list[Record]) -> None:
        if self._failed_seq is not None or self._closed:
            self._raise_state()
        with self._lock:
            if self._mode != "rows":
                self._set_mode("rows")
            if self._batch_size is None:
                self._batch_size = self.sink.default_batch_size(
                    len(set(chunk[0]) | set(self._hints or ())))
            bs = self._batch_size
            i = 0
            while i < len(chunk):
                if not self._buf:
                    self._buf_since = time.monotonic()
                take = min(bs - len(self._buf), len(chunk) - i)
                self._buf.extend(chunk[i:i + take])
                i += take
                if len(self._buf) >= bs:
                    self._cut_locked()

    def write_arrow(self, data: Any) -> int:
        """Add a ``pyarrow.Table`` or ``RecordBatch`` (columns as they are; not mixed with
        ``write``). Shard sinks write Arrow data as is, without a round trip through Python
        objects; database sinks convert each batch in its worker. Returns rows added."""
        if self._failed_seq is not None or self._closed:
            self._raise_state()
        import pyarrow as pa

        table = data if isinstance(data, pa.Table) else pa.Table.from_batches([data])
        if table.num_rows == 0:
            return 0
        with self._lock:
            if self._mode != "arrow":
                self._set_mode("arrow")
            if self._batch_size is None:
                self._batch_size = self.sink.default_batch_size(table.num_columns)
            if not self._abuf_rows:
                self._buf_since = time.monotonic()
            self._abuf.append(table)
            self._abuf_rows += table.num_rows
            while self._abuf_rows >= self._batch_size:
                self._cut_locked()
        return int(table.num_rows)

    def _set_mode(self, mode: str) -> None:
        if self._mode is not None:
            raise ConfigError("a ParallelWriter takes either records (write/write_many) or "
                              "Arrow data (write_arrow), not both")
        self._mode = mode

    def _pending(self) -> int:
        return len(self._buf) + self._abuf_rows

    def flush(self) -> None:
        """Send the buffered rows as a (short) batch now. Not allowed with ``run_id``
        (batch boundaries must stay deterministic), except via ``close``."""
        if self._deterministic:
            raise ConfigError("flush() would make batch boundaries non-deterministic; "
                              "it is not available with run_id")
        with self._lock:
            while self._pending() and self._failed_seq is None:
                self._cut_locked()

    def _tick(self) -> None:
        assert self._flush_interval is not None
        while not self._stop_ticker.wait(self._flush_interval / 4):
            if not self._pending() or self._failed_seq is not None:
                continue
            if time.monotonic() - self._buf_since < self._flush_interval:
                continue
            try:
                with self._lock:
                    while self._pending() and self._failed_seq is None and not self._closed:
                        self._cut_locked()
            except SinkError:
                pass  # recorded; surfaces from write()/close()
            except Exception as exc:
                self._record_error(-1, sink_error(exc, sink=self.sink.url, batch=None))

    def _cut_locked(self) -> None:
        """Turn the buffer into batch ``self._next_batch``; caller holds ``self._lock``."""
        if self._abuf:
            import pyarrow as pa

            assert self._batch_size is not None
            whole = self._abuf[0] if len(self._abuf) == 1 else pa.concat_tables(self._abuf)
            take = min(self._batch_size, whole.num_rows)
            rest = whole.slice(take)
            self._abuf = [rest] if rest.num_rows else []
            self._abuf_rows = int(rest.num_rows)
            batch = Batch(self._next_batch, self._next_row, [], whole.slice(0, take))
        else:
            rows, self._buf = self._buf, []
            batch = Batch(self._next_batch, self._next_row, rows)
        size = batch.size
        self._next_batch += 1
        self._next_row += size
        if not self._started:
            self._start(batch)
        done = self._committed.get(batch.number, -1)
        if done != -1:
            if done is not None and done != size:
                err = SinkError(
                    f"the ledger of load {self.load_id!r} records {done} rows for this batch "
                    f"but the input now has {size}: the input changed since the earlier "
                    "load; use a new run id (or drop the table) to load it afresh",
                    sink=self.sink.url, batch=batch.number)
                self._record_error(-1, err)
                raise err
            self._skipped_batches += 1
            self._skipped_rows += size
            self._progress.update(size)
            return
        item = (self._seq, batch)
        self._seq += 1
        while True:
            if self._failed_seq is not None:
                self._raise_state()
            try:
                self._queue.put(item, timeout=_PUT_POLL_S)
                return
            except queue.Full:
                if not any(t.is_alive() for t in self._threads):
                    self._record_error(-1, SinkError("all writer threads have stopped",
                                                     sink=self.sink.url, batch=batch.number))
                    self._raise_state()

    def _start(self, first: Batch) -> None:
        try:
            if first.table is not None:
                inferred = schema_from_arrow(first.table.schema, self._hints)
            else:
                inferred = infer_schema(first.rows, self._hints)
        except (TypeError, ValueError) as exc:
            err = SinkError(f"cannot infer a schema from the first batch: {exc}",
                            sink=self.sink.url, batch=0)
            self._record_error(-1, err)
            raise err from exc
        if self.key is not None and self.key not in inferred.names:
            err = SinkError(f"key column {self.key!r} is not among the columns "
                            f"({', '.join(inferred.names)})", sink=self.sink.url, batch=0)
            self._record_error(-1, err)
            raise err
        assert self._batch_size is not None
        plan = LoadPlan(self.table, inferred, self.key, self.load_id, self._batch_size)
        try:
            actual = self.sink.prepare(plan)
        except BaseException as exc:
            err = sink_error(exc, sink=self.sink.url, batch=None)
            self._record_error(-1, err)
            raise err from (exc if err is not exc else None)
        self._plan = LoadPlan(self.table, actual, self.key, self.load_id, self._batch_size)
        self._started = True
        for i in range(self._nworkers):
            t = threading.Thread(target=self._work, name=f"fetcher-writer-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    # ------------------------------------------------------------------ worker side
    def _work(self) -> None:
        assert self._plan is not None
        bw: BatchWriter | None = None
        try:
            bw = self.sink.writer(self._plan)
        except BaseException as exc:
            self._record_error(-1, sink_error(exc, sink=self.sink.url, batch=None))
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                seq, batch = item
                if bw is None or self._cancel or (
                        self._failed_seq is not None and seq > self._failed_seq):
                    continue
                try:
                    bw.stage(batch)
                    self._await_turn(seq)
                    fresh = bw.commit(batch)
                except _Abandon:
                    bw.rollback()
                    continue
                except BaseException as exc:
                    bw.rollback()
                    self._record_error(seq, sink_error(exc, sink=self.sink.url, batch=batch))
                    continue
                self._advance(batch, fresh)
        finally:
            if bw is not None:
                try:
                    bw.close()
                except Exception:
                    log.debug("closing a batch writer failed", exc_info=True)

    def _await_turn(self, seq: int) -> None:
        with self._cond:
            while self._turn != seq:
                if self._cancel or (self._failed_seq is not None and self._failed_seq < seq):
                    raise _Abandon
                self._cond.wait()
            if self._cancel:
                raise _Abandon

    def _advance(self, batch: Batch, fresh: bool) -> None:
        with self._cond:
            self._turn += 1
            if fresh:
                self._rows += batch.size
                self._batches += 1
            else:
                self._skipped_batches += 1
                self._skipped_rows += batch.size
            self._cond.notify_all()
        self._progress.update(batch.size)

    def _record_error(self, seq: int, err: SinkError) -> None:
        with self._cond:
            # seq -1: a failure outside any dispatched batch (stops everything after now).
            key = seq if seq >= 0 else self._seq
            self._errors.setdefault(key, err)
            if self._failed_seq is None or key < self._failed_seq:
                self._failed_seq = key
            self._cond.notify_all()

    def _raise_state(self) -> None:
        if self._errors:
            raise self._errors[min(self._errors)]
        raise SinkError("the writer is closed", sink=self.sink.url)

    # ------------------------------------------------------------------ closing
    def close(self) -> WriteSummary:
        """Flush the last (short) batch, wait for every batch to commit and return the
        summary. Raises SinkError if any batch failed (earlier batches stay committed)."""
        if self._summary is not None:
            return self._summary
        flush_error: SinkError | None = None
        if not self._closed:
            try:
                with self._lock:
                    while self._pending() and self._failed_seq is None:
                        self._cut_locked()
            except SinkError as exc:
                flush_error = exc
        self._shutdown()
        if self._errors:
            raise self._errors[min(self._errors)]
        if flush_error is not None:
            raise flush_error
        self._summary = WriteSummary(
            rows=self._rows, batches=self._batches, skipped_batches=self._skipped_batches,
            skipped_rows=self._skipped_rows, seconds=time.perf_counter() - self._t0,
            workers=self._nworkers, sink=self.sink.url, table=self.table,
            load_id=self.load_id)
        return self._summary

    def abort(self, *, cancel: bool = False) -> None:
        """Stop without flushing the partial batch. Batches already queued still commit
        unless ``cancel``; either way every batch is committed whole or not at all."""
        if cancel:
            with self._cond:
                self._cancel = True
                self._cond.notify_all()
        self._shutdown()

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_ticker.set()
        with self._lock:
            self._buf = []
            self._abuf = []
            self._abuf_rows = 0
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        if self._ticker is not None:
            self._ticker.join()
        if self._owns_sink:
            try:
                self.sink.close()
            except Exception:
                log.debug("closing the sink failed", exc_info=True)

    def __enter__(self) -> ParallelWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort(cancel=not issubclass(exc_type, Exception))
