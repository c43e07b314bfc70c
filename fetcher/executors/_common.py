"""What the driver, the backends and the worker side share: tasks, events, errors.

A ``_Chunk`` is a run of consecutive input items, a ``_Task`` what one worker runs (a
chunk, or some positions of it after a lost worker); backends report ``_Event``\\ s
through the ``_Backend`` protocol. An error captured in a worker travels as an ``_Err``.
"""

from __future__ import annotations

import math
import os
import pickle
import reprlib
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from ..errors import FetcherError

T = TypeVar("T")
R = TypeVar("R")
Mode = Literal["process", "thread", "sequential", "dask"]
OnError = Literal["collect", "raise"]

_PICKLE = pickle.HIGHEST_PROTOCOL
_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60


class RemoteError(FetcherError):
    """Stands in for a worker exception that could not be pickled back (``.type_name``)."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name



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


def _describe(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', '?')}.{name}"


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
