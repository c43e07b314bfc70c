"""``parallel_map`` / ``parallel_imap`` over sequential, thread and process backends.

One driver, three backends (``mode``):

``"process"``  worker processes started explicitly with ``forkserver`` where the
               platform has it (safe when the parent runs threads; Python 3.14's
               default on Linux), else ``spawn``. Override with the environment
               variable ``FETCHER_START_METHOD``. The pool is pre-warmed and reused
               between calls (one idle pool per worker count; ``shutdown_pools()``
               or interpreter exit stops it).
``"thread"``   daemon threads (so Ctrl-C never waits for them); for I/O-bound or
               GIL-releasing work.
``"sequential"`` runs in the calling thread; for debugging and tiny inputs.
``"dask"``     each chunk is a task on a Dask cluster (``address=`` a scheduler address
               or a ``distributed.Client``; None: a LocalCluster); ``fetcher.cluster``.

Behaviour common to every backend:

* Input is consumed lazily: chunks are cut from the iterator only when a worker is
  free, fewer than ``4 * workers`` chunks are open (dispatched, not yet returned)
  and fewer than 524,288 items are open, so an infinite generator works and memory
  stays flat (about 40 MiB for small items, whatever the input's length).
* ``chunksize="auto"`` starts at one item per chunk and, from the worker-measured
  time per item, grows (at most doubling per finished chunk) towards chunks of
  about 20 ms, capped at 65,536 items (less with many workers, so each can have two
  chunks within the open-item bound). Tiny tasks then cost well under a microsecond
  of overhead each; slow tasks stay one per chunk.
* ``ordered=True`` yields results in input order; ``False`` as chunks complete.
* ``progress`` (a ``fetcher.progress.Progress``) gets ``start(total, unit="item")``
  (``total`` None when the input has no length), ``update(n)`` per finished chunk,
  ``set_total(n)`` when an unsized input ends, and ``close()``.

Errors (``on_error``):

``"collect"``  the failed item's slot holds a ``fetcher.errors.TaskError`` with
               ``.item``, ``.index`` (position in the input), ``.original`` (the
               exception raised, same type; ``RemoteError`` stands in when it
               cannot be pickled back) and ``.traceback_text`` (the worker's
               formatted traceback).
``"raise"``    the first failure to arrive re-raises the *original* exception (so
               ``except ValueError`` works) with a note carrying the item index and
               the worker's traceback; nothing further is dispatched, a worker stops
               its chunk at the failing item, chunks already running finish in the
               background and are discarded (closing a ``parallel_imap`` early does
               the same; a next call on the warm pool may wait for those workers).

``TaskPool`` gives single-item futures over the same backends with a bound on
unfinished items (``submit`` blocks): the post-processing pipeline uses it.

A process worker killed by the OS (SIGKILL, OOM killer) is detected through its
sentinel: the item it was running (known from a shared-memory slot the worker
updates per item) gets a ``WorkerLostError``, the worker is replaced and the rest
of its chunk is run again -- so items of that chunk that had already finished run
a second time (their results died with the worker). Ctrl-C (``KeyboardInterrupt``
in the parent) terminates the workers (SIGTERM, then SIGKILL after 1 s) before it
propagates; workers also exit on their own when the parent dies.

Functions for process mode must be picklable. Top-level functions are sent by
reference; a lambda, a local function, or a function defined in an interactive
``__main__`` is sent by value with ``cloudpickle`` when that is installed, and
otherwise fails up front with a ``ConfigError`` naming the function.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import math
import multiprocessing as mp
import multiprocessing.util  # registers its atexit hook before ours (LIFO order)
import os
import pickle
import queue
import reprlib
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sized
from concurrent.futures import Future
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as _mp_wait
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Literal, NoReturn, Protocol, TypeVar, overload

from .errors import CancelledError, ConfigError, FetcherError, TaskError, WorkerLostError
from .progress import NullProgress, Progress

__all__ = [
    "RemoteError",
    "TaskPool",
    "parallel_imap",
    "parallel_map",
    "shutdown_pools",
    "start_method",
    "usable_cpu_count",
]

T = TypeVar("T")
R = TypeVar("R")
Mode = Literal["process", "thread", "sequential", "dask"]
OnError = Literal["collect", "raise"]

_MODES = ("process", "thread", "sequential", "dask")
_TARGET_CHUNK_S = 0.02
_MAX_CHUNK = 65_536
_MAX_OPEN_ITEMS = 1 << 19
"""Items taken from the input and not yet returned, at most (plus one chunk)."""
_PICKLE = pickle.HIGHEST_PROTOCOL
_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60


class RemoteError(FetcherError):
    """Stands in for a worker exception that could not be pickled back (``.type_name``)."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name


# --------------------------------------------------------------------------- helpers


def usable_cpu_count() -> int:
    """CPUs this process may run on: affinity mask, capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def start_method() -> str:
    """The start method for worker processes: ``forkserver`` where available, else ``spawn``."""
    wanted = os.environ.get("FETCHER_START_METHOD", "").strip()
    methods = mp.get_all_start_methods()
    if wanted:
        if wanted not in methods:
            raise ConfigError(f"FETCHER_START_METHOD={wanted!r} is not one of {methods}")
        return wanted
    return "forkserver" if "forkserver" in methods else "spawn"


def _describe(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', '?')}.{name}"


def _cloudpickle() -> Any:
    try:
        import cloudpickle  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError:
        return None
    return cloudpickle


def _dump_callable(fn: Callable[..., Any]) -> bytes:
    """Pickle ``fn`` for worker processes, or raise a ConfigError that says what to do."""
    if not callable(fn):
        raise ConfigError(f"parallel_map needs a callable, got {type(fn).__name__}")
    in_unimportable_main = (getattr(fn, "__module__", None) == "__main__"
                            and not _main_is_importable())
    problem: BaseException | None = None
    if not in_unimportable_main:
        try:
            return pickle.dumps(fn, _PICKLE)
        except Exception as exc:  # PicklingError, AttributeError, TypeError
            problem = exc
    cp = _cloudpickle()
    if cp is not None:
        try:
            return bytes(cp.dumps(fn, _PICKLE))
        except Exception as exc:
            problem = exc
    why = f" ({type(problem).__name__}: {problem})" if problem is not None else \
        " (it lives in an interactive __main__ that workers cannot import)"
    hint = "" if cp is not None else ", or install cloudpickle"
    raise ConfigError(
        f"{_describe(fn)} cannot be sent to worker processes{why}: define it at module "
        f"top level, or use mode='thread'{hint}"
    ) from None


def _main_is_importable() -> bool:
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    path = getattr(main, "__file__", None)
    return spec_name is not None or (path is not None and os.path.isfile(path))


_START_LOCK = threading.Lock()
_BOOT_MARK = -3
"""A worker's shared slot before it runs our code; >= 0 is the item it is running."""
_IDLE_MARK = -1


@contextlib.contextmanager
def _hide_unimportable_main() -> Iterator[None]:
    """Workers re-import the parent's ``__main__`` from its file; with ``python -``
    (``__file__ == "<stdin>"``) that fails and every worker dies while booting. Hide
    such a name while a worker starts, as if run with ``-c``."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or _main_is_importable():
        yield
        return
    with _START_LOCK:
        del main.__file__  # type: ignore[union-attr]
        try:
            yield
        finally:
            main.__file__ = path  # type: ignore[union-attr]


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


# An error captured in a worker: (position in task, exception or None, type name,
# message, formatted traceback).
_Err = tuple[int, "BaseException | None", str, str, str]


def _capture(exc: BaseException, pos: int, *, portable: bool) -> _Err:
    tb = exc.__traceback__
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next  # drop the runner's own frame
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    tname = f"{type(exc).__module__}.{type(exc).__qualname__}"
    obj: BaseException | None = exc
    if portable:
        try:
            pickle.loads(pickle.dumps(exc, _PICKLE))
        except Exception:
            obj = None
    return (pos, obj, tname, str(exc), text)


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


# --------------------------------------------------------------------------- worker side


def _watch_parent(alive: Connection) -> None:
    """Exit the worker as soon as the parent closes (or loses) its end of ``alive``."""
    try:
        alive.poll(None)
    finally:
        os._exit(1)


def _run_tracked(fn: Callable[[Any], Any], items: list[Any], mark: memoryview, stop: bool
                 ) -> tuple[list[Any], list[_Err]]:
    out: list[Any] = []
    errors: list[_Err] = []
    ap = out.append
    it = enumerate(items)
    i = 0
    while True:
        try:
            for i, x in it:
                mark[0] = i  # the parent reads this if we die
                ap(fn(x))
            break
        except BaseException as exc:  # a worker reports even SystemExit
            errors.append(_capture(exc, i, portable=True))
            ap(None)
            if stop:
                break
    return out, errors


def _dump_result(values: list[Any], errors: list[_Err], elapsed: float) -> bytes:
    try:
        return pickle.dumps(("done", values, errors, elapsed), _PICKLE)
    except Exception:
        for i, v in enumerate(values):
            try:
                pickle.dumps(v, _PICKLE)
            except Exception as exc:
                values[i] = None
                err = TypeError(f"the result ({type(v).__name__}) cannot be pickled back to "
                                f"the parent process: {exc}")
                errors.append((i, err, "builtins.TypeError", str(err), f"TypeError: {err}\n"))
        errors.sort(key=lambda e: e[0])
        return pickle.dumps(("done", values, errors, elapsed), _PICKLE)


def _worker_main(conn: Connection, marks: Any, slot: int, alive: Connection) -> None:
    """Entry point of a worker process: run chunks until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent coordinates Ctrl-C
    threading.Thread(target=_watch_parent, args=(alive,), name="fetcher-watchdog",
                     daemon=True).start()
    mark = memoryview(marks).cast("B").cast("q")[slot:slot + 1]
    mark[0] = _IDLE_MARK  # booted
    fns: dict[int, Any] = {}
    loads = pickle.loads
    while True:
        try:
            msg = loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        kind = msg[0]
        if kind == "run":
            mark[0] = _IDLE_MARK
            fn = fns.get(msg[1])
            if not callable(fn):
                conn.send_bytes(pickle.dumps(("fnerr", fn or "function was not loaded")))
                continue
            t0 = time.perf_counter()
            values, errors = _run_tracked(fn, msg[2], mark, msg[3])
            elapsed = time.perf_counter() - t0
            mark[0] = _IDLE_MARK
            conn.send_bytes(_dump_result(values, errors, elapsed))
        elif kind == "fn":
            try:
                fns[msg[1]] = loads(msg[2])
            except BaseException as exc:
                fns[msg[1]] = "".join(traceback.format_exception(exc))
        elif kind == "drop":
            fns.pop(msg[1], None)
        else:
            return


# --------------------------------------------------------------------------- tasks, events


class _Chunk:
    """A run of consecutive input items; ``values`` fills in as its tasks finish."""

    __slots__ = ("extra", "items", "left", "start", "values")

    def __init__(self, start: int, items: list[Any]) -> None:
        self.start = start
        self.items = items
        self.values: list[Any] | None = None
        self.left = len(items)
        self.extra: Any = None


class _Task:
    """What one worker runs: a chunk, or some positions of it (after a lost worker)."""

    __slots__ = ("chunk", "fid", "items", "lost", "positions", "stop")

    def __init__(self, chunk: _Chunk, positions: list[int] | None, fid: int, stop: bool,
                 lost: int = 0) -> None:
        self.chunk = chunk
        self.positions = positions
        self.items = chunk.items if positions is None else [chunk.items[p] for p in positions]
        self.fid = fid
        self.stop = stop
        self.lost = lost

    def chunk_pos(self, pos: int) -> int:
        return pos if self.positions is None else self.positions[pos]

    def sub(self, task_positions: list[int]) -> _Task:
        return _Task(self.chunk, [self.chunk_pos(p) for p in task_positions], self.fid,
                     self.stop, self.lost)


class _Event:
    """A backend report: ``done`` (values, errors), ``lost`` (pos), ``fnerr``, ``crash``."""

    __slots__ = ("detail", "elapsed", "errors", "exc", "kind", "pid", "pos", "task", "values")

    def __init__(self, kind: str, task: _Task, *, values: list[Any] | None = None,
                 errors: list[_Err] | None = None, elapsed: float = 0.0, pos: int | None = None,
                 detail: str = "", pid: int | None = None, exc: BaseException | None = None
                 ) -> None:
        self.kind = kind
        self.task = task
        self.values = values
        self.errors = errors or []
        self.elapsed = elapsed
        self.pos = pos
        self.detail = detail
        self.pid = pid
        self.exc = exc


def split_unpicklable(task: _Task, events: list[_Event], where: str) -> _Task:
    """The part of ``task`` whose items pickle; the rest fail at once as TypeErrors.

    Their failure is appended to ``events`` (as a finished sub-task), so one bad item
    never sinks the chunk it was cut into.
    """
    good: list[int] = []
    bad: list[_Err] = []
    for i, item in enumerate(task.items):
        try:
            pickle.dumps(item, _PICKLE)
            good.append(i)
        except Exception as exc:
            err = TypeError(f"the item ({type(item).__name__}) cannot be pickled to send "
                            f"it to {where}: {exc}")
            bad.append((len(bad), err, "builtins.TypeError", str(err), f"TypeError: {err}\n"))
    keep = set(good)
    bad_task = task.sub([i for i in range(len(task.items)) if i not in keep])
    events.append(_Event("done", bad_task, values=[None] * len(bad), errors=bad))
    return task.sub(good)


class _Backend(Protocol):
    workers: int
    broken: bool

    def register(self, fn: Callable[[Any], Any], payload: bytes | None) -> int: ...
    def unregister(self, fid: int) -> None: ...
    def idle(self) -> int: ...
    def send(self, task: _Task) -> None: ...
    def wait(self, timeout: float | None) -> list[_Event]: ...
    def wake(self) -> None: ...
    def abandon(self) -> None: ...
    def close(self) -> None: ...
    def terminate(self) -> None: ...


# --------------------------------------------------------------------------- backends


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
        proc = self._ctx.Process(target=_worker_main, name=f"fetcher-worker-{slot}",
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


# --------------------------------------------------------------------------- the driver


class _AutoChunker:
    """Chunk sizes from worker-measured time per item: about 20 ms per chunk."""

    def __init__(self, workers: int) -> None:
        self.size = 1
        self._per_item = 0.0
        self._max = max(1, min(_MAX_CHUNK, _MAX_OPEN_ITEMS // (2 * workers)))

    def observe(self, n: int, elapsed: float) -> None:
        if n <= 0:
            return
        per = elapsed / n
        self._per_item = per if self._per_item == 0.0 else 0.5 * (self._per_item + per)
        ideal = max(1, min(self._max, int(_TARGET_CHUNK_S / max(self._per_item, 1e-9))))
        self.size = min(ideal, max(self.size, 2 * n))


class _FixedChunker:
    def __init__(self, size: int) -> None:
        self.size = size

    def observe(self, n: int, elapsed: float) -> None:
        pass


def _task_error(task: _Task, err: _Err, pid: int | None) -> TaskError:
    pos, exc, tname, message, tb = err
    chunk_pos = task.chunk_pos(pos)
    item = task.chunk.items[chunk_pos]
    index = task.chunk.start + chunk_pos
    original = exc if exc is not None else RemoteError(tname, message)
    short = tname.rsplit(".", 1)[-1]
    where = f" in worker process {pid}" if pid is not None and pid != os.getpid() else ""
    te = TaskError(f"item {index} ({_short.repr(item)}) raised {short}{where}: {message}",
                   item=item, index=index, original=original, traceback_text=tb)
    return te


def _lost_error(task: _Task, pos: int, detail: str) -> WorkerLostError:
    chunk_pos = task.chunk_pos(pos)
    item = task.chunk.items[chunk_pos]
    index = task.chunk.start + chunk_pos
    return WorkerLostError(f"{detail} while running item {index} ({_short.repr(item)})",
                           item=item, index=index)


def _raise_task_error(te: TaskError) -> NoReturn:
    orig = te.original
    if isinstance(te, WorkerLostError) or orig is None or isinstance(orig, RemoteError):
        raise te
    note = f"[fetcher] parallel_map item {te.index} ({_short.repr(te.item)}) failed"
    if orig.__traceback__ is None and te.traceback_text:
        note += "; traceback in the worker:\n" + te.traceback_text.rstrip()
    orig.add_note(note)
    raise orig


def _validate(mode: str, workers: int | None, chunksize: int | str, on_error: str) -> int:
    if mode not in _MODES:
        raise ConfigError(f"mode must be one of {_MODES}, got {mode!r}")
    if on_error not in ("collect", "raise"):
        raise ConfigError(f"on_error must be 'collect' or 'raise', got {on_error!r}")
    if chunksize != "auto" and (not isinstance(chunksize, int) or chunksize < 1):
        raise ConfigError(f"chunksize must be 'auto' or a positive int, got {chunksize!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers must be a positive int or None, got {workers!r}")
    if mode == "sequential":
        return 1
    if mode == "dask":
        return workers or 0  # 0: the cluster's worker threads (fetcher.cluster)
    if workers is not None:
        return workers
    n = usable_cpu_count()
    return n if mode == "process" else min(32, n + 4)


def _open_backend(mode: str, workers: int, address: Any = None) -> _Backend:
    if mode == "dask":
        from .cluster import open_backend

        return open_backend(workers or None, address)
    if mode == "process":
        return _acquire_process(workers)
    if mode == "thread":
        return _ThreadBackend(workers)
    return _SequentialBackend()


def _release_backend(b: _Backend, *, clean: bool) -> None:
    if isinstance(b, _ProcessBackend):
        if clean:
            _release_process(b)
        else:
            b.terminate()
    elif clean:
        b.close()
    else:
        b.terminate()


def _chunks(fn: Callable[[Any], Any], payload: bytes | None, items: Iterable[Any], *,
            mode: str, workers: int, chunksize: int | str, ordered: bool, on_error: str,
            progress: Progress | None, address: Any = None) -> Generator[list[Any], None, None]:
    """The driver: yields lists of results (values or TaskErrors), chunk by chunk."""
    prog: Progress = progress if progress is not None else NullProgress()
    total = len(items) if isinstance(items, Sized) else None
    stop = on_error == "raise"
    backend = _open_backend(mode, workers, address)
    chunker = _AutoChunker(backend.workers) if chunksize == "auto" else \
        _FixedChunker(int(chunksize))
    window = max(4, 4 * backend.workers)
    clean = False
    fid: int | None = None
    try:
        fid = backend.register(fn, payload)
        prog.start(total, unit="item")
        it = iter(items)
        requeue: deque[_Task] = deque()
        open_chunks: deque[_Chunk] = deque()  # ordered: in input order
        finished: deque[_Chunk] = deque()  # unordered: completion order
        n_open = 0
        open_items = 0  # taken from the input, not yet returned
        consumed = 0
        exhausted = False
        while True:
            while backend.idle() > 0:
                if requeue:
                    backend.send(requeue.popleft())
                    continue
                if exhausted or n_open >= window or open_items >= _MAX_OPEN_ITEMS:
                    break
                size = chunker.size
                batch = list(itertools.islice(it, size))
                if batch:
                    chunk = _Chunk(consumed, batch)
                    consumed += len(batch)
                    open_items += len(batch)
                    n_open += 1
                    if ordered:
                        open_chunks.append(chunk)
                    backend.send(_Task(chunk, None, fid, stop))
                if len(batch) < size:
                    exhausted = True
                    if total is None:
                        prog.set_total(consumed)
            yielded = False
            if ordered:
                while open_chunks and open_chunks[0].left == 0:
                    done = open_chunks.popleft()
                    n_open -= 1
                    open_items -= len(done.items)
                    yielded = True
                    yield done.values  # type: ignore[misc]
            else:
                while finished:
                    done = finished.popleft()
                    n_open -= 1
                    open_items -= len(done.items)
                    yielded = True
                    yield done.values  # type: ignore[misc]
            if exhausted and n_open == 0 and not requeue:
                break
            if yielded:
                continue  # the window has room again: dispatch before waiting
            for ev in backend.wait(None):
                task = ev.task
                chunk = task.chunk
                if ev.kind == "crash":
                    raise ev.exc  # type: ignore[misc]
                if ev.kind == "fnerr":
                    raise ConfigError(f"{_describe(fn)} could not be loaded in a worker "
                                      f"process:\n{ev.detail}")
                if ev.kind == "lost":
                    if ev.pos is not None:
                        lost = _lost_error(task, ev.pos, ev.detail)
                        if stop:
                            raise lost
                        _fill(task.sub([ev.pos]), [lost])
                        rest = [p for p in range(len(task.items)) if p != ev.pos]
                        if rest:
                            requeue.append(task.sub(rest))
                        prog.update(1)
                    elif task.lost >= 1:  # died twice outside any item: give up on these
                        lost_all = [WorkerLostError(f"{ev.detail} outside any item, twice",
                                                    item=task.items[p],
                                                    index=chunk.start + task.chunk_pos(p))
                                    for p in range(len(task.items))]
                        if stop:
                            raise lost_all[0]
                        _fill(task, list(lost_all))
                        prog.update(len(task.items))
                    else:
                        task.lost += 1
                        requeue.append(task)
                else:
                    values = ev.values if ev.values is not None else []
                    if ev.errors:
                        if stop:
                            _raise_task_error(_task_error(task, ev.errors[0], ev.pid))
                        for err in ev.errors:
                            values[err[0]] = _task_error(task, err, ev.pid)
                    if ev.elapsed > 0:
                        chunker.observe(len(task.items), ev.elapsed)
                    _fill(task, values)
                    prog.update(len(task.items))
                if chunk.left == 0 and not ordered:
                    finished.append(chunk)
        clean = True
    except GeneratorExit:
        clean = True  # the consumer stopped early: discard what is still running
        raise
    except Exception:  # on_error="raise", a failing input iterator, ...: pool is intact
        clean = not backend.broken
        raise
    finally:  # KeyboardInterrupt and anything else leave clean False: terminate
        try:
            if clean:
                backend.abandon()
                if fid is not None:
                    backend.unregister(fid)
        finally:
            _release_backend(backend, clean=clean)
            prog.close()


def _fill(task: _Task, values: list[Any]) -> None:
    chunk = task.chunk
    if task.positions is None and chunk.values is None:
        chunk.values = values
    else:
        if chunk.values is None:
            chunk.values = [None] * len(chunk.items)
        for i, v in enumerate(values):
            chunk.values[task.chunk_pos(i)] = v
    chunk.left -= len(task.items)


def _prepare(fn: Callable[[Any], Any], mode: str, workers: int | None, chunksize: int | str,
             on_error: str) -> tuple[int, bytes | None]:
    n = _validate(mode, workers, chunksize, on_error)
    if not callable(fn):
        raise ConfigError(f"parallel_map needs a callable, got {type(fn).__name__}")
    return n, (_dump_callable(fn) if mode == "process" else None)


@overload
def parallel_imap(fn: Callable[[T], R], items: Iterable[T], *, mode: Mode = ...,
                  workers: int | None = ..., chunksize: int | Literal["auto"] = ...,
                  ordered: bool = ..., on_error: Literal["raise"],
                  progress: Progress | None = ..., address: Any = ...
                  ) -> Generator[R, None, None]: ...
@overload
def parallel_imap(fn: Callable[[T], R], items: Iterable[T], *, mode: Mode = ...,
                  workers: int | None = ..., chunksize: int | Literal["auto"] = ...,
                  ordered: bool = ..., on_error: Literal["collect"] = ...,
                  progress: Progress | None = ..., address: Any = ...
                  ) -> Generator[R | TaskError, None, None]: ...
def parallel_imap(fn: Callable[[Any], Any], items: Iterable[Any], *, mode: Mode = "process",
                  workers: int | None = None, chunksize: int | Literal["auto"] = "auto",
                  ordered: bool = True, on_error: OnError = "collect",
                  progress: Progress | None = None, address: Any = None
                  ) -> Generator[Any, None, None]:
    """Lazily map ``fn`` over ``items``; a generator of results (see the module docstring).

    Options are validated and ``fn`` is checked for picklability now; workers start at
    the first ``next()``. ``close()`` (or dropping the generator) discards unfinished
    work and returns the workers to the pool.
    """
    n, payload = _prepare(fn, mode, workers, chunksize, on_error)
    gen = _chunks(fn, payload, items, mode=mode, workers=n, chunksize=chunksize,
                  ordered=ordered, on_error=on_error, progress=progress, address=address)
    return _flatten(gen)


def _flatten(gen: Generator[list[Any], None, None]) -> Generator[Any, None, None]:
    try:
        for values in gen:
            yield from values
    finally:
        gen.close()


@overload
def parallel_map(fn: Callable[[T], R], items: Iterable[T], *, mode: Mode = ...,
                 workers: int | None = ..., chunksize: int | Literal["auto"] = ...,
                 ordered: bool = ..., on_error: Literal["raise"],
                 progress: Progress | None = ..., address: Any = ...) -> list[R]: ...
@overload
def parallel_map(fn: Callable[[T], R], items: Iterable[T], *, mode: Mode = ...,
                 workers: int | None = ..., chunksize: int | Literal["auto"] = ...,
                 ordered: bool = ..., on_error: Literal["collect"] = ...,
                 progress: Progress | None = ..., address: Any = ...) -> list[R | TaskError]: ...
def parallel_map(fn: Callable[[Any], Any], items: Iterable[Any], *, mode: Mode = "process",
                 workers: int | None = None, chunksize: int | Literal["auto"] = "auto",
                 ordered: bool = True, on_error: OnError = "collect",
                 progress: Progress | None = None, address: Any = None) -> list[Any]:
    """Map ``fn`` over ``items`` on ``workers`` processes/threads; a list of results.

    ``mode``: "process" (default; ``workers`` defaults to the usable CPU count),
    "thread" (default ``min(32, cpus + 4)``), "sequential", or "dask" (chunks as tasks
    on the Dask scheduler at ``address``, or a ``distributed.Client``; None: a
    LocalCluster; see ``fetcher.cluster``; needs ``fetcher[dask]``). With
    ``on_error="collect"`` a failed item's slot holds a ``TaskError`` (a
    ``WorkerLostError`` if its worker process was killed); with ``"raise"`` the first
    failure is re-raised as its original type. ``ordered=False`` lists results in
    completion order. See the module docstring for chunking and cancellation.
    """
    n, payload = _prepare(fn, mode, workers, chunksize, on_error)
    gen = _chunks(fn, payload, items, mode=mode, workers=n, chunksize=chunksize,
                  ordered=ordered, on_error=on_error, progress=progress, address=address)
    try:
        return list(itertools.chain.from_iterable(gen))
    finally:
        gen.close()


# --------------------------------------------------------------------------- TaskPool


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
