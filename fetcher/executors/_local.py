"""The backends that run in this process: ``"sequential"`` and ``"thread"``."""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ._common import _capture, _Err, _Event, _Task


def _run_chunk(fn: Callable[[Any], Any], items: list[Any], stop: bool
               ) -> tuple[list[Any], list[_Err], float]:
    """Run ``fn`` over ``items`` in this thread (thread and sequential backends)."""
    out: list[Any] = []
    errors: list[_Err] = []
    it = iter(items)
    t0 = time.perf_counter()
    while True:
        try:
            out.extend(map(fn, it))  # C loop; on error len(out) is the failing position
            break
        except Exception as exc:
            errors.append(_capture(exc, len(out), portable=False))
            out.append(None)
            if stop:
                break
    return out, errors, time.perf_counter() - t0


class _InProcessFns:
    """Function registry of the backends that run in this process (no pickling)."""

    _fns: dict[int, Callable[[Any], Any]]
    _ids: itertools.count[int]

    def register(self, fn: Callable[[Any], Any], payload: bytes | None) -> int:
        fid = next(self._ids)
        self._fns[fid] = fn
        return fid

    def unregister(self, fid: int) -> None:
        self._fns.pop(fid, None)


class _SequentialBackend(_InProcessFns):
    """Runs each task inline, in the calling thread."""

    broken = False

    def __init__(self) -> None:
        self.workers = 1
        self._fns: dict[int, Callable[[Any], Any]] = {}
        self._events: list[_Event] = []
        self._ids = itertools.count()

    def idle(self) -> int:
        return 0 if self._events else 1

    def send(self, task: _Task) -> None:
        values, errors, elapsed = _run_chunk(self._fns[task.fid], task.items, task.stop)
        self._events.append(_Event("done", task, values=values, errors=errors, elapsed=elapsed,
                                   pid=os.getpid()))

    def wait(self, timeout: float | None) -> list[_Event]:
        events, self._events = self._events, []
        return events

    def wake(self) -> None:
        pass

    def abandon(self) -> None:
        self._events = []

    def close(self) -> None:
        pass

    terminate = close


class _ThreadBackend(_InProcessFns):
    """Daemon threads fed from a queue; completions come back through a condition.

    Daemon threads (not ``ThreadPoolExecutor``, whose threads are joined at exit) so
    that Ctrl-C ends the program even while items are still running.
    """

    broken = False

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._fns: dict[int, Callable[[Any], Any]] = {}
        self._inbox: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._events: list[_Event] = []
        self._busy = 0
        self._woken = False
        self._ids = itertools.count()
        self._threads: list[threading.Thread] = []

    def idle(self) -> int:
        return self.workers - self._busy

    def send(self, task: _Task) -> None:
        self._busy += 1
        if len(self._threads) < min(self.workers, self._busy):
            t = threading.Thread(target=self._serve, name="fetcher-map", daemon=True)
            t.start()
            self._threads.append(t)
        self._inbox.put(task)

    def _serve(self) -> None:
        while True:
            task = self._inbox.get()
            if task is None:
                return
            ev: _Event
            try:
                values, errors, elapsed = _run_chunk(self._fns[task.fid], task.items, task.stop)
                ev = _Event("done", task, values=values, errors=errors, elapsed=elapsed,
                            pid=os.getpid())
            except BaseException as exc:  # SystemExit, KeyboardInterrupt from fn
                ev = _Event("crash", task, exc=exc)
            with self._cond:
                self._events.append(ev)
                self._cond.notify_all()

    def wait(self, timeout: float | None) -> list[_Event]:
        with self._cond:
            if not self._events and not self._woken:
                self._cond.wait(timeout)
            events, self._events = self._events, []
            self._woken = False
        self._busy -= len(events)
        return events

    def wake(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def abandon(self) -> None:
        with self._cond:
            self._events = []

    def close(self) -> None:
        # never blocks: after an early stop, abandoned chunks finish in the background
        for _ in self._threads:
            self._inbox.put(None)

    terminate = close
