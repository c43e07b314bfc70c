"""ParallelWriter's own logic (batching, ordering, skipping, failure, backpressure),
against an in-memory sink whose batch writers take random time, so that without the
ordering logic batches would commit out of order."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from fetcher.errors import ConfigError, SinkError
from fetcher.writers import Batch, LedgerState, LoadPlan, ParallelWriter, Schema
from fetcher.writers.schema import extract


class MemorySink:
    """A sink keeping committed batches in a dict; ``fail_on`` makes a row id fail."""

    url = "memory://test"
    supports_key = False
    table: str | None = None

    def __init__(self, *, max_workers: int | None = None, fail_on: int | None = None,
                 committed: Mapping[int, int | None] | None = None, delay: float = 0.004,
                 block: threading.Event | None = None) -> None:
        self.max_workers = max_workers
        self.fail_on = fail_on
        self.batches: dict[int, list[dict[str, Any]]] = {}
        self.order: list[int] = []
        self.ledger: dict[tuple[str, int], int] = {
            ("r", n): c or 0 for n, c in (committed or {}).items()}
        self.lock = threading.Lock()
        self.delay = delay
        self.block = block
        self.prepared: list[LoadPlan] = []
        self.writers = 0

    def check(self) -> None:
        pass

    def default_batch_size(self, ncols: int) -> int:
        return 10

    def ledger_state(self, table: str, load_id: str) -> LedgerState:
        return LedgerState(batch_size=None, committed={
            n: c for (lid, n), c in self.ledger.items() if lid == load_id})

    def prepare(self, plan: LoadPlan) -> Schema:
        self.prepared.append(plan)
        return plan.schema

    def writer(self, plan: LoadPlan) -> MemoryWriter:
        with self.lock:
            self.writers += 1
        return MemoryWriter(self, plan)

    def close(self) -> None:
        pass


class MemoryWriter:
    def __init__(self, sink: MemorySink, plan: LoadPlan) -> None:
        self.sink = sink
        self.plan = plan
        self.staged: list[dict[str, Any]] | None = None
        self.rng = random.Random()

    def stage(self, batch: Batch) -> None:
        if self.sink.block is not None:
            self.sink.block.wait()
        time.sleep(self.rng.random() * self.sink.delay)
        extract(batch.rows, self.plan.schema.names, target="t")
        for r in batch.rows:
            if r.get("id") == self.sink.fail_on:
                raise SinkError("rejected", sink=self.sink.url, batch=batch.number,
                                row=batch.first_row + batch.rows.index(r))
        self.staged = list(batch.rows)

    def commit(self, batch: Batch) -> bool:
        assert self.staged is not None
        with self.sink.lock:
            if (self.plan.load_id, batch.number) in self.sink.ledger:
                return False
            self.sink.batches[batch.number] = self.staged
            self.sink.ledger[self.plan.load_id, batch.number] = len(self.staged)
            self.sink.order.append(batch.number)
        self.staged = None
        return True

    def rollback(self) -> None:
        self.staged = None

    def close(self) -> None:
        pass


def rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": i, "v": f"r{i}"} for i in range(start, start + n)]


def test_batches_are_deterministic_and_commit_in_order() -> None:
    sink = MemorySink()
    with ParallelWriter(sink, workers=4, batch_size=7, run_id="r") as w:
        w.write_many(rows(100))
    summary = w.close()
    assert summary.rows == 100 and summary.batches == 15 and summary.workers == 4
    assert sink.order == list(range(15))
    for n, batch in sink.batches.items():
        assert [r["id"] for r in batch] == list(range(n * 7, min(100, (n + 1) * 7)))


def test_committed_batches_are_skipped() -> None:
    sink = MemorySink(committed={0: 10, 1: 10, 3: 10})
    with ParallelWriter(sink, workers=2, run_id="r") as w:
        for r in rows(45):
            w.write(r)
    s = w.close()
    assert sorted(sink.batches) == [2, 4]
    assert (s.rows, s.batches, s.skipped_batches, s.skipped_rows) == (15, 2, 3, 30)


def test_ledger_row_count_mismatch_means_the_input_changed() -> None:
    sink = MemorySink(committed={0: 9})
    w = ParallelWriter(sink, workers=1, run_id="r")
    with pytest.raises(SinkError, match="input changed"):
        w.write_many(rows(10))
    w.abort()


def test_fresh_load_ignores_the_ledger() -> None:
    sink = MemorySink(committed={0: 10})
    with ParallelWriter(sink, workers=2) as w:
        w.write_many(rows(10))
    assert w.close().rows == 10


def test_failure_commits_exactly_the_batches_before_it() -> None:
    sink = MemorySink(fail_on=53, delay=0.01)
    w = ParallelWriter(sink, workers=4, batch_size=5, run_id="r")
    with pytest.raises(SinkError) as info, w:
        w.write_many(rows(200))
    err = info.value
    assert err.batch == 10 and err.row == 53 and "memory://test" in str(err)
    assert sorted(sink.batches) == list(range(10))  # a prefix; nothing after the bad batch


def test_write_raises_promptly_when_workers_failed_and_queue_is_full() -> None:
    sink = MemorySink(fail_on=0, delay=0)
    w = ParallelWriter(sink, workers=1, batch_size=1, run_id="r")
    t0 = time.monotonic()
    with pytest.raises(SinkError, match="rejected"):
        for r in rows(10_000):
            w.write(r)
    assert time.monotonic() - t0 < 5
    with pytest.raises(SinkError):
        w.close()


def test_backpressure_bounds_the_queue() -> None:
    gate = threading.Event()
    sink = MemorySink(block=gate)
    w = ParallelWriter(sink, workers=1, batch_size=1, run_id="r")
    done = threading.Event()

    def produce() -> None:
        w.write_many(rows(50))
        done.set()

    t = threading.Thread(target=produce)
    t.start()
    time.sleep(0.3)
    assert not done.is_set()  # blocked: 1 batch in the worker + a bounded queue
    assert w._commits.queue.qsize() <= w._commits.queue.maxsize
    gate.set()
    t.join(10)
    assert done.is_set()
    assert w.close().rows == 50


def test_many_producer_threads() -> None:
    sink = MemorySink(delay=0.001)
    w = ParallelWriter(sink, workers=3, batch_size=13)

    def produce(k: int) -> None:
        for r in rows(500, start=k * 500):
            w.write(r)

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = w.close()
    ids = sorted(r["id"] for b in sink.batches.values() for r in b)
    assert ids == list(range(4000)) and s.rows == 4000


def test_exception_in_body_does_not_flush_the_partial_batch() -> None:
    sink = MemorySink()
    with pytest.raises(RuntimeError), ParallelWriter(sink, workers=2, batch_size=10,
                                                     run_id="r") as w:
        w.write_many(rows(25))
        raise RuntimeError("producer broke")
    assert sorted(sink.batches) == [0, 1]  # the partial third batch is left for the re-run


def test_flush_interval_sends_short_batches() -> None:
    sink = MemorySink()
    with ParallelWriter(sink, workers=1, batch_size=1000, flush_interval=0.05) as w:
        w.write({"id": 1, "v": "a"})
        deadline = time.monotonic() + 5
        while not sink.batches and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sink.batches == {0: [{"id": 1, "v": "a"}]}
    assert w.close().rows == 1


def test_sink_max_workers_caps_threads_and_dataclasses_are_records() -> None:
    @dataclass
    class R:
        id: int
        v: str

    sink = MemorySink(max_workers=1)
    with ParallelWriter(sink, workers=8) as w:
        w.write_many(R(i, "x") for i in range(25))
    s = w.close()
    assert s.workers == 1 and sink.writers == 1 and s.rows == 25


def test_unknown_column_names_the_row() -> None:
    sink = MemorySink()
    w = ParallelWriter(sink, workers=1, batch_size=5, run_id="r")
    w.write_many(rows(7))
    w.write({"id": 7, "v": "x", "extra": 1})
    with pytest.raises(SinkError) as info:
        w.close()
    assert info.value.row == 7 and info.value.batch == 1 and "'extra'" in str(info.value)


def test_option_validation() -> None:
    with pytest.raises(ConfigError):
        ParallelWriter(MemorySink(), workers=0)
    with pytest.raises(ConfigError):
        ParallelWriter(MemorySink(), run_id="r", flush_interval=1.0)
    with pytest.raises(ConfigError, match="cannot upsert"):
        ParallelWriter(MemorySink(), key="id")
    with pytest.raises(ConfigError):
        ParallelWriter(MemorySink(), schema={"a": "nope"})
    w = ParallelWriter(MemorySink(), run_id="r")
    with pytest.raises(ConfigError):
        w.flush()
    w.close()


def test_close_is_idempotent_and_write_after_close_fails() -> None:
    w = ParallelWriter(MemorySink())
    w.write({"id": 1})
    s1 = w.close()
    assert w.close() is s1
    with pytest.raises(SinkError, match="closed"):
        w.write({"id": 2})
