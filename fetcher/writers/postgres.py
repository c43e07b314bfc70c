"""PostgreSQL sink: COPY over one connection per worker, one transaction per batch.

Rows go in with binary COPY when every column has a type whose binary form psycopg
checks (bigint, double precision, boolean, text, varchar, timestamp[tz], date, json[b],
bytea) and the batch's values have matching Python types; otherwise text COPY, where the
server parses and validates every value. A rejected value is reported with its row
(from the COPY error context, or from the row being written).

Without ``key`` a batch is COPYed straight into the table (through a temporary staging
table when the table has unique indexes, so concurrent batches never wait on each other's
rows). With ``key`` it is COPYed into a per-connection temporary staging table and moved
with ``INSERT ... ON CONFLICT (key) DO UPDATE``: replaying a batch leaves the table as it
was. Either way the batch's row in ``_fetcher_ledger`` is written in the same transaction.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import ConfigError, SinkError
from .base import Batch, LedgerState, LoadPlan, redact_url
from .schema import (
    Column,
    RowError,
    Schema,
    apply_converters,
    column_converters,
    extract,
    json_text,
)

if TYPE_CHECKING:
    import psycopg

LEDGER = "_fetcher_ledger"
STAGE = "_fetcher_stage"
CONNECT_TIMEOUT_S = 10

_DECL = {"int": "bigint", "float": "double precision", "bool": "boolean", "text": "text",
         "timestamp": "timestamp", "timestamptz": "timestamptz", "date": "date",
         "json": "jsonb", "bytes": "bytea"}
# format_type() names -> logical types, for tables that already exist.
_LOGICAL = {"bigint": "int", "integer": "int", "smallint": "int", "double precision": "float",
            "real": "float", "numeric": "float", "boolean": "bool", "text": "text",
            "character varying": "text", "character": "text",
            "timestamp without time zone": "timestamp",
            "timestamp with time zone": "timestamptz", "date": "date", "jsonb": "json",
            "json": "json", "bytea": "bytes"}
# Type oids whose psycopg binary dumpers reject (rather than wrap or truncate) bad values.
# Not int2/int4/float4: their binary dumpers truncate out-of-range values silently.
_BINARY_SAFE = {20, 701, 16, 25, 1043, 1114, 1184, 1082, 3802, 114, 17}
_BOOL_OID = 16
_CONTEXT_LINE = re.compile(r"\bCOPY [^,]+, line (\d+)")


def split_table(table: str) -> tuple[str, ...]:
    """``"schema.table"`` -> ``("schema", "table")``; a plain name stays one part."""
    if not table or "\x00" in table:
        raise ConfigError(f"invalid table name {table!r}")
    parts = tuple(table.split(".", 1))
    if any(not p for p in parts):
        raise ConfigError(f"invalid table name {table!r}")
    return parts


def _short_ident(*parts: str) -> str:
    """A readable identifier within PostgreSQL's 63-byte limit, unique by hash."""
    base = "__".join(parts)
    if len(base.encode()) <= 50:
        return base
    digest = hashlib.sha1(base.encode()).hexdigest()[:10]
    return base.encode()[:40].decode(errors="ignore") + "_" + digest


def _describe(exc: BaseException) -> str:
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    msg = f"{type(exc).__name__}: {primary or str(exc).strip()}"
    detail = getattr(diag, "message_detail", None) if diag is not None else None
    if detail:
        msg += f" ({detail})"
    return msg


def _is_server_error(exc: BaseException) -> bool:
    diag = getattr(exc, "diag", None)
    return diag is not None and getattr(diag, "sqlstate", None) is not None


class PostgresSink:
    """Loads into a PostgreSQL table with COPY, one connection per worker."""

    max_workers: int | None = None
    supports_key = True

    def __init__(self, url: str, *, table: str | None = None) -> None:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        query.setdefault("connect_timeout", str(CONNECT_TIMEOUT_S))
        query.setdefault("application_name", "fetcher-writer")
        scheme = "postgresql" if parts.scheme == "postgres" else parts.scheme
        self._dsn = urlunsplit((scheme, parts.netloc, parts.path, urlencode(query), ""))
        self.url = redact_url(url)
        self.table = table

    def connect(self) -> psycopg.Connection[Any]:
        """A new connection (transactions explicit), or SinkError naming the sink."""
        import psycopg
        from psycopg.types.json import set_json_dumps

        try:
            conn = psycopg.connect(self._dsn, autocommit=False)
        except psycopg.Error as exc:
            raise SinkError(f"cannot connect: {str(exc).strip()}", sink=self.url) from exc
        set_json_dumps(json_text, context=conn)
        return conn

    def check(self) -> None:
        """Connect once, so an unreachable server fails before any work."""
        self.connect().close()

    def default_batch_size(self, ncols: int) -> int:
        """~400k values per COPY (COPY has no parameter limit; this bounds memory and
        keeps transactions short)."""
        return max(1_000, min(100_000, 400_000 // max(1, ncols)))

    def _names(self, table: str) -> tuple[Any, Any, str]:
        """(table identifier, ledger identifier, quoted text name for to_regclass)."""
        from psycopg import sql

        parts = split_table(table)
        ident = sql.Identifier(*parts)
        ledger = sql.Identifier(parts[0], LEDGER) if len(parts) == 2 else sql.Identifier(LEDGER)
        regname = ".".join('"' + p.replace('"', '""') + '"' for p in parts)
        return ident, ledger, regname

    def ledger_state(self, table: str, load_id: str) -> LedgerState:
        """Committed batches of ``load_id`` (empty when the table does not exist)."""
        import psycopg
        from psycopg import sql

        _ident, ledger, regname = self._names(table)
        ledger_reg = regname.rsplit(".", 1)[0] + f'."{LEDGER}"' if "." in regname \
            else f'"{LEDGER}"'
        with self.connect() as conn:
            try:
                row = conn.execute("SELECT to_regclass(%s), to_regclass(%s)",
                                   (regname, ledger_reg)).fetchone()
                if row is None or row[0] is None or row[1] is None:
                    return LedgerState()
                rows = conn.execute(
                    sql.SQL("SELECT batch, rows, batch_size FROM {} WHERE load_id = %s "
                            "AND target = %s").format(ledger), (load_id, table)).fetchall()
            except psycopg.Error as exc:
                raise SinkError(f"cannot read the ledger: {_describe(exc)}",
                                sink=self.url) from exc
        return LedgerState(batch_size=rows[0][2] if rows else None,
                           committed={int(b): int(n) for b, n, _ in rows})

    def prepare(self, plan: LoadPlan) -> Schema:
        """Create ledger, table and key index as needed (serialised by an advisory lock)."""
        import psycopg
        from psycopg import sql

        ident, ledger, regname = self._names(plan.table)
        with self.connect() as conn:
            try:
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                             ("fetcher:" + plan.table,))
                conn.execute(sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (load_id text NOT NULL, "
                    "batch integer NOT NULL, target text NOT NULL, first_row bigint NOT NULL, "
                    "rows integer NOT NULL, batch_size integer NOT NULL, "
                    "committed_at timestamptz NOT NULL DEFAULT now(), "
                    "PRIMARY KEY (load_id, batch))").format(ledger))
                row = conn.execute("SELECT to_regclass(%s)::oid", (regname,)).fetchone()
                oid = row[0] if row else None
                if oid is None:
                    body = [sql.SQL("{} {}").format(sql.Identifier(c.name),
                                                    sql.SQL(_DECL[c.type]))
                            for c in plan.schema.columns]
                    if plan.key is not None:
                        body.append(sql.SQL("PRIMARY KEY ({})").format(sql.Identifier(plan.key)))
                    conn.execute(sql.SQL("CREATE TABLE {} ({})").format(
                        ident, sql.SQL(", ").join(body)))
                    # A new table: ledger rows of loads into an earlier (dropped) one are void.
                    conn.execute(sql.SQL("DELETE FROM {} WHERE target = %s").format(ledger),
                                 (plan.table,))
                    schema = plan.schema
                else:
                    schema = self._existing_schema(conn, oid, plan)
                    if plan.key is not None:
                        self._ensure_unique(conn, oid, ident, plan)
                conn.commit()
            except psycopg.Error as exc:
                raise SinkError(f"cannot prepare table {plan.table}: {_describe(exc)}",
                                sink=self.url) from exc
        return schema

    def _existing_schema(self, conn: psycopg.Connection[Any], oid: int,
                         plan: LoadPlan) -> Schema:
        rows = conn.execute(
            "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute "
            "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped "
            "AND attgenerated = '' ORDER BY attnum", (oid,)).fetchall()
        return Schema(tuple(Column(name, _LOGICAL.get(typ, "text")) for name, typ in rows))

    def _ensure_unique(self, conn: psycopg.Connection[Any], oid: int, ident: Any,
                       plan: LoadPlan) -> None:
        from psycopg import sql

        assert plan.key is not None
        found = conn.execute(
            "SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = i.indkey[0] WHERE i.indrelid = %s AND i.indisunique "
            "AND i.indnkeyatts = 1 AND i.indpred IS NULL AND a.attname = %s",
            (oid, plan.key)).fetchone()
        if found is None:
            name = _short_ident(split_table(plan.table)[-1], plan.key, "fetcher_key")
            conn.execute(sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} ({})").format(
                sql.Identifier(name), ident, sql.Identifier(plan.key)))

    def writer(self, plan: LoadPlan) -> _PgBatchWriter:
        """A BatchWriter on its own connection."""
        return _PgBatchWriter(self, plan)

    def close(self) -> None:
        """Nothing held between loads (connections belong to the batch writers)."""


class _PgBatchWriter:
    def __init__(self, sink: PostgresSink, plan: LoadPlan) -> None:
        from psycopg import sql

        self.sink = sink
        self.plan = plan
        self.conn = sink.connect()
        try:
            self._setup(sql)
        except BaseException:
            self.conn.close()
            raise

    def _setup(self, sql: Any) -> None:
        plan = self.plan
        ident, ledger, regname = self.sink._names(plan.table)
        self.ledger = ledger
        names = plan.schema.names
        cols = sql.SQL(", ").join(sql.Identifier(n) for n in names)
        info = self.conn.execute(
            "SELECT a.attname, a.atttypid FROM pg_attribute a WHERE a.attrelid = "
            "to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped", (regname,)).fetchall()
        oid_of = {name: int(oid) for name, oid in info}
        self.oids = [oid_of.get(n, 25) for n in names]
        self.binary_ok = all(o in _BINARY_SAFE for o in self.oids)
        self.bool_cols = [i for i, o in enumerate(self.oids) if o == _BOOL_OID]
        unique = self.conn.execute(
            "SELECT 1 FROM pg_index WHERE indrelid = to_regclass(%s) AND indisunique",
            (regname,)).fetchone() is not None
        self.staged = plan.key is not None or unique
        target = sql.Identifier(STAGE) if self.staged else ident
        self.copy_text = sql.SQL("COPY {} ({}) FROM STDIN").format(target, cols)
        self.copy_binary = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(target, cols)
        if self.staged:
            self.conn.execute(sql.SQL(
                "CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS) "
                "ON COMMIT DELETE ROWS").format(sql.Identifier(STAGE), ident))
            move = sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(
                ident, cols, cols, sql.Identifier(STAGE))
            if plan.key is not None:
                others = [n for n in names if n != plan.key]
                if others:
                    sets = sql.SQL(", ").join(
                        sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(n), sql.Identifier(n))
                        for n in others)
                    move += sql.SQL(" ON CONFLICT ({}) DO UPDATE SET {}").format(
                        sql.Identifier(plan.key), sets)
                else:
                    move += sql.SQL(" ON CONFLICT ({}) DO NOTHING").format(
                        sql.Identifier(plan.key))
            self.move = move
        self.conn.commit()
        self.ledger_sql = sql.SQL(
            "INSERT INTO {} (load_id, batch, target, first_row, rows, batch_size) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (load_id, batch) DO NOTHING "
            "RETURNING 1").format(ledger)
        self.json_convs = column_converters(plan.schema.types, {"json": json_text})
        self.key_index = names.index(plan.key) if plan.key is not None else None
        self.use_binary = self.binary_ok

    def _tuples(self, batch: Batch) -> tuple[list[tuple[Any, ...]], list[int] | None]:
        tuples = extract(batch.records(), self.plan.schema.names, target=self.plan.table)
        order: list[int] | None = None
        if self.key_index is not None:
            k = self.key_index
            last: dict[Any, int] = {}
            for i, tup in enumerate(tuples):
                v = tup[k]
                if v is None:
                    raise RowError(i, f"key column {self.plan.key!r} is null")
                last[v] = i
            if len(last) != len(tuples):  # duplicates inside the batch: the last one wins
                order = sorted(last.values())
                tuples = [tuples[i] for i in order]
        return tuples, order

    def stage(self, batch: Batch) -> None:
        tuples, order = self._tuples(batch)
        binary = self.use_binary and all(
            {type(t[i]) for t in tuples} <= {bool, type(None)} for i in self.bool_cols)
        if binary:
            try:
                self._copy(tuples, binary=True)
                return
            except _ClientSide:
                # A value of a Python type the binary dumper does not take: from now on
                # this connection sends text, which the server parses and checks.
                self.rollback()
                self.use_binary = False
            except _ServerSide as exc:
                self.rollback()
                raise self._error(batch, exc.original, exc.index, order) from exc.original
        text_rows = apply_converters(tuples, self.json_convs)
        try:
            self._copy(text_rows, binary=False)
        except _CopyFailed as exc:
            self.rollback()
            raise self._error(batch, exc.original, exc.index, order) from exc.original

    def _copy(self, tuples: Sequence[tuple[Any, ...]], *, binary: bool) -> None:
        import psycopg

        i = -1
        in_rows = False
        try:
            with self.conn.cursor() as cur, \
                    cur.copy(self.copy_binary if binary else self.copy_text) as cp:
                if binary:
                    cp.set_types(self.oids)
                write_row = cp.write_row
                in_rows = True
                for i, t in enumerate(tuples):  # noqa: B007 - i names the failing row
                    write_row(t)
                in_rows = False
        except (psycopg.Error, TypeError, ValueError, OverflowError, AttributeError) as exc:
            if _is_server_error(exc) or isinstance(exc, psycopg.OperationalError):
                line = _CONTEXT_LINE.search(_diag_context(exc))
                raise _ServerSide(exc, int(line.group(1)) - 1 if line else None) from exc
            raise _ClientSide(exc, i if in_rows else None) from exc

    def _error(self, batch: Batch, exc: BaseException, index: int | None,
               order: list[int] | None) -> SinkError:
        row = None
        if index is not None and index >= 0:
            row = batch.first_row + (order[index] if order is not None else index)
        return SinkError(_describe(exc), sink=self.sink.url, batch=batch.number, row=row)

    def commit(self, batch: Batch) -> bool:
        import psycopg

        try:
            if self.staged:
                self.conn.execute(self.move)
            row = self.conn.execute(self.ledger_sql, (
                self.plan.load_id, batch.number, self.plan.table, batch.first_row,
                batch.size, self.plan.batch_size)).fetchone()
            if row is None:  # a concurrent run committed this batch first
                self.conn.rollback()
                return False
            self.conn.commit()
            return True
        except psycopg.Error as exc:
            self.rollback()
            raise SinkError(_describe(exc), sink=self.sink.url, batch=batch.number) from exc

    def rollback(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.rollback()

    def close(self) -> None:
        self.rollback()
        self.conn.close()


def _diag_context(exc: BaseException) -> str:
    diag = getattr(exc, "diag", None)
    ctx = getattr(diag, "context", None) if diag is not None else None
    return ctx or ""


class _CopyFailed(Exception):
    """A COPY failed at row ``index`` of the batch (None when unknown)."""

    def __init__(self, original: BaseException, index: int | None) -> None:
        super().__init__(str(original))
        self.original = original
        self.index = index


class _ClientSide(_CopyFailed):
    """psycopg could not dump a value (a Python type the format does not take)."""


class _ServerSide(_CopyFailed):
    """The server rejected the COPY (row from the error context, if any)."""
