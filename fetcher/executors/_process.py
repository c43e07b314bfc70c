"""The ``"process"`` backend: worker processes with a pipe each, and the warm-pool cache.

A worker killed by the OS is seen through its sentinel; the item it was running is
read from the shared-memory slot it updates per item (see ``_worker``).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import multiprocessing as mp
import multiprocessing.util  # registers its atexit hook before ours (LIFO order)
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as _mp_wait
from typing import Any

from ..errors import ConfigError
from . import _worker
from ._callables import _dump_callable, _hide_unimportable_main
from ._common import _PICKLE, _Event, _Task, split_unpicklable
from ._worker import _BOOT_MARK


def start_method() -> str:
    """The start method for worker processes: ``forkserver`` where available, else ``spawn``."""
    wanted = os.environ.get("FETCHER_START_METHOD", "").strip()
    methods = mp.get_all_start_methods()
    if wanted:
        if wanted not in methods:
            raise ConfigError(f"FETCHER_START_METHOD={wanted!r} is not one of {methods}")
        return wanted
    return "forkserver" if "forkserver" in methods else "spawn"


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class _Worker:
    __slots__ = ("abandoned", "conn", "fids", "mark", "proc", "slot", "task")

    def __init__(self, proc: Any, conn: Connection, slot: int, mark: memoryview) -> None:
        self.proc = proc
        self.conn = conn
        self.slot = slot
        self.mark = mark
        self.task: _Task | None = None
        self.abandoned = False
        self.fids: set[int] = set()


class _ProcessBackend:
    """Worker processes, each with its own pipe; at most one task per worker at a time.

    Not thread-safe: one owner drives it (``wake`` excepted). One task per worker
    means a worker is always reading when we write, so pipes cannot deadlock, and a
    dead worker's task is known exactly.
    """

    def __init__(self, workers: int, method: str) -> None:
        self.workers = workers
        self.method = method
        self.pid = os.getpid()
        self.broken = False
        self._ctx: Any = mp.get_context(method)
        self._alive_r, self._alive_w = self._ctx.Pipe(duplex=False)
        self._marks = self._ctx.RawArray("q", workers)
        self._marks_view = memoryview(self._marks).cast("B").cast("q")
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._payloads: dict[int, bytes] = {}
        self._events: list[_Event] = []
        self._ids = itertools.count()
        self._closed = False
        self._boot_failures = 0
        self._workers: list[_Worker] = []
        _LIVE.add(self)
        try:
            for slot in range(workers):
                self._workers.append(self._spawn(slot))
        except BaseException:
            self.terminate()
            raise

    # -- lifecycle
    def _spawn(self, slot: int) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker._worker_main, name=f"fetcher-worker-{slot}",
                                 args=(child_conn, self._marks, slot, self._alive_r))
        self._marks_view[slot] = _BOOT_MARK
        with _hide_unimportable_main():
            proc.start()
        child_conn.close()
        return _Worker(proc, parent_conn, slot, self._marks_view[slot:slot + 1])

    def close(self) -> None:
        """Stop idle workers politely; terminate busy ones."""
        if self._closed:
            return
        for w in self._workers:
            if w.task is None:
                with contextlib.suppress(OSError):
                    w.conn.send_bytes(pickle.dumps(("stop",)))
            else:
                w.proc.terminate()
        self._reap(deadline=time.monotonic() + 2.0)

    def terminate(self) -> None:
        """SIGTERM every worker, SIGKILL what is left after a second; release everything."""
        if self._closed:
            return
        for w in self._workers:
            if w.proc.is_alive():
                w.proc.terminate()
        self._reap(deadline=time.monotonic() + 1.0)

    def _reap(self, deadline: float) -> None:
        self._closed = True
        for w in self._workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
        for w in self._workers:
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(1.0)
        for w in self._workers:
            w.conn.close()
            with contextlib.suppress(ValueError):
                w.proc.close()
        self._alive_w.close()
        self._alive_r.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        _LIVE.discard(self)

    # -- functions
    def register(self, fn: Callable[[Any], Any], payload: bytes | None) -> int:
        fid = next(self._ids)
        self._payloads[fid] = payload if payload is not None else _dump_callable(fn)
        return fid

    def unregister(self, fid: int) -> None:
        self._payloads.pop(fid, None)

    # -- tasks
    def idle(self) -> int:
        return sum(1 for w in self._workers if w.task is None)

    def send(self, task: _Task) -> None:
        w = next(w for w in self._workers if w.task is None)
        try:
            data = pickle.dumps(("run", task.fid, task.items, task.stop), _PICKLE)
        except Exception:
            task = self._split_unpicklable(task)
            if not task.items:
                return
            data = pickle.dumps(("run", task.fid, task.items, task.stop), _PICKLE)
        w.task = task
        try:
            for fid in w.fids - self._payloads.keys():
                w.conn.send_bytes(pickle.dumps(("drop", fid)))
                w.fids.discard(fid)
            if task.fid not in w.fids:
                w.conn.send_bytes(pickle.dumps(("fn", task.fid, self._payloads[task.fid]),
                                               _PICKLE))
                w.fids.add(task.fid)
            w.conn.send_bytes(data)
        except OSError:
            self._on_death(w)

    def _split_unpicklable(self, task: _Task) -> _Task:
        return split_unpicklable(task, self._events, "a worker process")

    def wait(self, timeout: float | None) -> list[_Event]:
        if not self._events:
            try:
                self._wait(timeout)
            except KeyboardInterrupt:
                raise
            except BaseException:
                self.broken = True
                raise
        events, self._events = self._events, []
        return events

    def _wait(self, timeout: float | None) -> None:
        by_conn = {id(w.conn): w for w in self._workers if w.task is not None}
        by_sentinel = {w.proc.sentinel: w for w in self._workers}
        waitables: list[Any] = [self._wake_r]
        waitables += [w.conn for w in self._workers if w.task is not None]
        waitables += list(by_sentinel)
        for obj in _mp_wait(waitables, timeout):
            if isinstance(obj, int):
                if obj == self._wake_r:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                else:
                    self._on_death(by_sentinel[obj])
            else:
                w = by_conn[id(obj)]
                if w in self._workers and w.task is not None:
                    self._receive(w)

    def _receive(self, w: _Worker) -> bool:
        try:
            msg = pickle.loads(w.conn.recv_bytes())
        except (EOFError, OSError):
            self._on_death(w)
            return False
        task, w.task = w.task, None
        if w.abandoned or task is None:
            w.abandoned = False
            return True
        if msg[0] == "done":
            self._events.append(_Event("done", task, values=msg[1], errors=msg[2],
                                       elapsed=msg[3], pid=w.proc.pid))
        else:
            self._events.append(_Event("fnerr", task, detail=str(msg[1])))
        return True

    def _on_death(self, w: _Worker) -> None:
        if w not in self._workers:
            return
        idx = self._workers.index(w)
        try:
            while w.task is not None and w.conn.poll(0):
                # a complete result sent before dying still counts
                msg = pickle.loads(w.conn.recv_bytes())
                task, w.task = w.task, None
                if not w.abandoned and msg[0] == "done":
                    self._events.append(_Event("done", task, values=msg[1], errors=msg[2],
                                               elapsed=msg[3], pid=w.proc.pid))
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
        w.proc.join(1.0)
        pos = int(w.mark[0])
        if pos == _BOOT_MARK:
            self._boot_failures += 1
        else:
            self._boot_failures = 0
        if self._boot_failures >= 2:
            self.broken = True
            raise ConfigError(
                f"worker processes die while starting ({_exit_text(w.proc.exitcode)}); "
                f"their stderr says why. With the {self.method!r} start method each worker "
                f"imports the main module: guard the script's work with "
                f"`if __name__ == '__main__':`, and keep worker functions importable")
        if w.task is not None and not w.abandoned:
            self._events.append(_Event(
                "lost", w.task, pos=pos if 0 <= pos < len(w.task.items) else None,
                detail=f"worker process {w.proc.pid} {_exit_text(w.proc.exitcode)}",
                pid=w.proc.pid))
        w.conn.close()
        with contextlib.suppress(ValueError):
            w.proc.close()
        try:
            self._workers[idx] = self._spawn(w.slot)
        except BaseException:
            self._workers.pop(idx)
            self.broken = True
            raise

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def abandon(self) -> None:
        for w in self._workers:
            if w.task is not None:
                w.abandoned = True
        self._events = []


# --------------------------------------------------------------------------- pool cache

_LOCK = threading.Lock()
_IDLE: dict[tuple[str, int], _ProcessBackend] = {}
_LIVE: set[_ProcessBackend] = set()


def _acquire_process(workers: int) -> _ProcessBackend:
    method = start_method()
    with _LOCK:
        b = _IDLE.pop((method, workers), None)
    if b is not None and (b.pid != os.getpid() or b.broken):
        b = None  # inherited over fork, or damaged: never touch it
    return b if b is not None else _ProcessBackend(workers, method)


def _release_process(b: _ProcessBackend) -> None:
    if b.broken or b.pid != os.getpid():
        if b.pid == os.getpid():
            b.terminate()
        return
    with _LOCK:
        key = (b.method, b.workers)
        if key not in _IDLE:
            _IDLE[key] = b
            return
    b.close()


def shutdown_pools() -> None:
    """Stop every worker process parallel_map keeps warm (also run at interpreter exit)."""
    with _LOCK:
        idle = list(_IDLE.values())
        _IDLE.clear()
    for b in idle:
        if b.pid == os.getpid():
            b.close()
    for b in list(_LIVE):
        if b.pid == os.getpid():
            b.terminate()


atexit.register(shutdown_pools)
