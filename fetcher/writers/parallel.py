"""ParallelWriter: records in, numbered batches out, each committed exactly once.

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

This module is the producer side (buffering, batch numbering, the ledger check, schema,
summary); the worker threads and the commit order are :class:`~.committer.Committer`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ConfigError, SinkError
from ..progress import NullProgress, Progress
from .base import Batch, LedgerState, LoadPlan, Sink, WriteSummary, open_sink, sink_error
from .committer import Committer
from .schema import Record, Schema, as_record, infer_schema, schema_from_arrow

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 2


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
        self._buf: list[Record] = []
        self._abuf: list[Any] = []  # pyarrow tables (write_arrow)
        self._abuf_rows = 0
        self._mode: str | None = None  # "rows" or "arrow", fixed by the first write
        self._buf_since = 0.0
        self._next_batch = 0
        self._next_row = 0
        self._closed = False
        self._started = False
        self._commits = Committer(self.sink, self._nworkers, self._progress)
        self._ticker: threading.Thread | None = None
        self._stop_ticker = threading.Event()
        self._skipped_batches = 0  # found committed in the ledger before dispatch
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
        if self._commits.failed_seq is not None or self._closed:
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
        if self._commits.failed_seq is not None or self._closed:
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
        if self._commits.failed_seq is not None or self._closed:
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
            while self._pending() and self._commits.failed_seq is None:
                self._cut_locked()

    def _tick(self) -> None:
        assert self._flush_interval is not None
        while not self._stop_ticker.wait(self._flush_interval / 4):
            if not self._pending() or self._commits.failed_seq is not None:
                continue
            if time.monotonic() - self._buf_since < self._flush_interval:
                continue
            try:
                with self._lock:
                    while self._pending() and self._commits.failed_seq is None and not self._closed:
                        self._cut_locked()
            except SinkError:
                pass  # recorded; surfaces from write()/close()
            except Exception as exc:
                self._commits.record_error(-1, sink_error(exc, sink=self.sink.url, batch=None))

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
                self._commits.record_error(-1, err)
                raise err
            self._skipped_batches += 1
            self._skipped_rows += size
            self._progress.update(size)
            return
        self._commits.submit(batch)

    def _start(self, first: Batch) -> None:
        try:
            if first.table is not None:
                inferred = schema_from_arrow(first.table.schema, self._hints)
            else:
                inferred = infer_schema(first.rows, self._hints)
        except (TypeError, ValueError) as exc:
            err = SinkError(f"cannot infer a schema from the first batch: {exc}",
                            sink=self.sink.url, batch=0)
            self._commits.record_error(-1, err)
            raise err from exc
        if self.key is not None and self.key not in inferred.names:
            err = SinkError(f"key column {self.key!r} is not among the columns "
                            f"({', '.join(inferred.names)})", sink=self.sink.url, batch=0)
            self._commits.record_error(-1, err)
            raise err
        assert self._batch_size is not None
        plan = LoadPlan(self.table, inferred, self.key, self.load_id, self._batch_size)
        try:
            actual = self.sink.prepare(plan)
        except BaseException as exc:
            err = sink_error(exc, sink=self.sink.url, batch=None)
            self._commits.record_error(-1, err)
            raise err from (exc if err is not exc else None)
        self._started = True
        self._commits.start(
            LoadPlan(self.table, actual, self.key, self.load_id, self._batch_size))

    def _raise_state(self) -> None:
        err = self._commits.first_error()
        if err is not None:
            raise err
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
                    while self._pending() and self._commits.failed_seq is None:
                        self._cut_locked()
            except SinkError as exc:
                flush_error = exc
        self._shutdown()
        err = self._commits.first_error()
        if err is not None:
            raise err
        if flush_error is not None:
            raise flush_error
        self._summary = WriteSummary(
            rows=self._commits.rows, batches=self._commits.batches,
            skipped_batches=self._skipped_batches + self._commits.skipped_batches,
            skipped_rows=self._skipped_rows + self._commits.skipped_rows,
            seconds=time.perf_counter() - self._t0,
            workers=self._nworkers, sink=self.sink.url, table=self.table,
            load_id=self.load_id)
        return self._summary

    def abort(self, *, cancel: bool = False) -> None:
        """Stop without flushing the partial batch. Batches already queued still commit
        unless ``cancel``; either way every batch is committed whole or not at all."""
        if cancel:
            self._commits.cancel()
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
        self._commits.stop()
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
