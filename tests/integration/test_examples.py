"""Every script in examples/ runs from a fresh install at small sizes and does what its
docstring says (exit 0, the files, rows and lines it promises)."""

from __future__ import annotations

import ast
import csv
import os
import re
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
PG_URL = os.environ.get("FETCHER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TESTED = {"quickstart", "employee_efficiency", "dataframe_chunks", "hyperparameter_grid",
          "perfect_numbers", "images_to_sqlite", "etl_postgres"}


def _run(name: str, *args: str, cwd: Path, timeout: float = 120) -> str:
    """Run examples/NAME.py as a user would; its stdout (fails the test on exit != 0)."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    proc = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_every_example_is_documented_runnable_and_tested() -> None:
    scripts = {p.stem for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert scripts == TESTED, "each example needs a test here (and each test an example)"
    for name in scripts:
        source = (EXAMPLES / f"{name}.py").read_text()
        tree = ast.parse(source)
        doc = ast.get_docstring(tree)
        assert doc and len(doc.splitlines()) >= 3, f"{name}: say what it shows"
        assert 'if __name__ == "__main__":' in source, name
        assert "argparse" in source, f"{name}: size flags"


def test_employee_efficiency(tmp_path: Path) -> None:
    out = _run("employee_efficiency", "--employees", "15", "--days", "45", "--chunk-rows",
               "150", "--workers", "2", "--out", str(tmp_path), cwd=tmp_path)
    assert "matches pandas groupby().mean()" in out
    assert re.search(r"from \d+ chunks", out)
    with (tmp_path / "efficiency.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["employee_id", "name", "department", "month", "avg_efficiency",
                             "days"]
    assert {r["employee_id"] for r in rows} == {str(i) for i in range(1, 16)}
    assert len({r["month"] for r in rows}) >= 2  # 45 working days span three months
    assert sum(int(r["days"]) for r in rows) == sum(1 for _ in
                                                    (tmp_path / "daily.csv").open()) - 1
    assert (tmp_path / "efficiency.png").read_bytes().startswith(PNG_MAGIC)


def test_dataframe_chunks(tmp_path: Path) -> None:
    out = _run("dataframe_chunks", "--rows", "20000", "--workers", "2", cwd=tmp_path)
    assert "results identical and in order" in out
    for name in ("vectorised", "row-wise"):
        assert re.search(rf"^{name}\s+\d+\.\d+s\s+\d+\.\d+s\s+(one call|chunks in processes)",
                         out, re.M), out


def test_hyperparameter_grid(tmp_path: Path) -> None:
    out = _run("hyperparameter_grid", "--rows", "600", "--workers", "2", cwd=tmp_path)
    ways = ["loop", "fetcher parallel_map", "multiprocessing starmap"]
    try:
        import joblib  # noqa: F401

        ways.append("joblib Parallel/delayed")
    except ImportError:
        assert "joblib not installed" in out
    for way in ways:
        assert re.search(rf"^\s+{re.escape(way)}\s+\d+\.\d+ s\s+\d+\.\d+x\s+same scores$", out,
                         re.M), out
    assert re.search(r"best: learning_rate=[\d.]+, l2=[\d.e-]+, epochs=\d+ -> validation "
                     r"accuracy 0\.\d+", out)


def test_perfect_numbers(tmp_path: Path) -> None:
    out = _run("perfect_numbers", "--limit", "600", "--per-process", "30", "--workers", "2",
               cwd=tmp_path)
    assert "perfect numbers below 600: [6, 28, 496]" in out
    assert "same answer three ways" in out
    assert re.search(r"process per number\s+\d+\.\d+ s\s+\(estimated", out)


def test_images_to_sqlite(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    out = _run("images_to_sqlite", "--images", "9", "--size", "320", "--threads", "4",
               "--processes", "2", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert "downloads table: 9 rows with status ok" in out
    with sqlite3.connect(tmp_path / "out" / "images.db") as conn:
        rows = conn.execute("SELECT url, status, label, outputs FROM downloads").fetchall()
    assert len(rows) == 9 and {r[1] for r in rows} == {"ok"}
    assert {r[2] for r in rows} == {"cat", "dog", "bird"}  # the CSV's own column
    thumbs = list((tmp_path / "out" / "files" / ".fetcher" / "derived").rglob("*.jpg"))
    assert len(thumbs) == 9


def test_etl_postgres_loads_queries_and_drops(tmp_path: Path) -> None:
    psycopg = pytest.importorskip("psycopg")
    try:
        psycopg.connect(PG_URL, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}: {exc}")
    table = f"etl_example_{uuid.uuid4().hex[:10]}"
    out = _run("etl_postgres", "--products", "40", "--dsn", PG_URL, "--table", table,
               "--threads", "4", "--drop", cwd=tmp_path)
    assert "fetched 40 documents" in out and f"40 rows in 1 batch(es) into {table}" in out
    cats = re.findall(r"^\s+(books|garden|kitchen|music|toys)\s+(\d+)\s", out, re.M)
    assert sorted(c for c, _ in cats) == ["books", "garden", "kitchen", "music", "toys"]
    assert sum(int(n) for _, n in cats) == 40
    with psycopg.connect(PG_URL) as conn:
        assert conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() == (None,)
        if conn.execute("SELECT to_regclass('_fetcher_ledger')").fetchone() != (None,):
            left = conn.execute("SELECT count(*) FROM _fetcher_ledger WHERE target = %s",
                                (table,)).fetchone()
            assert left == (0,)


def test_quickstart(tmp_path: Path) -> None:
    out = _run("quickstart", "--files", "20", "--size", "2000", "--out", str(tmp_path / "o"),
               cwd=tmp_path)
    assert '"ok": 20' in out and '"skipped": 20' in out
