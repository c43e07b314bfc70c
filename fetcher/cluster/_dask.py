"""``parallel_map(mode="dask")``: the executors backend over a ``distributed.Client``."""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import queue
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from ..executors import _Event, _Task, split_unpicklable
from ._client import ClusterAddress, _worker_threads, get_client

_PICKLE = pickle.HIGHEST_PROTOCOL


_FN_CACHE: dict[str, Callable[[Any], Any]] = {}
_FN_LOCK = threading.Lock()


def _dask_run(fid: str, payload: bytes, items: bytes, stop: bool) -> tuple[bytes, int]:
    """Worker side of one chunk: (pickled ("done", values, errors, elapsed) or
    ("fnerr", text), worker pid)."""
    from ..executors import _dump_result, _run_tracked

    try:
        with _FN_LOCK:
            fn = _FN_CACHE.get(fid)
        if fn is None:
            fn = pickle.loads(payload)
            with _FN_LOCK:
                while len(_FN_CACHE) >= 32:
                    _FN_CACHE.pop(next(iter(_FN_CACHE)))
                _FN_CACHE[fid] = fn
        values_in = pickle.loads(items)
    except BaseException as exc:
        return pickle.dumps(("fnerr", "".join(traceback.format_exception(exc)))), os.getpid()
    mark = memoryview(bytearray(8)).cast("q")
    t0 = time.perf_counter()
    values, errors = _run_tracked(fn, values_in, mark, stop)
    return _dump_result(values, errors, time.perf_counter() - t0), os.getpid()


class _DaskBackend:
    """The executors ``_Backend`` protocol over a ``distributed.Client``.

    Futures report through done-callbacks into a queue, so ``wait`` has a timeout and
    ``wake`` works from any thread. At most ``2 * workers`` chunks are submitted.
    """

    broken = False

    def __init__(self, client: Any, workers: int) -> None:
        self.client = client
        self.workers = workers
        self._payloads: dict[int, tuple[str, bytes]] = {}
        self._ids = itertools.count()
        self._done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._inflight: dict[str, tuple[_Task, Any]] = {}
        self._events: list[_Event] = []
        self._suspects: deque[_Task] = deque()  # items of a chunk Dask gave up on
        self._suspect: str | None = None  # the one running alone now

    def register(self, fn: Callable[[Any], Any], payload: bytes | None) -> int:
        import cloudpickle  # type: ignore[import-untyped, unused-ignore]

        try:
            data = bytes(cloudpickle.dumps(fn, _PICKLE))
        except Exception as exc:
            raise ConfigError(f"{getattr(fn, '__qualname__', fn)!r} cannot be sent to Dask "
                              f"workers ({type(exc).__name__}: {exc})") from None
        fid = next(self._ids)
        self._payloads[fid] = (uuid.uuid4().hex, data)
        return fid

    def unregister(self, fid: int) -> None:
        self._payloads.pop(fid, None)

    def idle(self) -> int:
        return max(0, 2 * self.workers - len(self._inflight))

    def send(self, task: _Task) -> None:
        self._submit(task)

    def _submit(self, task: _Task) -> str | None:
        try:
            items = pickle.dumps(task.items, _PICKLE)
        except Exception:
            task = self._split_unpicklable(task)
            if not task.items:
                return None
            items = pickle.dumps(task.items, _PICKLE)
        fid, payload = self._payloads[task.fid]
        fut = self.client.submit(_dask_run, fid, payload, items, task.stop,
                                 key=f"fetcher-map-{uuid.uuid4().hex}", pure=False)
        self._inflight[fut.key] = (task, fut)
        fut.add_done_callback(self._done.put)
        return str(fut.key)

    def _split_unpicklable(self, task: _Task) -> _Task:
        return split_unpicklable(task, self._events, "a Dask worker")

    def wait(self, timeout: float | None) -> list[_Event]:
        if not self._events:
            try:
                ready = [self._done.get(timeout=timeout)]
            except queue.Empty:
                return []
            with contextlib.suppress(queue.Empty):
                while True:
                    ready.append(self._done.get_nowait())
            futs = [f for f in ready if f is not None and f.key in self._inflight]
            finished = [f for f in futs if f.status == "finished"]
            # One gather for every chunk that finished meanwhile: one round trip.
            results = dict(zip([f.key for f in finished], self.client.gather(finished),
                               strict=True)) if finished else {}
            for fut in futs:
                self._take(fut, results.get(fut.key))
            if self._suspect is None and self._suspects:
                self._suspect = self._submit(self._suspects.popleft())
        events, self._events = self._events, []
        return events

    def _take(self, fut: Any, outcome: tuple[bytes, int] | None) -> None:
        task = self._inflight.pop(fut.key)[0]
        if fut.key == self._suspect:
            self._suspect = None
        if outcome is not None:
            data, pid = outcome
            msg = pickle.loads(data)
            if msg[0] == "done":
                self._events.append(_Event("done", task, values=msg[1], errors=msg[2],
                                           elapsed=msg[3], pid=pid))
            else:
                self._events.append(_Event("fnerr", task, detail=str(msg[1])))
            return
        exc = fut.exception() if fut.status == "error" else None
        if exc is not None and type(exc).__name__ == "KilledWorker":
            if len(task.items) == 1:
                self._events.append(_Event("lost", task, pos=0, detail="Dask gave up after "
                                           "its workers kept dying (KilledWorker)"))
            else:  # Dask also fails tasks queued on a dying worker: retry one at a time
                self._suspects.extend(task.sub([p]) for p in range(len(task.items)))
            return
        detail = "".join(traceback.format_exception(exc)) if exc is not None else \
            f"the Dask task ended as {fut.status!r}"
        self._events.append(_Event("fnerr", task, detail=detail))

    def wake(self) -> None:
        self._done.put(None)

    def abandon(self) -> None:
        futs = [f for _, f in self._inflight.values()]
        self._inflight.clear()
        self._suspects.clear()
        self._suspect = None
        self._events = []
        if futs:
            with contextlib.suppress(Exception):
                self.client.cancel(futs)

    def close(self) -> None:
        self.abandon()

    terminate = close


def open_backend(workers: int | None, address: ClusterAddress) -> _DaskBackend:
    """The ``mode="dask"`` backend for executors: ``workers`` caps the chunks running at
    once (default: the cluster's worker threads); also the LocalCluster size when
    ``address`` is None and no default client exists."""
    client = get_client(address, workers=workers)
    return _DaskBackend(client, workers or _worker_threads(client))
