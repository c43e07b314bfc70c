"""The types and helpers every writer module shares.

Batch, LoadPlan and LedgerState (what a load hands to a sink and what its ledger says),
the BatchWriter and Sink protocols a datastore implements, WriteSummary (what a load
did), and open_sink, redact_url and sink_error. ParallelWriter (``parallel.py``) drives
the sinks; its worker threads and in-order commits are in ``committer.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from ..errors import ConfigError, SinkError
from .schema import Record, RowError, Schema


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
