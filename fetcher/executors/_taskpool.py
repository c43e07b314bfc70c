"""``TaskPool``: single-item futures over the local backends, with backpressure."""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Generic

from ..errors import CancelledError, ConfigError
from ._common import Mode, R, RemoteError, T, _Backend, _Chunk, _describe, _Event, _Task
from ._driver import _lost_error, _prepare, _task_error
from ._local import _SequentialBackend, _ThreadBackend
from ._process import _ProcessBackend, start_method


class TaskPool(Generic[T, R]):
    """Futures for single items over the parallel_map backends, with backpressure.

    ``submit(item)`` blocks while ``max_pending`` submitted items are unfinished, so a
    fast producer cannot queue unbounded work. Thread-safe. A failed item's future
    raises the original exception (with a note carrying the worker's traceback); an
    item whose worker process died raises ``WorkerLostError``; the pool goes on.
    ``close()`` waits for everything; ``close(cancel=True)`` (and leaving the ``with``
    block by an exception) terminates the workers and fails what is unfinished with
    ``fetcher.errors.CancelledError``.
    """

    def __init__(self, fn: Callable[[T], R], *, mode: Mode = "process",
                 workers: int | None = None, max_pending: int | None = None) -> None:
        if mode == "dask":
            raise ConfigError("TaskPool runs on local workers only; use parallel_map(mode='dask')")
        n, payload = _prepare(fn, mode, workers, 1, "collect")
        if max_pending is not None and max_pending < 1:
            raise ConfigError(f"max_pending must be positive, got {max_pending!r}")
        self.workers = n
        self.max_pending = max_pending if max_pending is not None else 2 * n
        self._fn = fn
        self._backend: _Backend = (_ProcessBackend(n, start_method()) if mode == "process"
                                   else _ThreadBackend(n) if mode == "thread"
                                   else _SequentialBackend())
        self._fid = self._backend.register(fn, payload)
        self._slots = threading.Semaphore(self.max_pending)
        self._lock = threading.Lock()
        self._queue: deque[_Task] = deque()
        self._inflight: set[_Task] = set()
        self._closing = False
        self._cancel = False
        self._failed: BaseException | None = None
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="fetcher-taskpool",
                                        daemon=True)
        self._thread.start()

    def submit(self, item: T) -> Future[R]:
        """Queue ``item``; blocks while ``max_pending`` items are unfinished."""
        self._check_open()
        self._slots.acquire()
        fut: Future[R] = Future()
        chunk = _Chunk(next(self._seq), [item])
        chunk.extra = fut
        with self._lock:
            try:
                self._check_open()
            except BaseException:
                self._slots.release()
                raise
            self._queue.append(_Task(chunk, None, self._fid, False))
        self._backend.wake()
        return fut

    def _check_open(self) -> None:
        if self._failed is not None:
            raise RuntimeError(f"the task pool failed: {self._failed}") from self._failed
        if self._closing:
            raise RuntimeError("the task pool is closed")

    def _resolve(self, task: _Task, *, value: Any = None,
                 exc: BaseException | None = None) -> None:
        fut: Future[Any] = task.chunk.extra
        self._inflight.discard(task)
        if not fut.done():
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(value)
        self._slots.release()

    def _loop(self) -> None:
        backend = self._backend
        try:
            while True:
                with self._lock:
                    if self._cancel:
                        break
                    ready: list[_Task] = []
                    while self._queue and len(ready) < backend.idle():
                        ready.append(self._queue.popleft())
                    finished = self._closing and not self._queue
                for task in ready:
                    fut: Future[Any] = task.chunk.extra
                    if task.lost == 0 and not fut.set_running_or_notify_cancel():
                        self._slots.release()  # cancelled by the caller before it ran
                        continue
                    self._inflight.add(task)
                    backend.send(task)
                if finished and not self._inflight:
                    break
                for ev in backend.wait(None):
                    self._handle(ev)
        except BaseException as exc:  # the backend failed (workers cannot start, ...)
            with self._lock:
                self._failed = exc
            self._fail_all(exc)
            backend.terminate()
            return
        if self._cancel:
            backend.terminate()
            self._fail_all(CancelledError("the task pool was shut down before this item ran"))
        else:
            backend.close()

    def _handle(self, ev: _Event) -> None:
        task = ev.task
        if ev.kind == "done":
            if ev.errors:
                te = _task_error(task, ev.errors[0], ev.pid)
                orig = te.original
                if orig is not None and not isinstance(orig, RemoteError):
                    if orig.__traceback__ is None and te.traceback_text:
                        orig.add_note("[fetcher] traceback in the worker:\n"
                                      + te.traceback_text.rstrip())
                    self._resolve(task, exc=orig)
                else:
                    self._resolve(task, exc=te)
            else:
                self._resolve(task, value=(ev.values or [None])[0])
        elif ev.kind == "lost":
            if ev.pos is not None or task.lost >= 1:
                self._resolve(task, exc=_lost_error(task, 0, ev.detail))
            else:
                task.lost += 1
                self._inflight.discard(task)
                with self._lock:
                    self._queue.appendleft(task)
        elif ev.kind == "fnerr":
            self._resolve(task, exc=ConfigError(
                f"{_describe(self._fn)} could not be loaded in a worker process:\n{ev.detail}"))
        else:
            self._resolve(task, exc=ev.exc)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            pending = list(self._queue) + list(self._inflight)
            self._queue.clear()
        for task in pending:
            self._resolve(task, exc=exc)

    def close(self, *, cancel: bool = False) -> None:
        """Finish all submitted items (or, with ``cancel``, stop now) and stop the workers."""
        with self._lock:
            self._closing = True
            self._cancel = self._cancel or cancel
        self._backend.wake()
        self._thread.join()

    def __enter__(self) -> TaskPool[T, R]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(cancel=exc_type is not None)
