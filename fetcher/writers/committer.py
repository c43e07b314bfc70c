"""Committer: the worker side of a ParallelWriter -- N threads that stage batches
concurrently and commit them strictly in the order they were dispatched.

Each worker takes ``(seq, batch)`` from a bounded queue, stages the batch with its own
BatchWriter, waits for its turn (every batch dispatched before it has committed) and
commits. The first failure stops the batches after it: they are rolled back, never
committed. Committing in order keeps the committed batches a prefix of the input.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import NoReturn

from ..errors import SinkError
from ..progress import Progress
from .base import Batch, BatchWriter, LoadPlan, Sink, sink_error

log = logging.getLogger(__name__)

_PUT_POLL_S = 0.1


class _Abandon(Exception):
    """An earlier batch failed (or the load was cancelled): roll this one back."""


class Committer:
    """Worker threads committing dispatched batches in order, and the first failure.

    ``failed_seq`` (read without the lock, as a cheap check) is the first failed
    dispatch number, None while everything succeeds. The counts are of the batches the
    workers handled: ``rows``/``batches`` committed, ``skipped_*`` found already
    committed by a concurrent run.
    """

    def __init__(self, sink: Sink, workers: int, progress: Progress) -> None:
        self.sink = sink
        self._nworkers = workers
        self._progress = progress
        self._cond = threading.Condition()
        self._seq = 0  # dispatched batches
        self._turn = 0  # next seq allowed to commit
        self.failed_seq: int | None = None
        self._errors: dict[int, SinkError] = {}
        self._cancel = False
        self._plan: LoadPlan | None = None
        # Memory bound: workers staging + this many queued + the one being filled.
        self.queue: queue.Queue[tuple[int, Batch] | None] = queue.Queue(
            maxsize=workers + 1)
        self._threads: list[threading.Thread] = []
        self.rows = 0
        self.batches = 0
        self.skipped_batches = 0
        self.skipped_rows = 0

    def start(self, plan: LoadPlan) -> None:
        """Start the worker threads, each with its own BatchWriter for ``plan``."""
        self._plan = plan
        for i in range(self._nworkers):
            t = threading.Thread(target=self._work, name=f"fetcher-writer-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def submit(self, batch: Batch) -> None:
        """Queue the batch as the next dispatch; blocks while the queue is full and
        raises the first SinkError as soon as a batch has failed."""
        item = (self._seq, batch)
        self._seq += 1
        while True:
            if self.failed_seq is not None:
                self._raise_first()
            try:
                self.queue.put(item, timeout=_PUT_POLL_S)
                return
            except queue.Full:
                if not any(t.is_alive() for t in self._threads):
                    self.record_error(-1, SinkError("all writer threads have stopped",
                                                    sink=self.sink.url, batch=batch.number))
                    self._raise_first()

    # ------------------------------------------------------------------ worker side
    def _work(self) -> None:
        assert self._plan is not None
        bw: BatchWriter | None = None
        try:
            bw = self.sink.writer(self._plan)
        except BaseException as exc:
            self.record_error(-1, sink_error(exc, sink=self.sink.url, batch=None))
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                seq, batch = item
                if bw is None or self._cancel or (
                        self.failed_seq is not None and seq > self.failed_seq):
                    continue
                try:
                    bw.stage(batch)
                    self._await_turn(seq)
                    fresh = bw.commit(batch)
                except _Abandon:
                    bw.rollback()
                    continue
                except BaseException as exc:
                    bw.rollback()
                    self.record_error(seq, sink_error(exc, sink=self.sink.url, batch=batch))
                    continue
                self._advance(batch, fresh)
        finally:
            if bw is not None:
                try:
                    bw.close()
                except Exception:
                    log.debug("closing a batch writer failed", exc_info=True)

    def _await_turn(self, seq: int) -> None:
        with self._cond:
            while self._turn != seq:
                if self._cancel or (self.failed_seq is not None and self.failed_seq < seq):
                    raise _Abandon
                self._cond.wait()
            if self._cancel:
                raise _Abandon

    def _advance(self, batch: Batch, fresh: bool) -> None:
        with self._cond:
            self._turn += 1
            if fresh:
                self.rows += batch.size
                self.batches += 1
            else:
                self.skipped_batches += 1
                self.skipped_rows += batch.size
            self._cond.notify_all()
        self._progress.update(batch.size)

    # ------------------------------------------------------------------ failures
    def record_error(self, seq: int, err: SinkError) -> None:
        """Record a failure of dispatch ``seq``; the batches after it will not commit."""
        with self._cond:
            # seq -1: a failure outside any dispatched batch (stops everything after now).
            key = seq if seq >= 0 else self._seq
            self._errors.setdefault(key, err)
            if self.failed_seq is None or key < self.failed_seq:
                self.failed_seq = key
            self._cond.notify_all()

    def first_error(self) -> SinkError | None:
        """The error of the first failed dispatch, None when nothing failed."""
        return self._errors[min(self._errors)] if self._errors else None

    def _raise_first(self) -> NoReturn:
        """Raise the first recorded error (call only once one is recorded)."""
        raise self._errors[min(self._errors)]

    # ------------------------------------------------------------------ stopping
    def cancel(self) -> None:
        """Let no further batch commit; staged ones are rolled back."""
        with self._cond:
            self._cancel = True
            self._cond.notify_all()

    def stop(self) -> None:
        """Let the workers finish the queued batches, then end and join them."""
        for _ in self._threads:
            self.queue.put(None)
        for t in self._threads:
            t.join()
