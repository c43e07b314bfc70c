"""Parallel writer benchmark: ParallelWriter against hand-written loads, in one run.

Run from the repository root::

    python bench/bench_write.py             # 1,000,000 rows, 3 rounds
    python bench/bench_write.py --quick     # 200,000 rows
    python bench/bench_write.py --rows 500000 --rounds 5

The same rows (8 mixed columns: int, bigint, float, text, bool, timestamp, date,
nullable text; Python dicts, generated once) go through every contender:

* PostgreSQL (``--pg``, default the local test database):
  hand-written single-connection psycopg ``COPY ... FROM STDIN`` (text format, the way
  it is usually written: the reference), the same in binary format (for context),
  ParallelWriter with 1, 2 and 4 workers, ``pandas.DataFrame.to_sql`` default
  (executemany) and ``method="multi", chunksize=5000`` -- those two on a smaller
  slice (``--tosql-rows``, ``--multi-rows``; they are 10-100x slower), the DataFrame
  built outside the timing -- and ``method="multi", chunksize=10000``, which must fail
  on PostgreSQL's 65,535-parameter limit.
* SQLite: ParallelWriter (one writer connection) and a hand-written ``executemany`` in
  one transaction (for context).
* Parquet: ParallelWriter into a shard directory with 1, 2 and 4 workers against one
  ``pyarrow.parquet.write_table`` of the same records (``Table.from_pylist`` + write);
  and the same data as an Arrow table: ``ParallelWriter.write_arrow`` (2 workers)
  against one ``write_table`` of that table.

Each contender runs ``--rounds`` times (rounds rotate the order); the tables show
median rows/s and ratios. Exit status 1 when a target is missed:
ParallelWriter->PostgreSQL (default 2 workers) >= 0.8x the hand-written COPY, >= 5x
to_sql default, >= 50x to_sql multi; SQLite >= 150,000 rows/s; Parquet shards (default
2 workers) >= 1.0x the single write_table of the same records (the Arrow-in comparison is
printed for context). Before the timed
rounds every contender runs once, untimed, on ``--warmup`` rows. JSON goes to
``bench/results/write.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from operator import itemgetter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fetcher.writers import ParallelWriter  # noqa: E402

PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"
COLUMNS = ("id", "big", "x", "name", "flag", "ts", "day", "note")
DDL = ("(id bigint, big bigint, x double precision, name text, flag boolean, "
       "ts timestamp, day date, note text)")
WORKERS = (1, 2, 4)
DEFAULT_WORKERS = 2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_rows(n: int) -> list[dict[str, Any]]:
    rnd = random.Random(42)
    base = dt.datetime(2024, 1, 1)
    day0 = dt.date(2020, 1, 1)
    return [{"id": i, "big": i * 1_000_003 + 10_000_000_000, "x": rnd.random() * 1000,
             "name": f"name-{rnd.randrange(100_000)}", "flag": i % 3 == 0,
             "ts": base + dt.timedelta(seconds=i), "day": day0 + dt.timedelta(days=i % 3650),
             "note": None if i % 4 == 0 else f"note {i}"} for i in range(n)]


class Bench:
    """Collects timings: name -> list of (rows, seconds)."""

    def __init__(self) -> None:
        self.runs: dict[str, list[float]] = {}
        self.rows: dict[str, int] = {}
        self.notes: dict[str, str] = {}

    def time(self, name: str, rows: int, fn: Callable[[], None],
             setup: Callable[[], None] | None = None,
             teardown: Callable[[], None] | None = None) -> None:
        if setup is not None:
            setup()
        try:
            t0 = time.perf_counter()
            fn()
            secs = time.perf_counter() - t0
        finally:
            if teardown is not None:
                teardown()
        self.runs.setdefault(name, []).append(rows / secs)
        self.rows[name] = rows
        log(f"  {name:<34} {rows / secs:>12,.0f} rows/s")

    def median(self, name: str) -> float | None:
        vals = self.runs.get(name)
        return statistics.median(vals) if vals else None


# -- PostgreSQL ------------------------------------------------------------------------
class Pg:
    def __init__(self, url: str) -> None:
        import psycopg

        self.url = url
        self.conn = psycopg.connect(url, autocommit=True)
        self.made: list[str] = []

    def new_table(self, create: bool) -> str:
        name = f"bench_w_{uuid.uuid4().hex[:10]}"
        self.made.append(name)
        if create:
            self.conn.execute(f"CREATE TABLE {name} {DDL}")
        return name

    def drop_all(self) -> None:
        for name in self.made:
            self.conn.execute(f"DROP TABLE IF EXISTS {name}")
            if self.conn.execute("SELECT to_regclass('_fetcher_ledger')").fetchone()[0]:
                self.conn.execute("DELETE FROM _fetcher_ledger WHERE target = %s", (name,))
        self.made.clear()

    def count(self, table: str) -> int:
        return int(self.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def hand_copy(url: str, table: str, rows: list[dict[str, Any]], *, binary: bool) -> None:
    """What a user writes by hand: one connection, one COPY, one commit."""
    import psycopg

    get = itemgetter(*COLUMNS)
    fmt = " (FORMAT BINARY)" if binary else ""
    with psycopg.connect(url) as conn, conn.cursor() as cur, \
            cur.copy(f"COPY {table} ({', '.join(COLUMNS)}) FROM STDIN{fmt}") as cp:
        if binary:
            cp.set_types(["int8", "int8", "float8", "text", "bool", "timestamp", "date", "text"])
        for r in rows:
            cp.write_row(get(r))


def writer_load(url: str, table: str, rows: list[dict[str, Any]], workers: int) -> None:
    with ParallelWriter(url, table=table, workers=workers) as w:
        w.write_many(rows)
    w.close()


def bench_postgres(b: Bench, args: argparse.Namespace, rows: list[dict[str, Any]],
                   *, fail_check: bool = True) -> None:
    try:
        pg = Pg(args.pg)
    except Exception as exc:
        b.notes["postgres"] = f"PostgreSQL not reachable at {args.pg}: {exc}"
        log(b.notes["postgres"])
        return
    n = len(rows)
    contenders: list[tuple[str, int, Callable[[str], None], bool]] = [
        ("pg: hand COPY text (reference)", n,
         lambda t: hand_copy(args.pg, t, rows, binary=False), True),
        ("pg: hand COPY binary", n, lambda t: hand_copy(args.pg, t, rows, binary=True), True),
    ]
    for w in WORKERS:
        contenders.append((f"pg: ParallelWriter workers={w}", n,
                           lambda t, w=w: writer_load(args.pg, t, rows, w), False))
    df_default = df_multi = None
    engine = None
    if not args.skip_pandas:
        try:
            import pandas as pd
            import sqlalchemy

            engine = sqlalchemy.create_engine(args.pg.replace("postgresql://",
                                                              "postgresql+psycopg://", 1))
            df_default = pd.DataFrame.from_records(rows[:args.tosql_rows], columns=COLUMNS)
            df_multi = pd.DataFrame.from_records(rows[:args.multi_rows], columns=COLUMNS)
        except ImportError as exc:
            b.notes["pandas"] = f"pandas/SQLAlchemy missing ({exc}); pip install pandas sqlalchemy"
            log(b.notes["pandas"])
    if engine is not None and df_default is not None and df_multi is not None:
        e, d1, d2 = engine, df_default, df_multi
        contenders.append((f"pg: to_sql default ({len(d1):,} rows)", len(d1),
                           lambda t: d1.to_sql(t, e, index=False, if_exists="append"), True))
        contenders.append((f"pg: to_sql multi 5000 ({len(d2):,} rows)", len(d2),
                           lambda t: d2.to_sql(t, e, index=False, if_exists="append",
                                               method="multi", chunksize=5000), True))
    try:
        for rnd in range(args.rounds):
            log(f"postgres round {rnd + 1}/{args.rounds}")
            k = rnd % len(contenders)
            for name, count, fn, create in contenders[k:] + contenders[:k]:
                table = pg.new_table(create)
                b.time(name, count, lambda fn=fn, table=table: fn(table),
                       teardown=lambda table=table, count=count: _check_count(pg, table, count))
                pg.drop_all()
        if fail_check and engine is not None and df_multi is not None:
            table = pg.new_table(True)
            big = df_multi if len(df_multi) >= 10_000 else df_default
            try:
                big.to_sql(table, engine, index=False, if_exists="append", method="multi",
                           chunksize=10_000)
                b.notes["to_sql multi 10000"] = "did not fail (unexpected)"
            except Exception as exc:
                text = " ".join(str(e) for e in (exc, exc.__cause__, exc.__context__) if e)
                found = re.search(r"[A-Za-z][\w ,]*65535", text)
                why = found.group(0) if found else text.strip()[-200:]
                b.notes["to_sql multi 10000"] = f"fails as expected: {type(exc).__name__}: {why}"
            log(b.notes["to_sql multi 10000"])
            pg.drop_all()
    finally:
        pg.drop_all()
        if engine is not None:
            engine.dispose()


def _check_count(pg: Pg, table: str, expected: int) -> None:
    got = pg.count(table)
    if got != expected:
        raise SystemExit(f"{table}: expected {expected} rows, found {got}")


# -- SQLite ----------------------------------------------------------------------------
def bench_sqlite(b: Bench, args: argparse.Namespace, rows: list[dict[str, Any]],
                 work: Path) -> None:
    import sqlite3

    n = len(rows)
    get = itemgetter(*COLUMNS)

    def hand(db: Path) -> None:
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("CREATE TABLE t (id INTEGER, big INTEGER, x REAL, name TEXT, flag INTEGER, "
                     "ts TEXT, day TEXT, note TEXT)")
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         ((a, bb, c, d, e, f.isoformat(" "), g.isoformat(), h)
                          for a, bb, c, d, e, f, g, h in map(get, rows)))
        conn.execute("COMMIT")
        conn.close()

    def check(db: Path) -> None:
        conn = sqlite3.connect(db)
        got = conn.execute("SELECT count(*) FROM t").fetchone()[0]
        conn.close()
        if got != n:
            raise SystemExit(f"sqlite: expected {n} rows, found {got}")

    for rnd in range(args.rounds):
        log(f"sqlite round {rnd + 1}/{args.rounds}")
        for name, fn in (("sqlite: ParallelWriter", lambda db: writer_load(
                              f"sqlite:///{db}", "t", rows, DEFAULT_WORKERS)),
                         ("sqlite: hand executemany", hand)):
            db = work / f"w{uuid.uuid4().hex[:8]}.db"
            b.time(name, n, lambda fn=fn, db=db: fn(db), teardown=lambda db=db: check(db))
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)


# -- Parquet ---------------------------------------------------------------------------
def bench_parquet(b: Bench, args: argparse.Namespace, rows: list[dict[str, Any]],
                  work: Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        b.notes["parquet"] = f"pyarrow missing: {exc}"
        return
    n = len(rows)
    prebuilt = pa.Table.from_pylist(rows)

    def single(path: Path) -> None:
        pq.write_table(pa.Table.from_pylist(rows), path)

    def shards(path: Path, workers: int) -> None:
        writer_load(f"file://{path}?format=parquet", "t", rows, workers)

    contenders: list[tuple[str, Callable[[Path], None]]] = [
        ("parquet: one write_table (records)", single),
        ("parquet: one write_table (prebuilt)", lambda p: pq.write_table(prebuilt, p)),
    ]
    for w in WORKERS:
        contenders.append((f"parquet: ParallelWriter workers={w}",
                           lambda p, w=w: shards(p, w)))

    def arrow_shards(path: Path) -> None:
        with ParallelWriter(f"file://{path}?format=parquet", table="t",
                            workers=DEFAULT_WORKERS) as w:
            w.write_arrow(prebuilt)
        w.close()

    contenders.append((f"parquet: write_arrow workers={DEFAULT_WORKERS} (prebuilt)",
                       arrow_shards))
    for rnd in range(args.rounds):
        log(f"parquet round {rnd + 1}/{args.rounds}")
        k = rnd % len(contenders)
        for name, fn in contenders[k:] + contenders[:k]:
            path = work / f"p{uuid.uuid4().hex[:8]}"
            if "write_table" in name:
                path = path.with_suffix(".parquet")
            b.time(name, n, lambda fn=fn, path=path: fn(path),
                   teardown=lambda path=path: _check_parquet(pq, path, n))


def _check_parquet(pq: Any, path: Path, n: int) -> None:
    got = pq.read_metadata(path).num_rows if path.is_file() else pq.read_table(path).num_rows
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    if got != n:
        raise SystemExit(f"{path}: expected {n} rows, found {got}")


# -- report ----------------------------------------------------------------------------
def report(b: Bench, args: argparse.Namespace, n: int) -> tuple[list[str], dict[str, Any]]:
    med = {name: b.median(name) for name in b.runs}

    def ratio(a: str, base: str) -> float | None:
        x, y = med.get(a), med.get(base)
        return x / y if x and y else None

    ref = "pg: hand COPY text (reference)"
    tosql = next((k for k in med if k.startswith("pg: to_sql default")), "")
    multi = next((k for k in med if k.startswith("pg: to_sql multi")), "")
    print(f"\nParallel writer benchmark: {n:,} rows x 8 columns, {args.rounds} rounds, "
          f"median rows/s (machine: {os.cpu_count()} CPUs)\n")
    lines = [("contender", "rows", "rows/s", "vs COPY", "vs to_sql", "vs multi")]
    for name in b.runs:
        if not name.startswith("pg:"):
            continue
        lines.append((name, f"{b.rows[name]:,}", f"{med[name]:,.0f}",
                      _fmt(ratio(name, ref)), _fmt(ratio(name, tosql)), _fmt(ratio(name, multi))))
    _table(lines)
    lines = [("contender", "rows", "rows/s", "vs write_table (records)",
              "vs write_table (prebuilt)")]
    for name in b.runs:
        if name.startswith(("sqlite:", "parquet:")):
            lines.append((name, f"{b.rows[name]:,}", f"{med[name]:,.0f}",
                          _fmt(ratio(name, "parquet: one write_table (records)"))
                          if name.startswith("parquet") else "",
                          _fmt(ratio(name, "parquet: one write_table (prebuilt)"))
                          if name.startswith("parquet") else ""))
    print()
    _table(lines)
    for k, v in b.notes.items():
        print(f"note: {k}: {v}")

    pw = f"pg: ParallelWriter workers={DEFAULT_WORKERS}"
    checks = [
        ("PostgreSQL ParallelWriter >= 0.8x hand COPY", ratio(pw, ref), 0.8),
        ("PostgreSQL ParallelWriter >= 5x to_sql default", ratio(pw, tosql), 5.0),
        ("PostgreSQL ParallelWriter >= 50x to_sql multi", ratio(pw, multi), 50.0),
        ("SQLite ParallelWriter >= 150,000 rows/s", med.get("sqlite: ParallelWriter"), 150_000),
        ("Parquet shards from records >= 1.0x one write_table of the records",
         ratio(f"parquet: ParallelWriter workers={DEFAULT_WORKERS}",
               "parquet: one write_table (records)"), 1.0),
    ]
    arrow = ratio(f"parquet: write_arrow workers={DEFAULT_WORKERS} (prebuilt)",
                  "parquet: one write_table (prebuilt)")
    if arrow is not None:
        print(f"\ncontext, not a target: Arrow in, shards out (write_arrow) = {arrow:.2f}x one "
              "write_table of the same Arrow table; each shard is fsynced and renamed, the "
              "single file is not.")
    missed = []
    print("\ntargets (ParallelWriter at its default workers=2):")
    for label, value, floor in checks:
        if value is None:
            print(f"  SKIP  {label}: not measured")
            continue
        ok = value >= floor
        shown = f"{value:,.0f}" if floor > 1000 else f"{value:.2f}x"
        print(f"  {'ok  ' if ok else 'MISS'}  {label}: {shown}")
        if not ok:
            missed.append(label)
    data = {"rows": n, "rounds": args.rounds, "cpus": os.cpu_count(),
            "median_rows_per_s": {k: round(v) for k, v in med.items() if v},
            "runs_rows_per_s": {k: [round(x) for x in v] for k, v in b.runs.items()},
            "rows_per_contender": b.rows, "notes": b.notes,
            "targets": [{"target": label, "value": value, "floor": floor,
                         "ok": value is not None and value >= floor}
                        for label, value, floor in checks]}
    return missed, data


def _fmt(x: float | None) -> str:
    return f"{x:.2f}x" if x is not None else "-"


def _table(lines: list[tuple[str, ...]]) -> None:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for j, line in enumerate(lines):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(line, widths, strict=True))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=None, help="rows (default 1,000,000; --quick "
                    "200,000)")
    ap.add_argument("--quick", action="store_true", help="200,000 rows, smaller pandas slices")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3)")
    ap.add_argument("--pg", default=os.environ.get("FETCHER_BENCH_PG", PG_DEFAULT),
                    help=f"PostgreSQL URL (default {PG_DEFAULT})")
    ap.add_argument("--tosql-rows", type=int, default=None,
                    help="rows for to_sql default (default 100,000; --quick 20,000)")
    ap.add_argument("--multi-rows", type=int, default=None,
                    help="rows for to_sql multi (default 20,000; --quick 10,000)")
    ap.add_argument("--warmup", type=int, default=20_000,
                    help="rows for one untimed warm-up pass of every contender (0: none)")
    ap.add_argument("--skip-pandas", action="store_true", help="leave out pandas.to_sql")
    ap.add_argument("--only", default="postgres,sqlite,parquet",
                    help="comma list of postgres, sqlite, parquet")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "write.json")
    args = ap.parse_args()
    n = args.rows or (200_000 if args.quick else 1_000_000)
    args.rounds = args.rounds or 3
    args.tosql_rows = min(n, args.tosql_rows or (20_000 if args.quick else 100_000))
    args.multi_rows = min(n, args.multi_rows or (10_000 if args.quick else 20_000))
    only = set(args.only.split(","))

    log(f"generating {n:,} rows")
    rows = make_rows(n)
    b = Bench()
    work = Path(tempfile.mkdtemp(prefix="bench_write_"))
    try:
        if args.warmup:
            log(f"warm-up (not timed): every contender once on {args.warmup:,} rows")
            warm = argparse.Namespace(**{**vars(args), "rounds": 1, "tosql_rows": 500,
                                         "multi_rows": 500})
            small = rows[:args.warmup]
            if "postgres" in only:
                bench_postgres(Bench(), warm, small, fail_check=False)
            if "sqlite" in only:
                bench_sqlite(Bench(), warm, small, work)
            if "parquet" in only:
                bench_parquet(Bench(), warm, small, work)
        if "postgres" in only:
            bench_postgres(b, args, rows)
        if "sqlite" in only:
            bench_sqlite(b, args, rows, work)
        if "parquet" in only:
            bench_parquet(b, args, rows, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    missed, data = report(b, args, n)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, args.json)
    if missed:
        print(f"\n{len(missed)} target(s) missed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
