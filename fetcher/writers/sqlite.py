"""SQLite sink: one writer connection, WAL, one transaction per batch, long busy timeout.

``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``; ``?timeout=SECONDS``
sets the busy timeout (default 300 s), so another process holding the write lock makes
the load wait instead of failing with "database is locked". New tables are STRICT
(SQLite >= 3.37), so a value of the wrong type is rejected rather than stored.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

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

LEDGER = "_fetcher_ledger"
_STRICT = sqlite3.sqlite_version_info >= (3, 37, 0)
_DECL = {"int": "INTEGER", "float": "REAL", "bool": "INTEGER", "text": "TEXT",
         "timestamp": "TEXT", "timestamptz": "TEXT", "date": "TEXT", "json": "TEXT",
         "bytes": "BLOB"}
_CONVERT = {"timestamp": iso, "timestamptz": iso, "date": iso, "json": json_text}


def quote_ident(name: str) -> str:
    """A safely quoted SQLite identifier."""
    if "\x00" in name:
        raise ConfigError(f"identifier contains a NUL byte: {name!r}")
    return '"' + name.replace('"', '""') + '"'


def _generic(v: Any) -> Any:
    """Any value as something sqlite3 binds: JSON for containers, ISO for dates, str for
    types sqlite3 does not know (Decimal, time, UUID...)."""
    if v is None or isinstance(v, (int, float, str, bytes)):
        return v
    if isinstance(v, (list, dict, tuple)):
        return json_text(v)
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    return iso(v) if isinstance(v, (dt.date, dt.datetime)) else str(v)


class SQLiteSink:
    """Loads into one SQLite database file through a single writer connection."""

    max_workers: int | None = 1
    supports_key = True

    def __init__(self, url: str, *, table: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"{url}: sqlite URLs have no host; use sqlite:///relative.db "
                              "or sqlite:////absolute.db")
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path or path == ":memory:":
            raise ConfigError(f"{url}: give a database file, e.g. sqlite:///data.db")
        query = parse_qs(parts.query)
        try:
            self.timeout = float(query.get("timeout", ["300"])[0])
        except ValueError as exc:
            raise ConfigError(f"{url}: timeout must be a number of seconds") from exc
        self.path = Path(path)
        self.url = url
        self.table = table

    # -- connections -------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=True)
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise SinkError(f"cannot switch {self.path} to WAL mode (got {mode})",
                                sink=self.url)
            conn.execute("PRAGMA synchronous = NORMAL")
            return conn
        except sqlite3.Error as exc:
            raise SinkError(f"cannot open {self.path}: {exc}", sink=self.url) from exc

    def check(self) -> None:
        """Open the database (creating it) and switch it to WAL."""
        if not self.path.parent.is_dir():
            raise SinkError(f"directory {self.path.parent} does not exist", sink=self.url)
        self._connect().close()

    def default_batch_size(self, ncols: int) -> int:
        """~400k values per transaction: short commits, low memory (no parameter limit:
        rows are bound one at a time by executemany)."""
        return max(1_000, min(100_000, 400_000 // max(1, ncols)))

    @staticmethod
    def _exists(conn: sqlite3.Connection, table: str) -> bool:
        row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                           (table,)).fetchone()
        return row is not None

    def ledger_state(self, table: str, load_id: str) -> LedgerState:
        """Committed batches of ``load_id`` (empty when the table is gone)."""
        conn = self._connect()
        try:
            if not (self._exists(conn, table) and self._exists(conn, LEDGER)):
                return LedgerState()
            rows = conn.execute(
                f"SELECT batch, rows, batch_size FROM {LEDGER} WHERE load_id = ? AND target = ?",
                (load_id, table)).fetchall()
        except sqlite3.Error as exc:
            raise SinkError(f"cannot read the ledger: {exc}", sink=self.url) from exc
        finally:
            conn.close()
        return LedgerState(batch_size=rows[0][2] if rows else None,
                           committed={int(b): int(n) for b, n, _ in rows})

    def prepare(self, plan: LoadPlan) -> Schema:
        """Create the ledger, the table (STRICT) and the key's unique index as needed."""
        conn = self._connect()
        t = quote_ident(plan.table)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {LEDGER} (load_id TEXT NOT NULL, "
                "batch INTEGER NOT NULL, target TEXT NOT NULL, first_row INTEGER NOT NULL, "
                "rows INTEGER NOT NULL, batch_size INTEGER NOT NULL, "
                "committed_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP, "
                "PRIMARY KEY (load_id, batch))")
            if self._exists(conn, plan.table):
                info = conn.execute(f"PRAGMA table_info({t})").fetchall()
                inferred = plan.schema.as_dict()
                cols = []
                for _cid, name, decl, *_ in info:
                    typ = inferred.get(name) or {"INTEGER": "int", "INT": "int", "REAL": "float",
                                                 "BLOB": "bytes"}.get(str(decl).upper(), "text")
                    cols.append(Column(name, typ))
                schema = Schema(tuple(cols))
            else:
                body = ", ".join(f"{quote_ident(c.name)} {_DECL[c.type]}"
                                 for c in plan.schema.columns)
                conn.execute(f"CREATE TABLE {t} ({body}){' STRICT' if _STRICT else ''}")
                # A new table: ledger rows of earlier loads into a dropped table are void.
                conn.execute(f"DELETE FROM {LEDGER} WHERE target = ?", (plan.table,))
                schema = plan.schema
            if plan.key is not None:
                if plan.key not in schema.names:
                    raise SinkError(f"key column {plan.key!r} is not a column of {plan.table}",
                                    sink=self.url)
                idx = quote_ident(f"{plan.table}__{plan.key}__fetcher_key")
                conn.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS {idx} ON {t} "
                             f"({quote_ident(plan.key)})")
            conn.execute("COMMIT")
            return schema
        except sqlite3.Error as exc:
            raise SinkError(f"cannot prepare table {plan.table}: {exc}", sink=self.url) from exc
        finally:
            conn.close()

    def writer(self, plan: LoadPlan) -> _SQLiteBatchWriter:
        """The single writer connection (opened in the calling worker thread)."""
        return _SQLiteBatchWriter(self, plan)

    def close(self) -> None:
        """Nothing held between loads."""


class _SQLiteBatchWriter:
    def __init__(self, sink: SQLiteSink, plan: LoadPlan) -> None:
        self.sink = sink
        self.plan = plan
        self.conn = sink._connect()
        names = plan.schema.names
        cols = ", ".join(quote_ident(n) for n in names)
        marks = ", ".join("?" * len(names))
        sql = f"INSERT INTO {quote_ident(plan.table)} ({cols}) VALUES ({marks})"
        if plan.key is not None:
            updates = ", ".join(f"{quote_ident(n)} = excluded.{quote_ident(n)}"
                                for n in names if n != plan.key)
            action = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
            sql += f" ON CONFLICT ({quote_ident(plan.key)}) {action}"
        self.sql = sql
        self.convs = column_converters(plan.schema.types, _CONVERT)
        self.key_index = names.index(plan.key) if plan.key is not None else None
        self.in_tx = False

    def _tuples(self, batch: Batch) -> list[tuple[Any, ...]]:
        tuples = extract(batch.records(), self.plan.schema.names, target=self.plan.table)
        if self.key_index is not None:
            k = self.key_index
            for i, tup in enumerate(tuples):
                if tup[k] is None:
                    raise RowError(i, f"key column {self.plan.key!r} is null")
        return apply_converters(tuples, self.convs)

    def stage(self, batch: Batch) -> None:
        tuples = self._tuples(batch)
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.in_tx = True
            try:
                self.conn.executemany(self.sql, tuples)
            except sqlite3.ProgrammingError:
                # A value sqlite3 cannot bind (a dict in a text column, say): convert by
                # value type and try once more.
                self.conn.execute("ROLLBACK")
                self.conn.execute("BEGIN IMMEDIATE")
                tuples = [tuple(_generic(v) for v in t) for t in tuples]
                self.conn.executemany(self.sql, tuples)
        except sqlite3.Error as exc:
            raise self._locate(batch, tuples, exc) from exc

    def _locate(self, batch: Batch, tuples: list[tuple[Any, ...]],
                exc: sqlite3.Error) -> SinkError:
        """Find the first row the database rejects (inside a transaction rolled back)."""
        self.rollback()
        where = None
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            for i, tup in enumerate(tuples):
                try:
                    self.conn.execute(self.sql, tup)
                except sqlite3.Error as row_exc:
                    where, exc = i, row_exc
                    break
        except sqlite3.Error:
            pass
        finally:
            self.in_tx = True
            self.rollback()
        return SinkError(f"{type(exc).__name__}: {exc}", sink=self.sink.url, batch=batch.number,
                         row=None if where is None else batch.first_row + where)

    def commit(self, batch: Batch) -> bool:
        try:
            cur = self.conn.execute(
                f"INSERT INTO {LEDGER} (load_id, batch, target, first_row, rows, batch_size) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (load_id, batch) DO NOTHING",
                (self.plan.load_id, batch.number, self.plan.table, batch.first_row,
                 batch.size, self.plan.batch_size))
            if cur.rowcount == 0:
                self.rollback()
                return False
            self.conn.execute("COMMIT")
            self.in_tx = False
            return True
        except sqlite3.Error as exc:
            raise SinkError(f"commit failed: {exc}", sink=self.sink.url,
                            batch=batch.number) from exc

    def rollback(self) -> None:
        if self.in_tx:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            self.in_tx = False

    def close(self) -> None:
        self.rollback()
        self.conn.close()
