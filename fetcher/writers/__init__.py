"""Parallel, exactly-once loads into datastores.

::

    from fetcher.writers import ParallelWriter

    with ParallelWriter("postgresql://postgres@127.0.0.1/test", table="events",
                        workers=4, run_id="events-2024-06-01") as w:
        for rec in records:          # dicts or dataclasses, from any thread
            w.write(rec)
    print(w.close().as_dict())       # rows, batches, skipped_batches, seconds, ...

``write_arrow(table)`` feeds ``pyarrow`` tables instead of records (shard sinks write them
as they are; database sinks convert per batch in the workers).

Sinks (``open_sink(url)``): ``sqlite:///rel.db`` / ``sqlite:////abs.db`` (one writer
connection, WAL, busy timeout), ``postgresql://user@host[:port]/db`` (binary or text COPY,
one connection per worker), ``file:///abs/dir?format=jsonl|csv|parquet`` (one shard per
batch, temp name + fsync + rename).

Exactly once
------------
Rows are cut into batches in the order they are written: batch *n* is rows
``[n*batch_size, (n+1)*batch_size)``. Each batch is committed atomically together with
its ledger entry ``(load_id, n)`` -- a row in ``_fetcher_ledger`` in the same database
transaction, or, for shards, the rename of the shard to its deterministic final name --
and batches commit strictly in order, so the committed part of a load is always a
prefix of the input. A re-run with the same load id skips the batches the ledger shows
and writes the rest; the batch size of the first run is reused.

The load id:

* ``fetcher write INPUT`` / :func:`load_file`: ``file:<table>:<absolute input path>``
  (:func:`load_id_for`). Re-running after a crash or a bad row (fixed in place or
  deleted) continues after the committed prefix. Dropping the target table voids its
  ledger entries; a different file path or table is a different load.
* Streaming (:class:`ParallelWriter` directly): ``run_id=...`` when the caller can replay
  the same records in the same order (one producer thread); otherwise each writer gets a
  fresh id, and ``key="column"`` makes the load idempotent instead: every batch is an
  upsert (``INSERT ... ON CONFLICT (key) DO UPDATE``), so replaying records changes
  nothing. ``key`` needs a database sink (shards cannot upsert).

Errors are :class:`fetcher.errors.SinkError` naming the sink (password redacted), the
batch and, when known, the row (its index in the input; load_file adds the file and
line). :class:`InputRowError` (a SinkError) is a bad row in an input file.
"""

from __future__ import annotations

from .base import (
    Batch,
    BatchWriter,
    LedgerState,
    LoadPlan,
    Sink,
    WriteSummary,
    open_sink,
    redact_url,
)
from .load import InputRowError, default_table, load_file, load_id_for
from .parallel import ParallelWriter
from .schema import TYPES, Column, Schema

MANIFEST_SCHEMA: dict[str, str] = {
    "url": "text", "path": "text", "status": "text", "bytes": "int", "sha256": "text",
    "http_status": "int", "attempts": "int", "elapsed_s": "float", "error_type": "text",
    "error": "text", "outputs": "json",
}
"""Column types of a manifest record (``Result.record()``), for ``schema=`` so that a
first batch with only ``None`` in a column still gets the right type."""

__all__ = [
    "MANIFEST_SCHEMA",
    "TYPES",
    "Batch",
    "BatchWriter",
    "Column",
    "InputRowError",
    "LedgerState",
    "LoadPlan",
    "ParallelWriter",
    "Schema",
    "Sink",
    "WriteSummary",
    "default_table",
    "load_file",
    "load_id_for",
    "open_sink",
    "redact_url",
]
