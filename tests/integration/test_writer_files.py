"""ParallelWriter into directories of shards (JSONL, CSV, Parquet) on the real filesystem."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pytest

from fetcher.errors import ConfigError, SinkError
from fetcher.writers import ParallelWriter, open_sink

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def records(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": i, "name": f"n{i}", "score": i / 2, "ok": i % 2 == 0,
             "at": dt.datetime(2024, 1, 1) + dt.timedelta(seconds=i),
             "day": dt.date(2024, 1, 1), "tags": [i, "x"], "note": None if i % 2 else "y"}
            for i in range(start, start + n)]


def shards(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if not p.name.startswith((".", "_")))


def test_parquet_round_trip_is_a_dataset(tmp_path: Path) -> None:
    out = tmp_path / "pq"
    with ParallelWriter(f"file://{out}?format=parquet", table="events", workers=3,
                        batch_size=400) as w:
        w.write_many(records(1900))
    s = w.close()
    assert (s.rows, s.batches) == (1900, 5)
    names = shards(out)
    assert len(names) == 5 and all(n.startswith("events-") and n.endswith(".parquet")
                                   for n in names)
    table = pq.read_table(out)  # bookkeeping (_fetcher/) is ignored by the dataset reader
    assert table.num_rows == 1900
    assert sorted(table.column("id").to_pylist()) == list(range(1900))
    assert table.schema.field("at").type == pa.timestamp("us")
    assert table.schema.field("day").type == pa.date32()
    row = table.filter(pa.compute.equal(table.column("id"), 3)).to_pylist()[0]
    assert row["tags"] == '[3,"x"]' and row["ok"] is False and row["note"] is None
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_jsonl_and_csv_shards(tmp_path: Path) -> None:
    for fmt in ("jsonl", "csv"):
        out = tmp_path / fmt
        with ParallelWriter(f"file://{out}?format={fmt}", table="t", batch_size=30) as w:
            w.write_many(records(70))
        assert w.close().batches == 3
        files = [out / n for n in shards(out)]
        assert [f.suffix for f in files] == [f".{fmt}"] * 3
        if fmt == "jsonl":
            rows = [json.loads(line) for f in files for line in f.read_text().splitlines()]
            assert rows[5] == {"id": 5, "name": "n5", "score": 2.5, "ok": False,
                               "at": "2024-01-01T00:00:05", "day": "2024-01-01",
                               "tags": [5, "x"], "note": None}
        else:
            rows = [r for f in files for r in csv.DictReader(f.open(newline=""))]
            assert rows[4] == {"id": "4", "name": "n4", "score": "2.0", "ok": "true",
                               "at": "2024-01-01 00:00:04", "day": "2024-01-01",
                               "tags": '[4,"x"]', "note": "y"}
        assert len(rows) == 70


def test_rerun_skips_committed_shards_and_replay_replaces(tmp_path: Path) -> None:
    out = tmp_path / "s"
    url = f"file://{out}?format=parquet"
    data = records(250)
    with pytest.raises(RuntimeError), ParallelWriter(url, table="t", batch_size=100,
                                                     run_id="r1") as w:
        w.write_many(data[:150])
        raise RuntimeError("crash")
    assert len(shards(out)) == 1
    first = out / shards(out)[0]
    mtime = first.stat().st_mtime_ns
    with ParallelWriter(url, table="t", run_id="r1") as w2:
        w2.write_many(data)
    s = w2.close()
    assert (s.rows, s.skipped_batches) == (150, 1)
    assert first.stat().st_mtime_ns == mtime  # the committed shard was not rewritten
    assert pq.read_table(out).num_rows == 250
    # A replay of the same batch with the ledger ignored (a concurrent run, say) replaces
    # the shard under its deterministic name instead of adding a second one.
    sink = open_sink(url, table="t")
    from fetcher.writers import Batch, LoadPlan
    from fetcher.writers.schema import infer_schema
    plan = LoadPlan("t", infer_schema(data[:100]), None, "r1", 100)
    bw = sink.writer(plan)
    bw.stage(Batch(0, 0, data[:100]))
    assert bw.commit(Batch(0, 0, data[:100])) is False
    assert len(shards(out)) == 3 and pq.read_table(out).num_rows == 250


def test_bad_value_names_row_and_nothing_partial_remains(tmp_path: Path) -> None:
    out = tmp_path / "bad"
    data = records(100)
    data[77]["score"] = "high"
    w = ParallelWriter(f"file://{out}?format=parquet", table="t", batch_size=25, workers=2,
                       run_id="r")
    with pytest.raises(SinkError) as info, w:
        w.write_many(data)
    assert info.value.batch == 3 and info.value.row == 77 and "'score'" in str(info.value)
    assert len(shards(out)) == 3
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_text_column_coerces_other_values(tmp_path: Path) -> None:
    out = tmp_path / "coerce"
    with ParallelWriter(f"file://{out}?format=parquet", table="t", batch_size=5,
                        schema={"v": "text"}) as w:
        w.write_many([{"v": "a"}, {"v": 5}, {"v": dt.date(2024, 1, 2)}, {"v": None}])
    w.close()
    assert pq.read_table(out).column("v").to_pylist() == ["a", "5", "2024-01-02", None]


def test_key_is_refused_for_shards(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot upsert"):
        ParallelWriter(f"file://{tmp_path}/k?format=jsonl", key="id")


def test_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SinkError) as info:
        ParallelWriter(f"file://{blocker}/sub?format=csv")
    assert "not writable" in str(info.value) and str(blocker) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(SinkError, match="not writable"):
            ParallelWriter(f"file://{ro}?format=jsonl")
    finally:
        ro.chmod(0o700)


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "stale"
    url = f"file://{out}?format=jsonl"
    with ParallelWriter(url, table="t", run_id="r", batch_size=10) as w:
        w.write_many(records(10))
    w.close()
    final = shards(out)[0]
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    stale = out / f".{final.replace('000000', '000001')}.{dead_pid}.1.tmp"
    stale.write_text("half a shard")
    alive = out / f".{final.replace('000000', '000002')}.{os.getpid()}.1.tmp"
    alive.write_text("someone else's shard in progress")
    with ParallelWriter(url, table="t", run_id="r") as w:
        w.write_many(records(20))
    w.close()
    assert not stale.exists() and alive.exists()


def test_write_arrow_slices_exact_batches_and_keeps_arrow_types(tmp_path: Path) -> None:
    out = tmp_path / "arrow"
    pieces = [pa.table({"id": pa.array(range(s, s + n), pa.int32()),
                        "tags": pa.array([[i] for i in range(s, s + n)], pa.list_(pa.int64()))})
              for s, n in ((0, 130), (130, 7), (137, 263))]
    with ParallelWriter(f"file://{out}?format=parquet", table="a", batch_size=100,
                        workers=2, run_id="arrow") as w:
        for p in pieces:
            w.write_arrow(p)
        with pytest.raises(ConfigError, match="not both"):
            w.write({"id": 1})
    s = w.close()
    assert (s.rows, s.batches) == (400, 4)
    files = [out / n for n in shards(out)]
    assert [pq.read_metadata(f).num_rows for f in files] == [100, 100, 100, 100]
    t = pq.read_table(out)
    assert t.schema.field("id").type == pa.int32()
    assert t.schema.field("tags").type == pa.list_(pa.int64())
    assert sorted(t.column("id").to_pylist()) == list(range(400))
    # the same Arrow load re-run: every batch is in the ledger
    with ParallelWriter(f"file://{out}?format=parquet", table="a", workers=2,
                        run_id="arrow") as w:
        for p in pieces:
            w.write_arrow(p.to_batches()[0])
    assert (w.close().rows, w.close().skipped_batches) == (0, 4)


def test_write_arrow_into_sqlite_and_jsonl(tmp_path: Path) -> None:
    import sqlite3

    data = pa.table({"id": [1, 2, 3], "at": pa.array([dt.date(2024, 1, d) for d in (1, 2, 3)]),
                     "v": [None, "b", "c"]})
    with ParallelWriter(f"sqlite:///{tmp_path}/a.db", table="t", batch_size=2) as w:
        w.write_arrow(data)
    assert w.close().batches == 2
    conn = sqlite3.connect(tmp_path / "a.db")
    assert conn.execute("SELECT * FROM t ORDER BY id").fetchall() == [
        (1, "2024-01-01", None), (2, "2024-01-02", "b"), (3, "2024-01-03", "c")]
    conn.close()
    with ParallelWriter(f"file://{tmp_path}/j?format=jsonl", table="t") as w:
        w.write_arrow(data)
    w.close()
    (shard,) = [tmp_path / "j" / n for n in shards(tmp_path / "j")]
    assert json.loads(shard.read_text().splitlines()[1]) == {"id": 2, "at": "2024-01-02",
                                                            "v": "b"}
