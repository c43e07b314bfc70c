"""ParallelWriter against the real PostgreSQL at 127.0.0.1:5432 (database ``test``).

Each test uses its own table names and drops them (and their ledger rows) afterwards.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fetcher.errors import ConfigError, SinkError
from fetcher.writers import MANIFEST_SCHEMA, ParallelWriter, open_sink

psycopg = pytest.importorskip("psycopg")

PG_URL = os.environ.get("FETCHER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")

NewTable = Callable[[str], str]


@pytest.fixture
def pg() -> Iterator[tuple[Any, NewTable]]:
    try:
        conn = psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}: {exc}")
    made: list[str] = []

    def new_table(prefix: str) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        made.append(name)
        return name

    try:
        yield conn, new_table
    finally:
        for name in made:
            quoted = name.replace('"', '""')
            conn.execute(f'DROP TABLE IF EXISTS "{quoted}"')
            if conn.execute("SELECT to_regclass('_fetcher_ledger')").fetchone()[0]:
                conn.execute("DELETE FROM _fetcher_ledger WHERE target = %s", (name,))
        conn.close()


def records(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": i, "big": i * 10_000_000_000, "score": i / 4, "name": f"n{i}",
             "ok": i % 2 == 0, "at": dt.datetime(2024, 1, 1) + dt.timedelta(seconds=i),
             "day": dt.date(2024, 1, 1) + dt.timedelta(days=i % 30),
             "note": None if i % 3 else f"note {i}\twith\\escapes\n"}
            for i in range(start, start + n)]


def count(conn: Any, table: str) -> tuple[int, int]:
    row = conn.execute(f'SELECT count(*), count(DISTINCT id) FROM "{table}"').fetchone()
    return int(row[0]), int(row[1])


def test_round_trip_types_and_ledger(pg: tuple[Any, NewTable]) -> None:
    conn, new_table = pg
    t = new_table("w_rt")
    data = records(2345)
    with ParallelWriter(PG_URL, table=t, workers=3, batch_size=500) as w:
        w.write_many(data)
    s = w.close()
    assert (s.rows, s.batches, s.workers) == (2345, 5, 3)
    assert count(conn, t) == (2345, 2345)
    got = conn.execute(f'SELECT id, big, score, name, ok, at, day, note FROM "{t}" '
                       "WHERE id IN (3, 4) ORDER BY id").fetchall()
    assert got == [tuple(data[3].values()), tuple(data[4].values())]
    types = dict(conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s",
        (t,)).fetchall())
    assert types == {"id": "bigint", "big": "bigint", "score": "double precision",
                     "name": "text", "ok": "boolean", "at": "timestamp without time zone",
                     "day": "date", "note": "text"}
    ledger = conn.execute("SELECT batch, first_row, rows FROM _fetcher_ledger WHERE target = %s "
                          "ORDER BY batch", (t,)).fetchall()
    assert [b for b, _, _ in ledger] == [0, 1, 2, 3, 4] and ledger[-1] == (4, 2000, 345)


def test_json_lists_dicts_nulls_and_text_fallback(pg: tuple[Any, NewTable]) -> None:
    conn, new_table = pg
    t = new_table("w_json")
    rows = [{"url": f"u{i}", "outputs": [f"a{i}", {"k": dt.date(2024, 1, 1)}], "meta": {"i": i},
             "maybe": None, "when": dt.datetime(2024, 1, 1, tzinfo=dt.UTC)} for i in range(50)]
    rows[10]["maybe"] = 5  # column inferred as text (first batch all None); an int still fits
    with ParallelWriter(PG_URL, table=t, batch_size=20, schema={"maybe": "text"}) as w:
        w.write_many(rows)
    w.close()
    got = conn.execute(f'SELECT outputs, meta, maybe, "when" FROM "{t}" WHERE url = %s',
                       ("u10",)).fetchone()
    assert got[0] == ["a10", {"k": "2024-01-01"}] and got[1] == {"i": 10} and got[2] == "5"
    assert got[3] == dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    kinds = dict(conn.execute("SELECT column_name, data_type FROM information_schema.columns "
                              "WHERE table_name = %s", (t,)).fetchall())
    assert kinds["outputs"] == "jsonb" and kinds["when"] == "timestamp with time zone"


def test_strings_into_typed_columns_go_through_text_copy(pg: tuple[Any, NewTable]) -> None:
    conn, new_table = pg
    t = new_table("w_str")
    conn.execute(f'CREATE TABLE "{t}" (id bigint, flag boolean, at timestamp, small integer)')
    rows = [{"id": str(i), "flag": "false" if i % 2 else "true", "at": "2024-01-02 03:04:05",
             "small": i} for i in range(30)]
    with ParallelWriter(PG_URL, table=t, batch_size=10) as w:
        w.write_many(rows)
    w.close()
    assert conn.execute(f'SELECT count(*) FILTER (WHERE flag), count(*) FROM "{t}"'
                        ).fetchone() == (15, 30)  # "false" must not become true
    assert conn.execute(f'SELECT at FROM "{t}" LIMIT 1').fetchone()[0] == \
        dt.datetime(2024, 1, 2, 3, 4, 5)


def test_out_of_range_into_integer_column_is_rejected_not_truncated(
        pg: tuple[Any, NewTable]) -> None:
    conn, new_table = pg
    t = new_table("w_int4")
    conn.execute(f'CREATE TABLE "{t}" (id bigint, small integer)')
    w = ParallelWriter(PG_URL, table=t, batch_size=10)
    w.write_many([{"id": i, "small": 70_000 if i != 13 else 2**40} for i in range(20)])
    with pytest.raises(SinkError) as info:
        w.close()
    assert info.value.row == 13 and info.value.batch == 1 and "out of range" in str(info.value)
    assert conn.execute(f'SELECT count(*), min(small) FROM "{t}"').fetchone() == (10, 70_000)


def test_rejected_value_names_row_and_rerun_continues(pg: tuple[Any, NewTable]) -> None:
    conn, new_table = pg
    t = new_table("w_bad")
    data = records(1000)
    data[537]["day"] = "not a date"
    w = ParallelWriter(PG_URL, table=t, batch_size=100, workers=3, run_id="bad-run")
    with pytest.raises(SinkError) as info, w:
        w.write_many(data)
    err = info.value
    assert err.batch == 5 and err.row == 537
    assert "not a date" in str(err) and "postgresql://postgres@127.0.0.1:5432/test" in str(err)
    assert count(conn, t) == (500, 500)  # exactly the batches before the bad one
    data[537]["day"] = dt.date(2024, 2, 2)
    with ParallelWriter(PG_URL, table=t, run_id="bad-run", workers=3) as w2:
        w2.write_many(data)
    s = w2.close()
    assert (s.rows, s.skipped_batches) == (500, 5)
    assert count(conn, t) == (1000, 1000)


def test_idempotent_replay_with_key(pg: tuple[Any, NewTable]) -> None:
    conn, new_table = pg
    t = new_table("w_key")
    data = records(1200)
    for _ in range(2):  # a replay changes nothing
        with ParallelWriter(PG_URL, table=t, key="id", workers=2, batch_size=250) as w:
            w.write_many(data)
        w.close()
        assert count(conn, t) == (1200, 1200)
    snapshot = conn.execute(f'SELECT md5(string_agg(t::text, \',\' ORDER BY id)) FROM "{t}" t'
                            ).fetchone()
    with ParallelWriter(PG_URL, table=t, key="id", batch_size=250) as w:
        w.write_many(data[::-1] + data[:10])  # other order, in-batch duplicates
    w.close()
    assert conn.execute(f'SELECT md5(string_agg(t::text, \',\' ORDER BY id)) FROM "{t}" t'
                        ).fetchone() == snapshot
    updated = dict(data[7], name="changed")
    with ParallelWriter(PG_URL, table=t, key="id") as w:
        w.write(updated)
    w.close()
    assert conn.execute(f'SELECT name FROM "{t}" WHERE id = 7').fetchone() == ("changed",)


def test_key_on_existing_table_without_unique_index(pg: tuple[Any, NewTable]) -> None:
    conn, new_table = pg
    t = new_table("w_key2")
    conn.execute(f'CREATE TABLE "{t}" (url text, status text, outputs jsonb)')
    rec = {"url": "http://x/1", "status": "ok", "outputs": ["a"]}
    for _ in range(3):
        with ParallelWriter(PG_URL, table=t, key="url") as w:
            w.write(rec)
        w.close()
    assert conn.execute(f'SELECT count(*) FROM "{t}"').fetchone() == (1,)


def test_many_threads_manifest_records_with_key(pg: tuple[Any, NewTable]) -> None:
    """The shape ``fetcher get --sink`` uses: records from many threads, key=url."""
    conn, new_table = pg
    t = new_table("w_get")
    w = ParallelWriter(PG_URL, table=t, key="url", workers=4, batch_size=64,
                       schema=MANIFEST_SCHEMA, flush_interval=0.2)

    def produce(k: int) -> None:
        for i in range(250):
            n = k * 250 + i
            w.write({"url": f"http://h/{n}", "path": f"f/{n}", "status": "ok", "bytes": n,
                     "sha256": None, "http_status": None, "attempts": 1, "elapsed_s": 0.01,
                     "error_type": None, "error": None, "outputs": [], "batch": "b1"})

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    s = w.close()
    assert s.rows == 2000
    assert conn.execute(f'SELECT count(*), count(DISTINCT url) FROM "{t}"').fetchone() == \
        (2000, 2000)
    kinds = dict(conn.execute("SELECT column_name, data_type FROM information_schema.columns "
                              "WHERE table_name = %s", (t,)).fetchall())
    assert kinds["http_status"] == "bigint" and kinds["outputs"] == "jsonb"


def test_two_concurrent_runs_of_one_load_commit_each_batch_once(
        pg: tuple[Any, NewTable]) -> None:
    conn, new_table = pg
    t = new_table("w_twice")
    data = records(3000)
    # Create the table first, so both runs see the same (empty) ledger state.
    with ParallelWriter(PG_URL, table=t, batch_size=300, run_id="same") as w0:
        w0.write_many(data[:300])
    w0.close()
    summaries = []

    def run() -> None:
        with ParallelWriter(PG_URL, table=t, batch_size=300, run_id="same", workers=2) as w:
            w.write_many(data)
        summaries.append(w.close())

    threads = [threading.Thread(target=run) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert count(conn, t) == (3000, 3000)
    assert sum(s.batches for s in summaries) == 9  # each of batches 1..9 exactly once


def test_schema_qualified_table(pg: tuple[Any, NewTable]) -> None:
    conn, new_table = pg
    schema = new_table("ws")
    conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        with ParallelWriter(PG_URL, table=f"{schema}.items", run_id="q") as w:
            w.write_many(records(10))
        w.close()
        assert conn.execute(f'SELECT count(*) FROM "{schema}".items').fetchone() == (10,)
        assert conn.execute(f'SELECT count(*) FROM "{schema}"._fetcher_ledger').fetchone() == (1,)
    finally:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def test_quoting_of_odd_identifiers(pg: tuple[Any, NewTable]) -> None:
    conn, new_table = pg
    t = new_table('w "odd"; drop')
    with ParallelWriter(PG_URL, table=t) as w:
        w.write({'we"ird col': 1, "select": "x"})
    w.close()
    quoted = t.replace('"', '""')
    assert conn.execute(f'SELECT "we""ird col", "select" FROM "{quoted}"').fetchone() == (1, "x")


def test_unreachable_server_fails_fast_with_the_url() -> None:
    t0 = time.monotonic()
    with pytest.raises(SinkError) as info:
        ParallelWriter("postgresql://postgres:hunter2@127.0.0.1:1/test", table="t")
    assert time.monotonic() - t0 < 10
    msg = str(info.value)
    assert "127.0.0.1:1" in msg and "hunter2" not in msg and "cannot connect" in msg


def test_producer_is_not_hung_by_a_failed_worker(pg: tuple[Any, NewTable]) -> None:
    _, new_table = pg
    t = new_table("w_hang")
    w = ParallelWriter(PG_URL, table=t, batch_size=100, workers=1)
    t0 = time.monotonic()
    with pytest.raises(SinkError) as info:
        for i in range(100):
            w.write({"id": i, "v": "x"})
        for i in range(100, 10_000_000):  # would take minutes if the failure went unnoticed
            w.write({"id": i, "v": "x", "unknown": 1})
    assert time.monotonic() - t0 < 15
    assert info.value.batch == 1 and info.value.row == 100
    w.abort()


def test_open_sink_scheme_alias_and_missing_key_column(pg: tuple[Any, NewTable]) -> None:
    _, new_table = pg
    sink = open_sink(PG_URL.replace("postgresql://", "postgres://"), table=new_table("w_alias"))
    w = ParallelWriter(sink, key="nope")
    w.write_many(records(3))
    with pytest.raises(SinkError, match="key column 'nope'"):
        w.close()
    with pytest.raises(ConfigError, match="batch_size"):
        ParallelWriter(sink, batch_size=0)
