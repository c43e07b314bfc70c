"""A writer process SIGKILLed mid-load, then re-run: no duplicates, no missing rows, no
partial shard under a final name. Real subprocesses, real SQLite / PostgreSQL / files."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
N = 12_000
BS = 500

# The child loads N rows; with a kill threshold it waits (in the producer, which is
# ahead of the workers) until that many rows are committed while more batches are
# queued and being written, then SIGKILLs itself: no cleanup, no atexit, no flush.
CHILD = textwrap.dedent("""
    import os, signal, sys, threading
    from fetcher.writers import ParallelWriter

    url, table, kill_after, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    N, BS = int(sys.argv[5]), int(sys.argv[6])

    class Committed:
        def __init__(self):
            self.n = 0
            self.reached = threading.Event()
        def start(self, total, *, unit="file", desc=""): pass
        def set_total(self, total): pass
        def close(self): pass
        def update(self, n=1, *, nbytes=0):
            self.n += n
            if kill_after and self.n >= kill_after:
                self.reached.set()

    progress = Committed()

    def records():
        for i in range(N):
            if kill_after and i == kill_after + 4 * BS:
                if not progress.reached.wait(30):
                    sys.exit(3)  # never got there: fail the test rather than hang
                os.kill(os.getpid(), signal.SIGKILL)
            yield {"id": i, "payload": "x" * 40, "grp": i % 7}

    opts = {"key": "id"} if mode == "key" else {"run_id": "kill-test"}
    with ParallelWriter(url, table=table, workers=2, batch_size=BS, progress=progress,
                        **opts) as w:
        w.write_many(records())
    print(w.close().as_dict())
""")


def run_child(url: str, table: str, kill_after: int, mode: str = "ledger") -> int:
    proc = subprocess.run([sys.executable, "-c", CHILD, url, table, str(kill_after), mode,
                           str(N), str(BS)], capture_output=True, text=True, timeout=90,
                          cwd=Path(__file__).resolve().parents[2])
    if kill_after == 0:
        assert proc.returncode == 0, proc.stderr
    return proc.returncode


def check_killed_then_complete(url: str, table: str, ids: Callable[[], list[int]],
                               mode: str = "ledger") -> None:
    code = run_child(url, table, kill_after=3 * BS, mode=mode)
    assert code == -signal.SIGKILL
    after_kill = ids()
    assert 3 * BS <= len(after_kill) < N  # it really died mid-load
    assert len(after_kill) == len(set(after_kill))
    if mode == "ledger":
        # Batches commit in order, each whole: what survived is a prefix of whole batches.
        assert len(after_kill) % BS == 0
        assert sorted(after_kill) == list(range(len(after_kill)))
    run_child(url, table, kill_after=0, mode=mode)
    final = ids()
    assert len(final) == N and sorted(final) == list(range(N))


def test_sqlite_killed_mid_load_then_rerun(tmp_path: Path) -> None:
    db = tmp_path / "k.db"

    def ids() -> list[int]:
        conn = sqlite3.connect(db)
        try:
            return [r[0] for r in conn.execute("SELECT id FROM t")]
        finally:
            conn.close()

    check_killed_then_complete(f"sqlite:///{db}", "t", ids)


def test_shards_killed_mid_load_then_rerun(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "shards"

    def ids() -> list[int]:
        got: list[int] = []
        for p in sorted(out.iterdir()):
            if p.name.startswith((".", "_")):
                continue
            # Every file under a final name is a complete shard of exactly one batch.
            t = pq.read_table(p)
            col = t.column("id").to_pylist()
            batch = int(p.stem.rsplit("-", 1)[1])
            assert col == list(range(batch * BS, min(N, (batch + 1) * BS)))
            got += col
        return got

    check_killed_then_complete(f"file://{out}?format=parquet", "t", ids)
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []  # the re-run removed the dead process's temporary shards


def _pg() -> Any:
    psycopg = pytest.importorskip("psycopg")
    try:
        return psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}: {exc}")


@pytest.mark.parametrize("mode", ["ledger", "key"])
def test_postgres_killed_mid_load_then_rerun(mode: str) -> None:
    conn = _pg()
    table = f"wk_{uuid.uuid4().hex[:10]}"

    def ids() -> list[int]:
        return [r[0] for r in conn.execute(f"SELECT id FROM {table}").fetchall()]

    try:
        check_killed_then_complete(PG_URL, table, ids, mode=mode)
        if mode == "ledger":
            ledger = conn.execute("SELECT count(*), count(DISTINCT batch) FROM _fetcher_ledger "
                                  "WHERE target = %s", (table,)).fetchone()
            assert ledger == (N // BS, N // BS)
        # The killed connections' transactions were rolled back by the server, not left open.
        assert conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                            "'fetcher-writer' AND state LIKE 'idle in transaction%%'"
                            ).fetchone() == (0,)
    finally:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute("DELETE FROM _fetcher_ledger WHERE target = %s", (table,))
        conn.close()
