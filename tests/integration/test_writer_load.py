"""load_file (what ``fetcher write`` runs): CSV, TSV, JSONL and Parquet files into real
SQLite, PostgreSQL and shard sinks; bad rows named by file and line; re-runs continue."""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import gzip
import json
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from fetcher.errors import ConfigError, SinkError
from fetcher.writers import InputRowError, load_file
from tests.dbutil import query

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


class Recorder:
    """A thread-safe Progress that records what it was told."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.total: int | None = None
        self.done = 0
        self.unit = ""
        self.closed = False

    def start(self, total: int | None, *, unit: str = "file", desc: str = "") -> None:
        self.total, self.unit = total, unit

    def set_total(self, total: int) -> None:
        self.total = total

    def update(self, n: int = 1, *, nbytes: int = 0) -> None:
        with self.lock:
            self.done += n

    def close(self) -> None:
        self.closed = True


def write_csv(path: Path, header: list[str], rows: list[list[Any]], delimiter: str = ",") -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)


def test_csv_to_sqlite_types_progress_and_rerun(tmp_path: Path) -> None:
    src = tmp_path / "Sales 2024.csv"
    write_csv(src, ["id", "amount", "paid", "day", "at", "code", "note"],
              [[i, f"{i}.5", "true" if i % 2 else "false", "2024-03-01", "2024-03-01T10:00:00",
                f"{i:05d}", "" if i % 3 else f"line\nbreak {i}"] for i in range(1234)])
    db = tmp_path / "out.db"
    prog = Recorder()
    s = load_file(src, f"sqlite:///{db}", table=None, workers=2, key=None, progress=prog,
                  batch_size=200)
    assert s.table == "sales_2024" and s.rows == 1234 and s.batches == 7
    assert prog.closed and prog.done == 1234 and prog.unit == "row"
    assert prog.total is not None and prog.total >= 1234  # counted lines (multi-line rows)
    row = query(db, "SELECT * FROM sales_2024 WHERE id = 3")[0]
    assert row == (3, 3.5, 1, "2024-03-01", "2024-03-01 10:00:00", "00003", "line\nbreak 3")
    assert query(db, "SELECT note FROM sales_2024 WHERE id = 4") == [(None,)]  # empty -> NULL
    again = load_file(src, f"sqlite:///{db}", table=None, workers=2, key=None, progress=None)
    assert (again.rows, again.skipped_batches, again.skipped_rows) == (0, 7, 1234)
    assert query(db, "SELECT count(*) FROM sales_2024") == [(1234,)]


def test_bad_csv_value_names_file_line_column_and_rerun_continues(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fetcher.writers.load.INFER_ROWS", 50)
    src = tmp_path / "m.csv"
    rows: list[list[Any]] = [[i, f"text {i}" if i != 20 else "two\nlines"] for i in range(300)]
    rows[237][0] = "n/a"
    write_csv(src, ["id", "label"], rows)
    url = f"sqlite:///{tmp_path}/m.db"
    with pytest.raises(InputRowError) as info:
        load_file(src, url, table="m", workers=2, key=None, progress=None, batch_size=40)
    err = info.value
    # row 237 is data line 238, plus the header line, plus one extra line from row 20
    assert f"{src} line 240" in str(err) and "'id'" in str(err) and "'n/a'" in str(err)
    assert err.row == 237 and err.batch == 5 and url in str(err)
    assert query(tmp_path / "m.db", "SELECT count(*) FROM m") == [(200,)]
    rows[237][0] = 237
    write_csv(src, ["id", "label"], rows)
    s = load_file(src, url, table="m", workers=2, key=None, progress=None)
    assert (s.rows, s.skipped_batches) == (100, 5)
    assert query(tmp_path / "m.db", "SELECT count(*), count(DISTINCT id) FROM m") == [(300, 300)]


def test_wrong_field_count_and_malformed_input(tmp_path: Path) -> None:
    src = tmp_path / "w.tsv"
    src.write_text("a\tb\n1\t2\n3\n", encoding="utf-8")
    with pytest.raises(InputRowError, match=r"w\.tsv line 3: expected 2 fields, found 1"):
        load_file(src, f"sqlite:///{tmp_path}/w.db", table=None, workers=1, key=None,
                  progress=None)
    dup = tmp_path / "dup.csv"
    dup.write_text("a,a\n1,2\n", encoding="utf-8")
    with pytest.raises(SinkError, match="duplicate column"):
        load_file(dup, f"sqlite:///{tmp_path}/w.db", table=None, workers=1, key=None,
                  progress=None)


def test_jsonl_gz_to_shards_with_blank_lines_and_bad_json(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    src = tmp_path / "ev.jsonl.gz"
    lines = [json.dumps({"id": i, "tags": ["a"], "v": None if i % 2 else 1.5})
             for i in range(500)]
    lines.insert(100, "")
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    s = load_file(src, f"file://{out}?format=parquet", table=None, workers=2, key=None,
                  progress=None, batch_size=128)
    assert s.rows == 500 and s.table == "ev"
    assert sorted(pq.read_table(out).column("id").to_pylist()) == list(range(500))
    lines[300] = '{"id": 300, broken'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputRowError) as info:
        load_file(bad, f"file://{out}?format=parquet", table=None, workers=2, key=None,
                  progress=None, batch_size=128)
    assert f"{bad} line 301: invalid JSON" in str(info.value) and info.value.row == 299


def test_parquet_to_postgres_with_key_is_idempotent(tmp_path: Path) -> None:
    psycopg = pytest.importorskip("psycopg")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    try:
        conn = psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    table = f"wl_{uuid.uuid4().hex[:10]}"
    n = 3000
    data = pa.table({
        "id": pa.array(range(n), pa.int32()),
        "price": pa.array([decimal.Decimal(i) / 100 for i in range(n)], pa.decimal128(10, 2)),
        "at": pa.array([dt.datetime(2024, 1, 1, tzinfo=dt.UTC)] * n, pa.timestamp("ms", "UTC")),
        "tags": pa.array([[i, i + 1] for i in range(n)], pa.list_(pa.int64())),
        "maybe": pa.array([None] * n, pa.string()),
    })
    src = tmp_path / "prices.parquet"
    pq.write_table(data, src, row_group_size=700)
    try:
        prog = Recorder()
        s = load_file(src, PG_URL, table=table, workers=3, key="id", progress=prog,
                      batch_size=1000)
        assert s.rows == n and prog.total == n and prog.done == n
        rerun = load_file(src, PG_URL, table=table, workers=3, key="id", progress=None)
        assert (rerun.rows, rerun.skipped_batches) == (0, 3)  # same load id: ledger skips
        other = load_file(src, PG_URL, table=table, workers=3, key="id", progress=None,
                          run_id="another-load")
        assert other.rows == n  # a new load id: every row upserted again, none duplicated
        assert conn.execute(f"SELECT count(*), count(DISTINCT id) FROM {table}").fetchone() == \
            (n, n)
        got = conn.execute(f"SELECT price, at, tags FROM {table} WHERE id = 250").fetchone()
        assert got == (2.5, dt.datetime(2024, 1, 1, tzinfo=dt.UTC), [250, 251])
        kinds = dict(conn.execute("SELECT column_name, data_type FROM information_schema.columns"
                                  " WHERE table_name = %s", (table,)).fetchall())
        assert kinds == {"id": "bigint", "price": "double precision",
                         "at": "timestamp with time zone", "tags": "jsonb", "maybe": "text"}
    finally:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute("DELETE FROM _fetcher_ledger WHERE target = %s", (table,))
        conn.close()


def test_input_errors_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_file(tmp_path / "missing.csv", "sqlite:///x.db", table=None, workers=1, key=None,
                  progress=None)
    other = tmp_path / "data.xlsx"
    other.write_bytes(b"")
    with pytest.raises(ConfigError, match="unknown input format"):
        load_file(other, "sqlite:///x.db", table=None, workers=1, key=None, progress=None)
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    with pytest.raises(ConfigError, match="cannot read"):
        load_file(fake, f"sqlite:///{tmp_path}/x.db", table=None, workers=1, key=None,
                  progress=None)


def test_empty_csv_loads_nothing(tmp_path: Path) -> None:
    src = tmp_path / "empty.csv"
    src.write_text("a,b\n", encoding="utf-8")
    s = load_file(src, f"sqlite:///{tmp_path}/e.db", table=None, workers=1, key=None,
                  progress=None)
    assert (s.rows, s.batches) == (0, 0)


def test_parquet_to_parquet_shards_keeps_nested_types_and_resumes(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    n = 5000
    src = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"id": pa.array(range(n), pa.int64()),
                             "tags": pa.array([[i % 5] for i in range(n)],
                                              pa.list_(pa.int16()))}), src, row_group_size=900)
    out = tmp_path / "lake"
    url = f"file://{out}?format=parquet"
    s = load_file(src, url, table=None, workers=2, key=None, progress=None, batch_size=1200)
    assert (s.rows, s.batches, s.table) == (n, 5, "nested")
    t = pq.read_table(out)
    assert t.schema.field("tags").type == pa.list_(pa.int16())
    assert sorted(t.column("id").to_pylist()) == list(range(n))
    assert [pq.read_metadata(p).num_rows for p in sorted(out.glob("nested-*.parquet"))] == \
        [1200, 1200, 1200, 1200, 200]
    for p in sorted(out.glob("nested-*.parquet"))[2:]:
        p.unlink()  # as if the run had died after two shards
    again = load_file(src, url, table=None, workers=2, key=None, progress=None)
    assert (again.rows, again.skipped_batches) == (2600, 2)
    assert sorted(pq.read_table(out).column("id").to_pylist()) == list(range(n))
