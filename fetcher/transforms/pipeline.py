"""Running transform chains on a process pool: ``PostPipeline`` and ``process_paths``.

``PostPipeline`` sits behind the downloader: download threads ``submit`` the relative
path of each finished file and get a Future of the outputs; only paths cross to
the worker processes, never file contents. ``submit`` blocks while ``max_pending``
files are unfinished, so a slow CPU stage throttles the downloads instead of
letting finished-but-unprocessed files pile up.

``process_paths`` backs ``fetcher process PATHS --post ...``: the same chains over
local files, one ``Result`` per path, in input order.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import CancelledError, ConfigError, ProcessingError, TaskError, WorkerLostError
from ..executors import TaskPool, parallel_imap, usable_cpu_count
from ..models import Report, Result
from ..progress import Progress
from .registry import ChainTask, Transform, display_path, parse_chain


def _label(chain: Sequence[Transform]) -> str:
    return "+".join(t.spec for t in chain)


def _as_processing_error(exc: BaseException, chain: Sequence[Transform], path: str
                         ) -> ProcessingError:
    if isinstance(exc, ProcessingError):
        return exc
    if isinstance(exc, WorkerLostError):
        detail = str(exc).split(" while running item")[0]
        return ProcessingError(f"{detail} while post-processing", transform=_label(chain),
                               path=path)
    tb = getattr(exc, "traceback_text", "")
    return ProcessingError(f"{type(exc).__name__}: {exc}", transform=_label(chain), path=path,
                           traceback_text=tb if isinstance(tb, str) else "")


_POST_NICE = 5
"""Niceness of post-processing workers running beside downloads (see ChainTask)."""


class PostPipeline:
    """Post-process downloaded files on a process pool, with backpressure.

    ``specs`` are ``--post`` specs, all validated here (ConfigError) before any
    work starts. ``processes`` defaults to the usable CPU count; ``0`` runs the
    chain in one in-process thread (no pickling; for debugging). ``max_pending``
    (default ``2 * processes``) bounds submitted-but-unfinished files.

    ``submit(rel_path)`` (thread-safe; a path relative to ``dest``, or absolute)
    returns a Future whose result is the list of outputs relative to ``dest``. A
    failed transform, or a worker process killed while running one, sets a
    ``ProcessingError``; the pipeline goes on. ``close()`` waits for everything;
    leaving a ``with`` block by an exception (Ctrl-C) stops the workers at once and
    fails what is unfinished with ``CancelledError``.
    """

    def __init__(self, specs: Sequence[str | Transform], dest: str | os.PathLike[str], *,
                 processes: int | None = None, max_pending: int | None = None) -> None:
        self.chain = parse_chain(specs)
        self.dest = Path(os.path.abspath(dest))
        if processes is not None and processes < 0:
            raise ConfigError(f"processes must be 0 or more, got {processes}")
        n = usable_cpu_count() if processes is None else max(1, processes)
        if max_pending is None:
            max_pending = 2 * n
        self.processes = 0 if processes == 0 else n
        self.max_pending = max_pending
        # Starting the forkserver and its workers takes ~0.3 s; it happens on a thread
        # so that the downloads feeding this pipeline start at once (submit waits).
        self._ready = threading.Event()
        self._pool_obj: TaskPool[str, list[str]] | None = None
        self._pool_error: BaseException | None = None

        def start() -> None:
            try:
                self._pool_obj = TaskPool(
                    ChainTask(self.chain, self.dest, nice=_POST_NICE),
                    mode="thread" if processes == 0 else "process",
                    workers=n if processes != 0 else 1, max_pending=max_pending)
            except BaseException as exc:
                self._pool_error = exc
            finally:
                self._ready.set()

        threading.Thread(target=start, name="fetcher-post-start", daemon=True).start()

    @property
    def _pool(self) -> TaskPool[str, list[str]]:
        self._ready.wait()
        if self._pool_error is not None:
            raise self._pool_error
        assert self._pool_obj is not None
        return self._pool_obj

    def submit(self, rel_path: str | os.PathLike[str]) -> Future[list[str]]:
        """Queue one file; blocks while ``max_pending`` files are unfinished."""
        rel = os.fspath(rel_path)
        outer: Future[list[str]] = Future()
        outer.set_running_or_notify_cancel()
        inner = self._pool.submit(rel)

        def done(f: Future[list[str]]) -> None:
            try:
                outer.set_result(f.result())
            except CancelledError as exc:
                outer.set_exception(exc)
            except BaseException as exc:
                outer.set_exception(_as_processing_error(exc, self.chain, rel))

        inner.add_done_callback(done)
        return outer

    def close(self) -> None:
        """Wait for every submitted file, then stop the workers."""
        self._pool.close()

    def terminate(self) -> None:
        """Stop the workers now; unfinished futures fail with CancelledError."""
        self._pool.close(cancel=True)

    def __enter__(self) -> PostPipeline:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.terminate()


def process_paths(paths: Sequence[str | os.PathLike[str]], specs: Sequence[str | Transform], *,
                  dest: str | os.PathLike[str] | None = None, processes: int | None = None,
                  progress: Progress | None = None, address: Any = None) -> Report:
    """Run the ``--post`` chain over local files; one Result per path, in order.

    ``dest`` (default: the current directory) is where outputs go, under
    ``dest/.fetcher/derived/``. A path inside ``dest`` keeps its relative path there;
    a path outside is named by its base name, and two different files that would
    share a name fail (the second is not processed) rather than overwrite each
    other. ``processes=0`` runs in this process; ``address`` (a Dask Client) runs the
    chains on its workers instead (``fetcher.cluster.process_on_cluster``). Each Result
    has ``url`` = the path as
    given, ``path`` = the path relative to ``dest`` (or as given), ``outputs``
    relative to ``dest``, and on failure ``error_type`` "ProcessingError".
    """
    chain = parse_chain(specs)
    root = Path(os.path.abspath(dest if dest is not None else os.getcwd()))
    if processes is not None and processes < 0:
        raise ConfigError(f"processes must be 0 or more, got {processes}")
    started = time.perf_counter()
    report = Report()
    seen: dict[str, str] = {}
    todo: list[str] = []
    clashes: dict[int, str] = {}
    for i, p in enumerate(paths):
        full = os.path.abspath(p)
        key = display_path(Path(full), root) if Path(full).is_relative_to(root) \
            else os.path.basename(full)
        other = seen.setdefault(key, full)
        if other != full:
            clashes[i] = other
        todo.append(full)
    task = ChainTask(chain, root)
    mode: Any = "dask" if address is not None else \
        "sequential" if processes == 0 else "process"
    work = [t for i, t in enumerate(todo) if i not in clashes]
    # Local chunks of one: images take milliseconds each, and a killed worker then costs
    # exactly one item. On Dask, "auto" amortises the scheduler's per-task cost.
    results = iter(parallel_imap(task, work, mode=mode, workers=processes or None,
                                 chunksize="auto" if address is not None else 1,
                                 ordered=True, on_error="collect", progress=progress,
                                 address=address))
    for i, p in enumerate(paths):
        inside = Path(todo[i]).is_relative_to(root)
        shown = display_path(Path(todo[i]), root) if inside else os.fspath(p)
        result = Result(url=os.fspath(p), path=shown, status="ok")
        if i in clashes:
            result.fail(ProcessingError(
                f"its outputs would have the same name as those of {clashes[i]}",
                transform=_label(chain), path=shown))
        else:
            value = next(results)
            if isinstance(value, TaskError):
                original = value.original if value.original is not None else value
                result.fail(_as_processing_error(
                    value if isinstance(value, WorkerLostError) else original, chain, shown))
            else:
                result.outputs = list(value)
                with_size = Path(todo[i])
                result.bytes = with_size.stat().st_size if with_size.is_file() else 0
        report.add(result)
    report.elapsed_s = time.perf_counter() - started
    return report
