"""Small database helpers shared by the writer tests."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` run on the SQLite file ``db`` (a fresh connection each time)."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()
