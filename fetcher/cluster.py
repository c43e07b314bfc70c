"""Dask distributed: ``parallel_map(mode="dask")`` and downloads spread over a cluster.

fetcher does not build a cluster of its own; it runs on Dask distributed, which is
imported only here and only when asked for (``pip install 'fetcher[dask]'``).

``parallel_map(fn, items, mode="dask", address=...)``
    ``_DaskBackend`` plugs into the executors driver, so chunking, the bounded window,
    ordering, per-item ``TaskError``\\ s with the worker's traceback and progress are the
    same as on the local backends. A chunk is one Dask task; at most two per worker
    thread are submitted at a time. A worker that dies mid-chunk: Dask runs the chunk
    again on another worker (items of that chunk that had finished run twice, their
    results are taken once). When Dask gives up on a chunk (``KilledWorker``), its
    items are retried one at a time, alone (Dask also fails tasks merely queued on a
    dying worker), and only an item that kills workers on its own gets a
    ``WorkerLostError``.

``fetch(urls, dest, cluster=ADDRESS)`` / ``fetcher get --cluster ADDRESS``
    The client reads and checks the list, names every item and applies the manifest's
    skip logic and ``--on-exists`` exactly as a local run does, then cuts the planned
    items into batches. Each batch is one Dask task: the worker downloads it with its
    own thread pool (``--threads`` per worker process, shared by the batches it runs,
    one keep-alive pool per thread) straight into DEST, which must be the same shared
    directory on every machine, runs ``--post`` there, and returns the Results. The
    client writes the manifest, feeds the sink and draws progress. At most two batches
    per worker thread are in flight.

Lost workers, and why nothing is duplicated or corrupted
    Dask re-runs a batch whose worker died on another worker. Every decision that could
    differ between two attempts (the name, ``--on-exists``) was made by the client
    before the batch left, so a second attempt downloads the same URLs to the same
    names. Each attempt streams into its own directory,
    ``DEST/.fetcher/partial/.b-<run>-<batch>-<attempt>/``, so two attempts (a worker
    declared dead that is in fact still running) never write into one partial file;
    publishing is ``os.replace`` of a complete, verified file, so the last attempt to
    finish leaves one whole copy. A resumable partial of an earlier run is claimed by
    ``rename`` (only one attempt can win it) and handed back when an item fails. The
    client records a batch once, from the one result Dask delivers, so each URL gets one
    manifest line. Workers also journal every published file in
    ``DEST/.fetcher/cluster/`` as it lands, so a client killed mid-run does not make the
    next run treat those files as foreign (and rename around them).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import itertools
import json
import math
import os
import pickle
import queue
import shutil
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .config import FetchConfig
from .download import PARTIAL_DIR, HostGate, RunContext, SkipExisting, download_one, partial_name
from .downloader import Fetcher, _file_size, _post_failed, _Run
from .errors import CancelledError, ConfigError, ItemError, WorkerLostError
from .executors import _Event, _Task, split_unpicklable, usable_cpu_count
from .http import HttpClient, redact
from .models import Job, Report, Result
from .progress import NullProgress, Progress

if TYPE_CHECKING:
    from .writers import WriteSummary

__all__ = [
    "ClusterAddress",
    "get_client",
    "load_on_cluster",
    "process_on_cluster",
    "shutdown_clients",
]

ClusterAddress = Any
"""A scheduler address (``"tcp://host:8786"``), a ``distributed.Client``, or None (the
process's default client if there is one, else a LocalCluster on this machine)."""

INSTALL_HINT = "pip install 'fetcher[dask]'"
JOURNAL_DIR = Path(".fetcher") / "cluster"
"""Per-attempt journals of published files (``<run>-<batch>-<attempt>.jsonl``)."""
_BATCH_MIN, _BATCH_MAX, _BATCH_UNSIZED = 16, 500, 250
_PICKLE = pickle.HIGHEST_PROTOCOL


def _distributed() -> Any:
    """``distributed``, imported on first use; ConfigError saying how to install it."""
    try:
        import distributed
    except ImportError as exc:
        raise ConfigError(f"Dask distributed is not installed; --cluster and mode='dask' "
                          f"need it: {INSTALL_HINT}") from exc
    return distributed


# --------------------------------------------------------------------------- clients

_LOCK = threading.Lock()
_CLIENTS: dict[tuple[str, int], tuple[Any, Any]] = {}  # key -> (client, owned LocalCluster)


def get_client(address: ClusterAddress = None, *, workers: int | None = None,
               timeout: float = 10.0) -> Any:
    """A ``distributed.Client`` for ``address``, kept open for the life of the process.

    ``address`` is a scheduler address (``"tcp://10.0.0.5:8786"``; a bare ``host:port``
    works too), an existing ``Client`` (used as is), or None: the process's default
    client if one exists, else a ``LocalCluster`` of ``workers`` single-threaded worker
    processes (default: the usable CPU count) on 127.0.0.1, started once. Raises
    ConfigError when Dask is missing, the scheduler cannot be reached, or no worker
    joins within ``timeout`` seconds.
    """
    distributed = _distributed()
    if isinstance(address, distributed.Client):
        return address
    if address is not None and not isinstance(address, str):
        raise ConfigError(f"cluster address must be a string or a distributed.Client, "
                          f"got {type(address).__name__}")
    if address is None:
        with contextlib.suppress(ValueError):
            return distributed.default_client()
    key = (address or "local", workers or 0)
    with _LOCK:
        got = _CLIENTS.get(key)
        if got is not None and got[0].status in ("running", "connecting", "newly-created"):
            return got[0]
        cluster = None
        try:
            if address is None:
                cluster = distributed.LocalCluster(
                    n_workers=workers or usable_cpu_count(), threads_per_worker=1,
                    processes=True, host="127.0.0.1", dashboard_address=":0")
                client = distributed.Client(cluster, set_as_default=False)
            else:
                client = distributed.Client(address, timeout=f"{timeout}s",
                                            set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            if cluster is not None:
                cluster.close()
            raise ConfigError(f"cannot reach the Dask scheduler at {address}: "
                              f"{type(exc).__name__}: {exc}") from None
        _CLIENTS[key] = (client, cluster)
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (TimeoutError, OSError) as exc:
        raise ConfigError(f"the Dask cluster at {address or 'local'} has no workers "
                          f"(waited {timeout:g} s): {exc}") from None
    return client


def shutdown_clients() -> None:
    """Close every client (and LocalCluster) ``get_client`` opened (also run at exit)."""
    with _LOCK:
        items = list(_CLIENTS.values())
        _CLIENTS.clear()
    for client, cluster in items:
        with contextlib.suppress(Exception):
            client.close(timeout=5)
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close(timeout=5)


atexit.register(shutdown_clients)


def _worker_threads(client: Any) -> int:
    return max(1, int(sum(client.nthreads().values())))


# --------------------------------------------------------------------------- parallel_map

_FN_CACHE: dict[str, Callable[[Any], Any]] = {}
_FN_LOCK = threading.Lock()


def _dask_run(fid: str, payload: bytes, items: bytes, stop: bool) -> tuple[bytes, int]:
    """Worker side of one chunk: (pickled ("done", values, errors, elapsed) or
    ("fnerr", text), worker pid)."""
    from .executors import _dump_result, _run_tracked

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


# --------------------------------------------------------------------------- shared DEST


def _probe(dest: str, marker: str, token: str, post: tuple[str, ...]) -> str | None:
    """Run on every worker: can it see the client's DEST and load the transforms?"""
    from . import __version__

    try:
        found = (Path(dest) / marker).read_text(encoding="utf-8")
    except OSError as exc:
        return f"cannot read {dest}/{marker} ({exc.strerror or exc})"
    if found != token:
        return f"{dest} is a different directory there (not shared)"
    if not os.access(dest, os.W_OK):
        return f"{dest} is not writable there"
    if post:
        from .transforms import parse_chain

        try:
            parse_chain(post)
        except Exception as exc:
            return f"--post: {exc}"
    return f"version:{__version__}"


def check_shared_dest(client: Any, dest: Path, post: Sequence[str] = ()) -> None:
    """Raise ConfigError unless every worker sees ``dest`` (same path, writable, the same
    directory as here) and can load the ``post`` transforms and this fetcher version."""
    from . import __version__

    token = uuid.uuid4().hex
    marker = Path(".fetcher") / f"probe-{token}"
    (dest / ".fetcher").mkdir(parents=True, exist_ok=True)
    (dest / marker).write_text(token, encoding="utf-8")
    try:
        answers = client.run(_probe, str(dest), str(marker), token, tuple(post),
                             on_error="return")
    finally:
        with contextlib.suppress(OSError):
            (dest / marker).unlink()
    bad = []
    for worker, answer in sorted(answers.items()):
        if isinstance(answer, BaseException):
            bad.append(f"{worker}: {type(answer).__name__}: {answer} (is fetcher installed "
                       "there?)")
        elif answer != f"version:{__version__}":
            bad.append(f"{worker}: " + (f"fetcher {answer[8:]} there, {__version__} here"
                                        if str(answer).startswith("version:") else str(answer)))
    if bad:
        raise ConfigError(
            f"{len(bad)} of {len(answers)} Dask workers cannot work in {dest}: "
            + "; ".join(bad[:5]) + ". The directory must be on storage every worker mounts "
            "at the same path, and every worker needs the same fetcher installed.")


# --------------------------------------------------------------------------- worker side


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


@dataclasses.dataclass
class _AttemptContext(RunContext):
    """A RunContext whose partial files live in this attempt's private directory."""

    attempt_dir: Path = Path()

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
            from .transforms import parse_chain

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
              item: _Item) -> Result:
    """Download one planned item (or take its finished Result) and post-process it."""
    url, rel, sha, resume, done = item
    if done is not None:
        result = done
    else:
        shown = redact(url)
        if ctx.cancel.is_set() or ctx.stop_new.is_set():  # as a local run's queued items
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
            result = download_one(ctx, run.client(), url, rel, sha)
        except Exception as exc:
            result = Result(url=shown, path=rel, status="failed").fail(exc)
        if result.status == "ok":
            journal.write(result.record())
        elif result.status == "failed":  # hand the partial back for a later run to resume
            _move(ctx.attempt_dir / name, shared / name)
            _move(ctx.attempt_dir / meta_name, shared / meta_name)
    if run.chain and result.status != "failed" and result.path:
        from .transforms import run_chain

        try:
            result.outputs = run_chain(run.chain, result.path, ctx.dest)
        except Exception as exc:
            _post_failed(result, exc)
    return result


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
                              stop_new=run.stop_new, clients=run.clients, _dirs=run.dirs,
                              attempt_dir=shared / f".b-{attempt}")
        ctx.attempt_dir.mkdir(parents=True, exist_ok=True)
        journal = _Journal(dest / JOURNAL_DIR / f"{attempt}.jsonl")
        with run._lock:
            run.contexts[id(ctx)] = ctx
        try:
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


# --------------------------------------------------------------------------- client side


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


def _dir_is_new(dest: Path, parent: str) -> bool:
    """Whether ``DEST/parent`` is absent, or empty but for fetcher's own ``.fetcher``.

    Checked when the first item is planned into it, before any of this run's files can
    land there: every later entry is then this run's own (the names were all claimed
    here), so no file in it can be foreign to --on-exists and no lstat is needed.
    """
    try:
        with os.scandir(dest / parent if parent else dest) as entries:
            return all(not parent and e.name == ".fetcher" for e in entries)
    except FileNotFoundError:
        return True
    except OSError:
        return False


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
        self._fresh: dict[str, bool] = {}  # directory -> held nothing when first planned

    # -- planning (client) ----------------------------------------------------------
    def _open(self, stack: contextlib.ExitStack) -> Any:
        manifest = super()._open(stack)
        jdir = self.dest / JOURNAL_DIR
        with contextlib.suppress(OSError):  # (the base class loaded them into the index)
            self._journals = sorted(jdir.glob("*.jsonl"))
        return manifest

    def _finish(self, result: Result) -> None:
        if self.post and result.status != "failed" and result.path:
            self._ready.append(((result.url, result.path, None, False, result), result.extra))
            return
        self._record(result)

    def _item(self, job: Job, rel: str) -> tuple[_Item, Any] | None:
        """Apply --on-exists here, so every attempt of a batch writes the same name."""
        shown = redact(job.url)
        parent = rel.rpartition("/")[0]
        fresh = self._fresh.get(parent)
        if fresh is None:
            fresh = self._fresh[parent] = _dir_is_new(self.dest, parent)
        elif fresh:  # nothing foreign can be there: no lstat (the first item checked it)
            return (job.url, rel, job.sha256, False, None), job.extra
        owned = self.index.size(shown, rel) is not None
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
        resume = partial_name(job.url, rel) in self.ctx.partials
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
        threading.Thread(target=self._watch_cancel, daemon=True,
                         name="fetcher-cluster-cancel").start()
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

    def _watch_cancel(self) -> None:
        """Tell the workers as soon as someone sets ``cancel`` (the CLI's Ctrl-C)."""
        while not self._ended.is_set():
            if self.ctx.cancel.wait(0.2):
                self._broadcast(_cancel_run)
                return

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


# --------------------------------------------------------------------------- process


def process_on_cluster(paths: Sequence[str | os.PathLike[str]], specs: Sequence[str], *,
                       dest: str | os.PathLike[str] | None = None,
                       address: ClusterAddress = None,
                       progress: Progress | None = None) -> Report:
    """``fetcher process --cluster``: ``process_paths`` with the chains run on Dask workers.

    Same Results, in the same order, as ``transforms.process_paths``; every path and
    ``dest`` must be reachable at the same absolute path from every worker.
    """
    from .transforms import parse_chain, process_paths

    parse_chain(specs)  # a bad spec is a usage error before the cluster is contacted
    root = Path(os.path.abspath(dest if dest is not None else os.getcwd()))
    client = get_client(address)
    check_shared_dest(client, root, specs)
    return process_paths(paths, specs, dest=root, progress=progress, address=client)


# --------------------------------------------------------------------------- write


def _load_one(path: str, sink_url: str, table: str, workers: int, key: str | None,
              batch_size: int | None) -> WriteSummary:
    """Worker side of ``fetcher write --cluster``: one input file, one exactly-once load."""
    from .writers import load_file

    return load_file(Path(path), sink_url, table=table, workers=workers, key=key,
                     progress=None, batch_size=batch_size)


def _absolute_sink(url: str) -> str:
    """``sqlite:///relative.db`` names a file relative to *this* process: make it absolute."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        rest, sep, query = url[len(prefix):].partition("?")
        return prefix + os.path.abspath(rest) + sep + query
    return url


def load_on_cluster(input_path: str | os.PathLike[str], sink_url: str, *,
                    address: ClusterAddress = None, table: str | None = None,
                    workers: int = 2, key: str | None = None, batch_size: int | None = None,
                    progress: Progress | None = None) -> WriteSummary:
    """``fetcher write --cluster``: load files into a sink from Dask workers.

    ``input_path`` is one file or a directory of them (``.csv .tsv .jsonl .ndjson
    .parquet``, optionally ``.gz``; names starting with ``.`` or ``_`` are ignored).
    Each file is one ``load_file`` on a worker, with its own load id and ledger, so it
    is exactly once on its own and a load re-run after a lost worker continues after
    the batches it committed. The first file loads alone (it creates the table), the
    others then run in parallel, one per worker thread. ``table`` defaults to the file
    or directory name. Inputs and the sink must be reachable from every worker (a
    relative ``sqlite:///`` path is made absolute here). One file gains nothing but
    placement; the parallelism is across files.
    """
    from .writers import WriteSummary, default_table, redact_url
    from .writers.load import detect_format

    src = Path(os.path.abspath(input_path))
    if src.is_dir():
        files = []
        for p in sorted(src.iterdir()):
            if p.name.startswith((".", "_")) or not p.is_file():
                continue
            with contextlib.suppress(ConfigError):
                detect_format(p)
                files.append(p)
        if not files:
            raise ConfigError(f"{src}: no .csv, .tsv, .jsonl or .parquet files in it")
    elif src.is_file():
        detect_format(src)
        files = [src]
    else:
        raise ConfigError(f"input not found: {src}")
    table = table or default_table(src)
    sink_url = _absolute_sink(sink_url)
    client = get_client(address)
    prog: Progress = progress if progress is not None else NullProgress()
    prog.start(len(files), unit="file", desc=table)
    t0 = time.perf_counter()
    summaries: list[WriteSummary] = []
    try:
        def submit(p: Path) -> Any:
            return client.submit(_load_one, str(p), sink_url, table, workers, key, batch_size,
                                 pure=False, key=f"fetcher-write-{uuid.uuid4().hex}")

        summaries.append(submit(files[0]).result())
        prog.update(1)
        dist = _distributed()
        window = max(1, _worker_threads(client))
        rest = iter(files[1:])
        running = dist.as_completed([submit(p) for p in itertools.islice(rest, window)],
                                    loop=client.loop)
        for fut in running:
            summaries.append(fut.result())
            prog.update(1)
            nxt = next(rest, None)
            if nxt is not None:
                running.add(submit(nxt))
    finally:
        prog.close()
    first = summaries[0]
    return WriteSummary(
        rows=sum(s.rows for s in summaries), batches=sum(s.batches for s in summaries),
        skipped_batches=sum(s.skipped_batches for s in summaries),
        skipped_rows=sum(s.skipped_rows for s in summaries),
        seconds=time.perf_counter() - t0, workers=first.workers,
        sink=redact_url(sink_url), table=table,
        load_id=first.load_id if len(summaries) == 1 else f"{len(summaries)} loads")
