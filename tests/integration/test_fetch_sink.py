"""`fetch(..., sink=...)` / `fetcher get --sink`: manifest records streamed into a datastore."""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fetcher import fetch
from fetcher.cli import app
from tests.httpserver import TestServer

PG = "postgresql://postgres@127.0.0.1:5432/test"


def test_sqlite_sink_gets_every_record_once_across_reruns(server: TestServer, dest: Path,
                                                          tmp_path: Path) -> None:
    urls = [server.add(f"/s{i}.txt", f"s{i}".encode()) for i in range(12)]
    csv = tmp_path / "list.csv"
    csv.write_text("url,label\n" + "".join(f"{u},L{i}\n" for i, u in enumerate(urls))
                   + server.url("/missing") + ",gone\n")
    db = tmp_path / "runs.db"
    report = fetch(csv, dest, sink=f"sqlite:///{db}", retries=0)
    assert report.sink is not None and report.sink["rows"] == 13
    again = fetch(csv, dest, sink=f"sqlite:///{db}", retries=0)
    assert again.counts["skipped"] == 12
    con = sqlite3.connect(db)
    rows = con.execute("select url, status, label, outputs from downloads").fetchall()
    con.close()
    assert len(rows) == 13  # upserted on url: the re-run replaced, never duplicated
    by_url = {r[0]: r for r in rows}
    assert by_url[urls[3]][1] == "skipped" and by_url[urls[3]][2] == "L3"
    assert by_url[server.url("/missing")][1] == "failed"
    assert json.loads(by_url[urls[0]][3]) == []


def test_cli_sink_postgresql(server: TestServer, dest: Path, tmp_path: Path) -> None:
    psycopg = pytest.importorskip("psycopg")
    try:
        conn = psycopg.connect(PG, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    table = f"dl_{uuid.uuid4().hex[:8]}"
    urls = [server.add(f"/p{i}", b"p" * i) for i in range(1, 8)]
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(urls) + "\n")
    try:
        res = CliRunner().invoke(app, ["get", str(lst), "-o", str(dest), "--quiet",
                                       "--sink", PG, "--sink-table", table])
        assert res.exit_code == 0, res.output
        rows = conn.execute(f'select url, bytes from "{table}" order by bytes').fetchall()
        assert [r[1] for r in rows] == list(range(1, 8))
    finally:
        conn.execute(f'drop table if exists "{table}"')
        conn.execute("delete from _fetcher_ledger where target = %s", (table,))
        conn.close()


def test_unreachable_sink_is_a_usage_error_before_downloading(server: TestServer, dest: Path,
                                                              tmp_path: Path) -> None:
    url = server.add("/x", b"x")
    lst = tmp_path / "urls.txt"
    lst.write_text(url + "\n")
    res = CliRunner().invoke(app, ["get", str(lst), "-o", str(dest), "--quiet",
                                   "--sink", "postgresql://nobody@127.0.0.1:1/none"])
    assert res.exit_code in (1, 2)
    assert "127.0.0.1:1" in res.stderr
    assert server.requests() == []
