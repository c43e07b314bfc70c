"""The worker-process side of ``mode="process"``: run the chunks sent over a pipe.

``_run_tracked`` and ``_dump_result`` also run chunks on Dask workers
(``fetcher.cluster``).
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ._common import _PICKLE, _capture, _Err

_BOOT_MARK = -3
"""A worker's shared slot before it runs our code; >= 0 is the item it is running."""
_IDLE_MARK = -1


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
