"""ParallelWriter into real SQLite files: round trips, re-runs, key upserts, bad values,
and a concurrent writer holding the lock."""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fetcher.errors import ConfigError, SinkError
from fetcher.writers import MANIFEST_SCHEMA, ParallelWriter
from tests.dbutil import query


def records(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": i, "name": f"n{i}", "score": i / 4, "ok": i % 2 == 0,
             "at": dt.datetime(2024, 1, 1) + dt.timedelta(minutes=i),
             "day": dt.date(2024, 1, 1) + dt.timedelta(days=i % 30),
             "tags": ["a", str(i)], "note": None if i % 3 else "x"}
            for i in range(start, start + n)]


def test_round_trip_types(tmp_path: Path) -> None:
    db = tmp_path / "out.db"
    with ParallelWriter(f"sqlite:///{db}", table="t", workers=4, batch_size=100) as w:
        w.write_many(records(1050))
    s = w.close()
    assert (s.rows, s.batches, s.workers) == (1050, 11, 1)
    assert query(db, "SELECT count(*), count(DISTINCT id) FROM t") == [(1050, 1050)]
    row = query(db, "SELECT * FROM t WHERE id = 3")[0]
    assert row == (3, "n3", 0.75, 0, "2024-01-01 00:03:00", "2024-01-04", '["a","3"]', "x")
    assert query(db, "PRAGMA journal_mode") == [("wal",)]
    ledger = query(db, "SELECT batch, first_row, rows FROM _fetcher_ledger ORDER BY batch")
    assert ledger[0] == (0, 0, 100) and ledger[-1] == (10, 1000, 50)


def test_relative_url_is_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with ParallelWriter("sqlite:///rel.db", table="t") as w:
        w.write({"a": 1})
    assert query(tmp_path / "rel.db", "SELECT a FROM t") == [(1,)]


def test_crash_then_rerun_completes_without_duplicates(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    data = records(500)
    with pytest.raises(RuntimeError), ParallelWriter(url, table="t", batch_size=100,
                                                     run_id="load-1") as w:
        w.write_many(data[:250])
        raise RuntimeError("crash")  # rows 200..249 are a partial batch: not written
    assert query(f"{tmp_path}/x.db", "SELECT count(*) FROM t") == [(200,)]
    with ParallelWriter(url, table="t", run_id="load-1") as w2:
        w2.write_many(data)
    s = w2.close()
    assert (s.rows, s.batches, s.skipped_batches, s.skipped_rows) == (300, 3, 2, 200)
    assert query(f"{tmp_path}/x.db", "SELECT count(*), count(DISTINCT id), min(id), max(id) "
                                     "FROM t") == [(500, 500, 0, 499)]


def test_rerun_with_a_different_batch_size_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    with ParallelWriter(url, table="t", batch_size=10, run_id="r") as w:
        w.write_many(records(20))
    with pytest.raises(ConfigError, match="batch_size=10"):
        ParallelWriter(url, table="t", batch_size=7, run_id="r")
    with ParallelWriter(url, table="t", run_id="r") as w2:  # adopts 10
        w2.write_many(records(30))
    assert w2.batch_size == 10 and w2.close().rows == 10


def test_dropping_the_table_voids_its_ledger(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    for _ in range(2):
        with ParallelWriter(f"sqlite:///{db}", table="t", batch_size=10, run_id="r") as w:
            w.write_many(records(25))
        assert w.close().rows == 25
        sqlite3.connect(db).execute("DROP TABLE t").connection.close()


def test_key_upsert_is_idempotent(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    url = f"sqlite:///{db}"
    for _ in range(2):
        with ParallelWriter(url, table="dl", key="url", schema=MANIFEST_SCHEMA) as w:
            for i in range(300):
                w.write({"url": f"http://h/{i}", "path": f"{i}.bin", "status": "ok",
                         "bytes": i, "sha256": None, "http_status": 200, "attempts": 1,
                         "elapsed_s": 0.1, "error_type": None, "error": None,
                         "outputs": [f"d/{i}.png"], "label": "x"})
        w.close()
    with ParallelWriter(url, table="dl", key="url") as w:  # a later state wins
        w.write({"url": "http://h/1", "status": "failed", "error": "boom", "outputs": []})
        w.write({"url": "http://h/1", "status": "ok", "error": None, "outputs": ["z"]})
    w.close()
    assert query(db, "SELECT count(*), count(DISTINCT url) FROM dl") == [(300, 300)]
    assert query(db, "SELECT status, outputs, bytes FROM dl WHERE url = 'http://h/1'") == [
        ("ok", '["z"]', None)]


def test_null_key_is_rejected_with_its_row(tmp_path: Path) -> None:
    w = ParallelWriter(f"sqlite:///{tmp_path}/k.db", table="t", key="id", batch_size=10)
    w.write_many([{"id": i} for i in range(15)] + [{"id": None}])
    with pytest.raises(SinkError) as info:
        w.close()
    assert info.value.row == 15 and info.value.batch == 1 and "null" in str(info.value)


def test_value_the_table_rejects_names_the_row_and_rerun_continues(tmp_path: Path) -> None:
    db = tmp_path / "bad.db"
    url = f"sqlite:///{db}"
    data = records(95)
    data[63]["id"] = "not-a-number"  # STRICT INTEGER column rejects it
    w = ParallelWriter(url, table="t", batch_size=10, run_id="r", workers=2)
    with pytest.raises(SinkError) as info, w:
        w.write_many(data)
    err = info.value
    assert err.batch == 6 and err.row == 63 and url in str(err)
    assert "INTEGER" in str(err) or "integer" in str(err).lower()
    assert query(db, "SELECT count(*), max(id) FROM t") == [(60, 59)]
    data[63]["id"] = 63
    with ParallelWriter(url, table="t", run_id="r") as w2:
        w2.write_many(data)
    assert w2.close().skipped_batches == 6
    assert query(db, "SELECT count(*), count(DISTINCT id) FROM t") == [(95, 95)]


def test_waits_for_another_writer_instead_of_database_is_locked(tmp_path: Path) -> None:
    db = tmp_path / "busy.db"
    with ParallelWriter(f"sqlite:///{db}", table="t") as w:
        w.write({"id": -1})
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock
    other.execute("INSERT INTO t VALUES (-2)")
    release = threading.Timer(1.5, lambda: other.execute("COMMIT"))
    release.start()
    t0 = time.monotonic()
    with ParallelWriter(f"sqlite:///{db}", table="t", batch_size=50) as w:
        w.write_many({"id": i} for i in range(200))
    assert w.close().rows == 200
    assert time.monotonic() - t0 >= 1.0  # it waited for the lock
    release.join()
    other.close()
    assert query(db, "SELECT count(*) FROM t") == [(202,)]


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SinkError, match="does not exist"):
        ParallelWriter(f"sqlite:///{tmp_path}/nope/x.db")
