"""The client side of ``fetch(cluster=...)``: plan like a local run, download on Dask."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import pickle
import shutil
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..download import PARTIAL_DIR, SkipExisting, partial_name
from ..downloader import Fetcher, _file_size, _Run
from ..errors import ConfigError, ItemError, WorkerLostError
from ..http import redact
from ..models import Job, Report, Result
from ._client import _distributed, _worker_threads, check_shared_dest, get_client
from ._worker import JOURNAL_DIR, _cancel_run, _end_run, _Item, _run_batch, _Spec

_BATCH_MIN, _BATCH_MAX, _BATCH_UNSIZED = 16, 500, 250
_PICKLE = pickle.HIGHEST_PROTOCOL

def run_cluster(fetcher: Fetcher, jobs: Iterable[Job], total: int | None, dest: Path,
                cancel: threading.Event) -> Report:
    """``Fetcher.run`` with ``cluster=``: plan here, download and post-process on Dask."""
    if fetcher.config.content_disposition:
        raise ConfigError("--content-disposition cannot be combined with --cluster: names "
                          "chosen by the server are only known on the worker, where "
                          "collisions between batches cannot be resolved")
    client = get_client(fetcher.cluster)
    dest = Path(os.path.abspath(dest))
    dest.mkdir(parents=True, exist_ok=True)
    check_shared_dest(client, dest, fetcher.post)
    # The client-side run owns manifest, sink and progress; post-processing happens on
    # the workers, so the local view of the Fetcher has none.
    local = Fetcher(fetcher.config, progress=fetcher.progress, post=(),
                     sink=fetcher.sink, sink_table=fetcher.sink_table)
    return _ClusterRun(local, dest, cancel, client=client, post=fetcher.post,
                       batch_size=fetcher.cluster_batch).execute(jobs, total)


class _Batch:
    __slots__ = ("extras", "items", "number")

    def __init__(self, number: int, items: list[_Item], extras: list[Any]) -> None:
        self.number = number
        self.items = items
        self.extras = extras


class _ClusterRun(_Run):
    """Plans like a local run (names, skips, --on-exists), downloads on Dask workers."""

    def __init__(self, fetcher: Fetcher, dest: Path, cancel: threading.Event, *,
                 client: Any, post: Sequence[str], batch_size: int | None) -> None:
        super().__init__(fetcher, dest, cancel)
        self.client = client
        self.post = tuple(post)
        self.batch_size = batch_size
        self.token = uuid.uuid4().hex[:12]
        self.spec = _Spec(self.token, self.cfg, str(dest), self.post)
        self._ready: deque[tuple[_Item, Any]] = deque()  # finished, waiting for --post
        self._journals: list[Path] = []
        if self.post:  # run on the workers: their functions may write anywhere in DEST
            self.ctx.trust_fresh = False

    # -- planning (client) ----------------------------------------------------------
    def _open(self, stack: contextlib.ExitStack, total: int | None) -> Any:
        manifest = super()._open(stack, total)
        jdir = self.dest / JOURNAL_DIR
        with contextlib.suppress(OSError):  # (the base class loaded them into the index)
            self._journals = sorted(jdir.glob("*.jsonl"))
        return manifest

    def _fanout_width(self, total: int | None) -> int:
        return 1  # the cluster's workers are the fan-out

    def _finish(self, result: Result) -> None:
        if self.post and result.status != "failed" and result.path:
            self._ready.append(((result.url, result.path, None, False, result), result.extra))
            return
        self._record(result)

    def _item(self, job: Job, rel: str) -> tuple[_Item, Any] | None:
        """Apply --on-exists here, so every attempt of a batch writes the same name."""
        shown = redact(job.url)
        owned = bool(len(self.index)) and self.index.size(shown, rel) is not None
        try:
            rel = self._resolve_existing(rel, owned=owned)
        except SkipExisting:
            self._finish(Result(url=shown, path=rel, status="skipped",
                                bytes=_file_size(self.dest / rel) or 0, extra=job.extra))
            return None
        except ItemError as exc:
            self._finish(Result(url=shown, path=rel, status="failed", extra=job.extra)
                         .fail(exc))
            return None
        resume = bool(self.ctx.partials) and partial_name(job.url, rel) in self.ctx.partials
        return (job.url, rel, job.sha256, resume, None), job.extra

    def _next_batch(self, jobs: Iterator[Job], size: int, number: int) -> _Batch | None:
        items: list[_Item] = []
        extras: list[Any] = []
        while len(items) < size:
            if self._ready:
                item, extra = self._ready.popleft()
                items.append(item)
                extras.append(extra)
                continue
            if self.ctx.cancel.is_set() or self.ctx.stop_new.is_set():
                break
            job = next(jobs, None)
            if job is None:
                break
            rel = self._plan(job)
            planned = self._item(job, rel) if rel is not None else None
            if planned is not None:
                items.append(planned[0])
                extras.append(planned[1])
        return _Batch(number, items, extras) if items else None

    # -- the run --------------------------------------------------------------------
    def _run_items(self, jobs: Iterable[Job], total: int | None) -> None:
        """Send the planned items to the cluster's workers in batches."""
        try:
            self._loop(iter(jobs), total)
        except KeyboardInterrupt:
            self._interrupt()
            raise
        finally:
            self._goodbye()

    def _loop(self, jobs: Iterator[Job], total: int | None) -> None:
        threads = _worker_threads(self.client)
        window = max(2, 2 * threads)
        size = self.batch_size or (
            _BATCH_UNSIZED if total is None else
            max(_BATCH_MIN, min(_BATCH_MAX, math.ceil(total / (4 * threads)))))
        # A sliding window over as_completed: results are gathered on Dask's event loop
        # as batches finish, so collecting one never waits on another's transfer.
        done = _distributed().as_completed(loop=self.client.loop, with_results=True,
                                           raise_errors=False)
        pending: dict[str, _Batch] = {}
        numbers = itertools.count()
        exhausted = interrupted = False
        self._watch()
        while True:
            while (not exhausted or self._ready) and len(pending) < window \
                    and not self.ctx.cancel.is_set():
                batch = self._next_batch(jobs, size, next(numbers))
                if batch is None:
                    exhausted = True
                    break
                fut = self.client.submit(
                    _run_batch, self.spec, batch.number, pickle.dumps(batch.items, _PICKLE),
                    pure=False,
                    key=f"fetcher-get-{self.token}-{batch.number}", retries=1)
                pending[fut.key] = batch
                done.add(fut)
            if not pending:
                break
            try:
                fut, outcome = next(done)
            except KeyboardInterrupt:  # workers stop their transfers; keep collecting
                self._interrupt()
                interrupted = True
                continue
            self._collect(pending.pop(fut.key), fut.status, outcome)
        if interrupted:
            raise KeyboardInterrupt

    def _cancelled(self) -> None:
        """Tell the workers."""
        self._broadcast(_cancel_run)

    def _interrupt(self) -> None:
        super()._interrupt()
        self._broadcast(_cancel_run)

    def _broadcast(self, fn: Callable[[str], None]) -> None:
        with contextlib.suppress(Exception):
            self.client.run(fn, self.token, on_error="ignore", wait=True)

    def _collect(self, batch: _Batch, status: str, outcome: Any) -> None:
        stop: str | None = None
        if status == "finished":
            results, stop = outcome
        else:
            exc = outcome[1] if isinstance(outcome, tuple) else outcome
            if type(exc).__name__ == "KilledWorker":
                err: BaseException = WorkerLostError(
                    f"Dask workers kept dying on batch {batch.number}: {exc}")
            else:
                err = exc if isinstance(exc, BaseException) else RuntimeError(str(exc))
                stop = f"batch {batch.number} failed on a worker: {type(err).__name__}: {err}"
            results = [Result(url=redact(item[0]), path=item[1], status="failed").fail(err)
                       for item in batch.items]
        for result, extra in zip(results, batch.extras, strict=True):
            result.extra = extra
            self._record(result)
        if stop:
            self.ctx.stop(stop)

    def _goodbye(self) -> None:
        self._broadcast(_end_run)
        partial = self.dest / PARTIAL_DIR
        with contextlib.suppress(OSError):
            for name in os.listdir(partial):
                if name.startswith(f".b-{self.token}-"):  # attempts that were lost
                    shutil.rmtree(partial / name, ignore_errors=True)
        if not self.ctx.cancel.is_set() and self.ctx.stop_reason is None:
            # Every published file is now in the manifest: the journals are spent.
            jdir = self.dest / JOURNAL_DIR
            with contextlib.suppress(OSError):
                for path in [*self._journals, *jdir.glob(f"{self.token}-*.jsonl")]:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
