"""The driver behind ``parallel_map`` and ``parallel_imap``: lazy chunking, the bounded
window, ordering, errors and progress, over any backend (see the package docstring)."""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Generator, Iterable, Sized
from typing import Any, Literal, NoReturn, overload

from ..errors import ConfigError, TaskError, WorkerLostError
from ..progress import NullProgress, Progress
from ._callables import _dump_callable
from ._common import (
    Mode,
    OnError,
    R,
    RemoteError,
    T,
    _Backend,
    _Chunk,
    _describe,
    _Err,
    _short,
    _Task,
    usable_cpu_count,
)
from ._local import _SequentialBackend, _ThreadBackend
from ._process import _acquire_process, _ProcessBackend, _release_process

_MODES = ("process", "thread", "sequential", "dask")
_TARGET_CHUNK_S = 0.02
_MAX_CHUNK = 65_536
_MAX_OPEN_ITEMS = 1 << 19
"""Items taken from the input and not yet returned, at most (plus one chunk)."""


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
        from ..cluster import open_backend

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
