"""The worker side of ``fetch(cluster=...)``: download and post-process one batch.

A ``_WorkerRun`` holds what the batches of one run share in one worker process (the
thread pool, host gate, HTTP clients); the client broadcasts ``_cancel_run`` and
``_end_run`` to every worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import shutil
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from ..config import FetchConfig
from ..download import PARTIAL_DIR, HostGate, RunContext, download_one, partial_name
from ..downloader import _post_failed
from ..errors import CancelledError, ItemError
from ..http import HttpClient, Prefetched, redact
from ..models import Job, Result
from ..multiplex import Multiplexer, capacity_of, loop_eligible

JOURNAL_DIR = Path(".fetcher") / "cluster"
"""Per-attempt journals of published files (``<run>-<batch>-<attempt>.jsonl``)."""

@dataclasses.dataclass(frozen=True, slots=True)
class _Spec:
    """What every batch of one run shares (pickled with each batch; small)."""

    token: str
    config: FetchConfig
    dest: str
    post: tuple[str, ...]


# One planned item: (url, rel, sha256, resume a shared partial?, a finished Result that
# only needs post-processing, else None).
_Item = tuple[str, str, "str | None", bool, "Result | None"]


class _AttemptContext(RunContext):
    """A RunContext whose partial files live in this attempt's private directory."""

    def __init__(self, *, attempt_dir: Path, **kw: Any) -> None:
        super().__init__(**kw)
        self.attempt_dir = attempt_dir

    @property
    def partial_dir(self) -> Path:
        return self.attempt_dir

    @property
    def partial_str(self) -> str:
        return os.fspath(self.attempt_dir)


class _WorkerRun:
    """One run's state in one worker process, shared by the batches it runs there."""

    def __init__(self, spec: _Spec) -> None:
        cfg = spec.config
        self.cancel = threading.Event()
        self.stop_new = threading.Event()
        self.stop_reason: str | None = None
        limit = cfg.per_host if cfg.per_host is not None and cfg.per_host < cfg.threads \
            else None
        self.gate = HostGate(limit=limit, rate=cfg.rate, cancel=self.cancel)
        self.pool = ThreadPoolExecutor(cfg.threads, thread_name_prefix="fetcher-cluster")
        self.dirs: set[str] = set()
        self.active = 0
        self.chain: tuple[Any, ...] = ()
        if spec.post:
            from ..transforms import parse_chain

            self.chain = parse_chain(spec.post)
        self._local = threading.local()
        self.clients: list[HttpClient] = []
        self.contexts: dict[int, _AttemptContext] = {}  # batches running here now, by id
        self._lock = threading.Lock()
        self.config = cfg

    def client(self) -> HttpClient:
        client: HttpClient | None = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = HttpClient(self.config, cancel=self.cancel)
            with self._lock:
                self.clients.append(client)
        return client

    def abort(self) -> None:
        """Stop this run here: break transfers, connects and waits for a response head."""
        self.cancel.set()
        with self._lock:
            contexts = list(self.contexts.values())
        for ctx in contexts:
            ctx.abort_all()

    def close(self) -> None:
        self.abort()
        self.pool.shutdown(wait=False, cancel_futures=True)  # never block the event loop
        for client in self.clients:
            with contextlib.suppress(Exception):
                client.close()


_RUNS: dict[str, _WorkerRun] = {}
_CANCELLED: set[str] = set()
_RUNS_LOCK = threading.Lock()
_MAX_IDLE_RUNS = 4


def _enter_run(spec: _Spec) -> _WorkerRun:
    with _RUNS_LOCK:
        run = _RUNS.get(spec.token)
        if run is None:
            idle = [t for t, r in _RUNS.items() if r.active == 0]
            for t in idle[:max(0, len(idle) + 1 - _MAX_IDLE_RUNS)]:
                _RUNS.pop(t).close()  # runs whose client never said goodbye
            run = _RUNS[spec.token] = _WorkerRun(spec)
            if spec.token in _CANCELLED:
                run.cancel.set()
        run.active += 1
        return run


def _leave_run(run: _WorkerRun) -> None:
    with _RUNS_LOCK:
        run.active -= 1


def _cancel_run(token: str) -> None:
    """Client -> every worker: stop this run's transfers (Ctrl-C on the client)."""
    with _RUNS_LOCK:
        _CANCELLED.add(token)
        run = _RUNS.get(token)
    if run is not None:
        run.abort()


def _end_run(token: str) -> None:
    """Client -> every worker: the run is over; close its threads and connections."""
    with _RUNS_LOCK:
        run = _RUNS.pop(token, None)
        _CANCELLED.discard(token)
    if run is not None:
        run.close()


class _Journal:
    """Append-only record of files this attempt published (opened on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] | None = None
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        with self._lock:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            self._fh.write(line)
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def _move(src: Path, dst: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.replace(src, dst)


def _run_item(run: _WorkerRun, ctx: _AttemptContext, shared: Path, journal: _Journal,
              item: _Item, first: Prefetched | ItemError | None = None) -> Result:
    """Download one planned item (or take its finished Result) and post-process it."""
    url, rel, sha, resume, done = item
    if done is not None:
        result = done
    else:
        shown = redact(url)
        if first is None and (ctx.cancel.is_set() or ctx.stop_new.is_set()):
            why = run.stop_reason or ctx.stop_reason or "interrupted"
            return Result(url=shown, path=rel, status="failed").fail(
                CancelledError(f"not started ({why}): {shown}", url=shown))
        name = partial_name(url, rel)
        meta_name = name[:-5] + ".json"
        if resume:  # claim an earlier run's partial; rename lets one attempt win it
            _move(shared / name, ctx.attempt_dir / name)
            _move(shared / meta_name, ctx.attempt_dir / meta_name)
            ctx.partials.add(name)
        try:
            result = download_one(ctx, run.client(), url, rel, sha, first=first)
        except Exception as exc:
            result = Result(url=shown, path=rel, status="failed").fail(exc)
        if result.status == "ok":
            journal.write(result.record())
        elif result.status == "failed":  # hand the partial back for a later run to resume
            _move(ctx.attempt_dir / name, shared / name)
            _move(ctx.attempt_dir / meta_name, shared / meta_name)
    return _post_item(run, ctx, result)


def _post_item(run: _WorkerRun, ctx: _AttemptContext, result: Result) -> Result:
    if run.chain and result.status != "failed" and result.path:
        from ..transforms import run_chain

        try:
            result.outputs = run_chain(run.chain, result.path, ctx.dest)
        except Exception as exc:
            _post_failed(result, exc)
    return result


def _loop_items(run: _WorkerRun, ctx: _AttemptContext, shared: Path, journal: _Journal,
                items: list[_Item]) -> list[Future[Result]]:
    """A batch through ``multiplex.Multiplexer``, as a local run downloads: small files
    on one thread, everything else handed to the run's threads with the response read.

    Items with a finished Result or a partial to resume go straight to the threads."""
    futures: list[Future[Result]] = [Future() for _ in items]
    index: dict[int, int] = {}
    jobs: list[tuple[Job, str]] = []
    for i, item in enumerate(items):
        url, rel, sha, resume, done = item
        if done is not None or resume:
            _chain(run.pool.submit(_run_item, run, ctx, shared, journal, item), futures[i])
            continue
        job = Job(url=url, path=rel, sha256=sha)
        index[id(job)] = i
        jobs.append((job, rel))
    cap = capacity_of(run.config)
    def finished(result: Result, job: Job) -> None:
        i = index[id(job)]
        if result.status == "ok":
            journal.write(result.record())
        if run.chain and result.status == "ok":
            _chain(run.pool.submit(_post_item, run, ctx, result), futures[i])
        else:
            futures[i].set_result(result)

    def handoff(job: Job, rel: str, first: Prefetched | ItemError | None) -> None:
        i = index[id(job)]
        _chain(run.pool.submit(handed_item, items[i], first), futures[i])

    def handed_item(item: _Item, first: Prefetched | ItemError | None) -> Result:
        try:
            return _run_item(run, ctx, shared, journal, item, first)
        finally:
            loop.handed_done(run.client().take_idle())

    started: set[int] = set()

    def feed() -> Iterator[tuple[Job, str]]:
        for job, rel in jobs:
            started.add(index[id(job)])
            yield job, rel

    loop = Multiplexer(ctx, capacity=cap, done=finished,
                       handoff=handoff)
    loop.run(feed())
    why = run.stop_reason or ctx.stop_reason or "interrupted"
    for job, rel in jobs:  # never started (cancelled, or stopped on a full disk)
        if index[id(job)] not in started:
            shown = redact(job.url)
            futures[index[id(job)]].set_result(Result(url=shown, path=rel, status="failed").fail(
                CancelledError(f"not started ({why}): {shown}", url=shown)))
    return futures


def _chain(source: Future[Result], target: Future[Result]) -> None:
    def copy(f: Future[Result]) -> None:
        exc = f.exception()
        if exc is not None:
            target.set_exception(exc)
        else:
            target.set_result(f.result())

    source.add_done_callback(copy)


def _run_batch(spec: _Spec, number: int, packed: bytes | list[_Item]
               ) -> tuple[list[Result], str | None]:
    """Worker side of one batch: (one Result per item, in order; why new items stopped).

    ``packed`` is the pickled list of items (Dask would otherwise walk every tuple
    looking for nested futures)."""
    items: list[_Item] = pickle.loads(packed) if isinstance(packed, bytes) else packed
    run = _enter_run(spec)
    try:
        dest = Path(spec.dest)
        attempt = f"{spec.token}-{number}-{uuid.uuid4().hex[:8]}"
        shared = dest / PARTIAL_DIR
        ctx = _AttemptContext(config=spec.config, dest=dest, gate=run.gate, cancel=run.cancel,
                              stop_new=run.stop_new, clients=run.clients, dirs=run.dirs,
                              attempt_dir=shared / f".b-{attempt}")
        ctx.attempt_dir.mkdir(parents=True, exist_ok=True)
        journal = _Journal(dest / JOURNAL_DIR / f"{attempt}.jsonl")
        with run._lock:
            run.contexts[id(ctx)] = ctx
        try:
            if loop_eligible(spec.config):
                futures = _loop_items(run, ctx, shared, journal, items)
            else:
                futures = [run.pool.submit(_run_item, run, ctx, shared, journal, item)
                           for item in items]
            results = [f.result() for f in futures]
        finally:
            with run._lock:
                run.contexts.pop(id(ctx), None)
            journal.close()
            shutil.rmtree(ctx.attempt_dir, ignore_errors=True)
        if ctx.stop_reason is not None:
            with _RUNS_LOCK:
                run.stop_reason = run.stop_reason or ctx.stop_reason
        return results, run.stop_reason
    finally:
        _leave_run(run)
