"""Many files: a thread pool over a streamed URL list, a bounded window, one manifest.

The main thread reads the list, names each item, skips what earlier runs completed
(no request, not even a HEAD) and submits the rest to ``threads`` workers, never
more than ``config.in_flight`` at a time. Each worker owns one ``HttpClient``.
Finished items flow through optional post-processing (a process pool) and are then
journaled, counted and sent to the optional sink.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .config import FetchConfig
from .download import HostGate, RunContext, SkipExisting, download_one
from .errors import (
    CancelledError,
    ConfigError,
    ItemError,
    ProcessingError,
    TargetExistsError,
    UnsafePathError,
)
from .fanout import fanout_width
from .http import HttpClient, Prefetched, config_from_session, redact
from .manifest import MANIFEST_NAME, PUBLISHED_NAME, CompletedIndex, ManifestWriter
from .models import Job, Report, Result, encode_record
from .multiplex import Multiplexer, capacity_of, loop_eligible
from .naming import (
    NameAllocator,
    filename_from_content_disposition,
    path_from_url,
    sanitize_relpath,
    variant,
)
from .progress import NullProgress, Progress
from .sources import iter_jobs

if TYPE_CHECKING:
    from concurrent.futures import Future

UrlSource = str | os.PathLike[str] | IO[str] | Iterable[str | Job | Mapping[str, Any]]


class Fetcher:
    """A reusable downloader: one configuration, many runs.

    >>> report = Fetcher(FetchConfig(threads=16)).run("urls.txt", "out")
    """

    def __init__(self, config: FetchConfig | None = None, *, progress: Progress | None = None,
                 post: Sequence[str] = (), processes: int | None = None,
                 sink: str | None = None, sink_table: str = "downloads",
                 cluster: Any = None, cluster_batch: int | None = None) -> None:
        self.config = config or FetchConfig()
        self.progress: Progress = progress or NullProgress()
        self.post = tuple(post)
        self.processes = processes
        self.sink = sink
        self.sink_table = sink_table
        self.cluster = cluster
        """Dask scheduler address or Client: download on its workers (``fetcher.cluster``)."""
        self.cluster_batch = cluster_batch
        """Items per Dask task with ``cluster`` (None: from the list size, 16-500)."""
        if self.post:
            from .transforms import parse_post

            for spec in self.post:  # fail on a bad --post before any download
                parse_post(spec)

    def run(self, urls: UrlSource, dest: str | os.PathLike[str] = ".", *,
            cancel: threading.Event | None = None) -> Report:
        """Download every URL of ``urls`` into ``dest``; failures are collected, not raised.

        ``urls`` is a list file path, ``"-"`` (stdin), an open text file, or an iterable of
        URLs, ``Job``s or dicts with a ``url`` key. A malformed entry raises
        ``UrlListError`` before any download when the input can be read twice (files,
        stdin, lists); a generator is validated as it is consumed. Setting ``cancel``
        stops the run as Ctrl-C does: no new items, in-flight transfers abort, partial
        files stay for resume, and the Report says ``interrupted``.
        """
        dest_path = Path(dest)
        with contextlib.ExitStack() as stack:
            jobs, total = _prepare(urls, stack)
            if self.cluster is not None:
                from .cluster import run_cluster

                return run_cluster(self, jobs, total, dest_path, cancel or threading.Event())
            return _Run(self, dest_path, cancel or threading.Event()).execute(jobs, total)


def fetch(urls: UrlSource, dest: str | os.PathLike[str] = ".", *,
          progress: Progress | None = None, post: Sequence[str] = (),
          processes: int | None = None, sink: str | None = None,
          session: Any = None, config: FetchConfig | None = None,
          cancel: threading.Event | None = None, cluster: Any = None,
          **options: Any) -> Report:
    """Download ``urls`` into ``dest`` concurrently and return a Report.

    ``options`` are ``FetchConfig`` fields (``threads``, ``retries``, ``timeout``,
    ``headers``, ``auth``, ``proxies``, ``verify``, ...). ``session`` takes headers,
    auth, proxies and TLS settings from a ``requests.Session``. ``post`` names
    transforms run on a process pool as files complete; ``sink`` is a writer URL that
    receives every manifest record. ``cluster`` (a Dask scheduler address such as
    ``"tcp://10.0.0.5:8786"``, or a ``distributed.Client``) downloads and post-processes
    on that cluster's workers into ``dest``, which every worker must reach at the same
    path; the manifest and sink are written here (see ``fetcher.cluster``).
    """
    try:
        cfg = (config or FetchConfig()).replace(**options) if options else (
            config or FetchConfig())
    except TypeError as exc:
        raise ConfigError(f"unknown fetch option: {exc}") from exc
    if session is not None:
        cfg = config_from_session(session, cfg)
    fetcher = Fetcher(cfg, progress=progress, post=post, processes=processes, sink=sink,
                      cluster=cluster)
    return fetcher.run(urls, dest, cancel=cancel)


def _prepare(urls: UrlSource,
             stack: contextlib.ExitStack) -> tuple[Iterable[Job], int | None]:
    """Validate the whole list up front where it can be read twice; count it."""
    if isinstance(urls, str) and urls == "-":
        import shutil
        import sys
        import tempfile

        spool = stack.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8"))  # noqa: SIM115
        shutil.copyfileobj(sys.stdin, spool)
        spool.seek(0)
        kept, total = _validate(iter_jobs(_named(spool, "<stdin>")))
        spool.seek(0)
        return (kept if kept is not None else iter_jobs(_named(spool, "<stdin>"))), total
    if isinstance(urls, str) and "://" in urls and not os.path.exists(urls):
        return iter_jobs([urls]), 1  # one URL given where a list was expected: fine
    if isinstance(urls, str | os.PathLike):
        path = Path(urls)
        if not path.is_file():
            raise ConfigError(f"URL list not found: {path}")
        kept, total = _validate(iter_jobs(path))
        return (kept if kept is not None else iter_jobs(path)), total
    if isinstance(urls, list | tuple):
        jobs = list(iter_jobs(urls))
        return jobs, len(jobs)
    return iter_jobs(urls), None


_KEEP_PARSED = 20_000
"""Lists up to this long are parsed once and kept (a few MB); longer ones are re-read."""


def _validate(jobs: Iterator[Job]) -> tuple[list[Job] | None, int]:
    """Run the parser over the whole list (raising on a bad line); count it."""
    kept: list[Job] | None = []
    total = 0
    for job in jobs:
        total += 1
        if kept is not None:
            kept.append(job)
            if total > _KEEP_PARSED:
                kept = None
    return kept, total


class _Named:
    """A text stream with a ``name`` for error messages."""

    def __init__(self, fh: IO[str], name: str) -> None:
        self._fh, self.name = fh, name

    def __iter__(self) -> Iterator[str]:
        return iter(self._fh)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._fh, attr)


def _named(fh: IO[str], name: str) -> Any:
    return _Named(fh, name)


class _Run:
    """The state of one run; lives for one ``Fetcher.run`` call."""

    def __init__(self, fetcher: Fetcher, dest: Path, cancel: threading.Event) -> None:
        cfg = fetcher.config
        self.fetcher, self.cfg, self.dest = fetcher, cfg, dest
        self.progress = fetcher.progress
        self.report = Report()
        gate_limit = cfg.per_host if cfg.per_host is not None and cfg.per_host < cfg.threads \
            else None
        self.ctx = RunContext(config=cfg, dest=dest, cancel=cancel,
                              gate=HostGate(limit=gate_limit, rate=cfg.rate, cancel=cancel))
        self.ctx.trust_fresh = not (fetcher.post or fetcher.sink)
        self.names = NameAllocator()
        self.index = CompletedIndex(by_url=cfg.content_disposition)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._clients: list[HttpClient] = []
        self._window = threading.BoundedSemaphore(cfg.in_flight)
        self._slot_done: Callable[[], None] = self._window.release
        self._looped = False
        self.pipeline: Any = None
        self.writer: Any = None
        self._sink_failed = False
        self.published: ManifestWriter | None = None
        self.manifest: ManifestWriter | None = None
        self._ended = threading.Event()
        self._watchers: list[threading.Thread] = []
        self._fanout: Any = None
        self._accountant: Callable[[Result, dict[str, Any] | None], None] = self._account

    # -- setup -------------------------------------------------------------------------
    def _open(self, stack: contextlib.ExitStack, total: int | None) -> ManifestWriter:
        try:
            self.ctx.partial_dir.mkdir(parents=True, exist_ok=True)
            self.ctx.partials.update(os.listdir(self.ctx.partial_dir))
        except OSError as exc:
            raise ConfigError(f"cannot create output directory {self.dest}: {exc}") from exc
        manifest_path = self.cfg.manifest or self.dest / ".fetcher" / MANIFEST_NAME
        published_path = self.dest / ".fetcher" / PUBLISHED_NAME
        # Loaded under --force too: it says which files are ours to replace, not rename.
        self.index.load(manifest_path).load(published_path)
        # Files a --cluster run's workers published before its client died are ours too.
        for journal in sorted((self.dest / ".fetcher" / "cluster").glob("*.jsonl")):
            self.index.load(journal)
        manifest = ManifestWriter(manifest_path)
        stack.callback(manifest.close)
        # A failed item's line needs json (Result.json_line): import it now, while this
        # process can still open files; items can fail for want of descriptors, and an
        # import at that moment would fail too (taken for a manifest write error).
        encode_record(None)
        self.report.manifest = str(manifest_path)
        self.manifest = manifest
        # Forked here, with the journal open and before the sink's or the progress bar's
        # threads exist: a child inherits no lock another thread might hold.
        width = self._fanout_width(total)
        if width > 1:
            from .fanout._parent import Fanout

            fan = stack.enter_context(Fanout(self, width))
            self._fanout = fan if fan.children else None  # no fork was possible
        # The sink opens before and closes after the post-processing pipeline (the stack
        # unwinds in reverse), so records of items still being processed are not lost.
        if self.fetcher.sink:
            from .writers import MANIFEST_SCHEMA, ParallelWriter, open_sink

            sink = open_sink(self.fetcher.sink, table=self.fetcher.sink_table)
            # Database sinks upsert on url, so re-runs update rows instead of adding them;
            # shard directories cannot upsert and get a new set of shards per run.
            self.writer = ParallelWriter(
                sink, key="url" if sink.supports_key else None, table=self.fetcher.sink_table,
                schema=MANIFEST_SCHEMA, flush_interval=2.0)
            stack.callback(self._close_sink)
        if self.fetcher.post:
            from .transforms import PostPipeline

            # Downloaded-but-unprocessed files are journaled here at publish time, so a
            # run killed before its post-processing ends does not re-download them.
            self.published = ManifestWriter(published_path)
            stack.callback(self.published.close)
            self.pipeline = stack.enter_context(
                PostPipeline(self.fetcher.post, self.dest, processes=self.fetcher.processes))
        return manifest

    def _close_sink(self) -> None:
        from .errors import SinkError

        try:
            summary = self.writer.close()
            self.report.sink = summary.as_dict()
        except SinkError as exc:
            if not self._sink_failed:
                self.ctx.stop(f"sink failed: {exc}")
        finally:
            self.writer.sink.close()

    # -- the run -------------------------------------------------------------------------
    def execute(self, jobs: Iterable[Job], total: int | None) -> Report:
        started = time.monotonic()
        try:
            with contextlib.ExitStack() as stack:
                self.manifest = self._open(stack, total)
                self.progress.start(total, unit="file", desc="fetch")
                self._run_items(jobs, total)
        finally:
            self._ended.set()
            for watcher in self._watchers:  # woken by _ended: gone at once, unless busy
                watcher.join(1.0)            # telling a cluster's workers to cancel
            self.report.elapsed_s = time.monotonic() - started
            self.report.interrupted = self.ctx.cancel.is_set()
            self.report.stopped = self.ctx.stop_reason
            self.progress.close()
        return self.report

    def _run_items(self, jobs: Iterable[Job], total: int | None) -> None:
        """Download every planned item on this machine (cluster.py overrides).

        Runs the selector loop of ``multiplex.py`` with the thread pool behind it for
        what the loop hands over, or the thread pool alone when options need it. For a
        long list on several cores the loop here takes its share of the transfers and
        the worker processes of ``fanout`` the rest.
        """
        fan = self._fanout
        pool = _Pool(fan.share if fan is not None else self.cfg.threads)
        try:
            if fan is not None:
                try:
                    self._multiplex(fan.items(self._planned(jobs)), pool, share=fan.share,
                                    feed=fan)
                except BaseException:
                    self._interrupt()  # passed on to the workers by finish()
                    fan.finish()
                    raise
                fan.finish()  # the workers, until each has ended
            elif loop_eligible(self.cfg):
                self._multiplex(self._planned(jobs), pool)
            else:
                self._schedule(jobs, pool)
            self._drain(pool)
        except KeyboardInterrupt:
            self._interrupt()
            self._drain(pool)
            raise
        finally:
            pool.shutdown(wait=False)  # after an error: threads end once their items do
            for client in self._clients:
                client.close()

    def _interrupt(self) -> None:
        self.ctx.cancel.set()
        self.ctx.abort_all()

    def _drain(self, pool: _Pool) -> None:
        """Wait for in-flight items; an interrupt here aborts transfers and keeps waiting."""
        while True:
            try:
                pool.shutdown(wait=True)
                return
            except KeyboardInterrupt:
                self._interrupt()

    def _schedule(self, jobs: Iterable[Job], pool: _Pool) -> None:
        cancel, stop_new = self.ctx.cancel, self.ctx.stop_new
        self._watch()
        for job in jobs:
            if cancel.is_set() or stop_new.is_set():
                break
            item = self._plan(job)
            if item is None:
                continue
            while not self._window.acquire(timeout=0.2):
                if cancel.is_set():
                    return
            pool.submit(self._work, job, item)

    def _fanout_width(self, total: int | None) -> int:
        """Processes to share the transfers among (1: this one alone)."""
        if self.fetcher.post or self.cfg.content_disposition or not loop_eligible(self.cfg):
            return 1  # naming by the server, and --post's process pool, stay here
        return fanout_width(self.cfg, total, done=len(self.index))

    def _multiplex(self, items: Iterator[tuple[Job, str]], pool: _Pool, *,
                   share: int | None = None, feed: Any = None) -> None:
        """The loop over ``items`` (planned already), on ``share`` connections (default:
        the run's), with ``pool`` behind it; ``feed`` as ``Multiplexer`` takes it."""
        cap = share if share is not None else capacity_of(self.cfg)

        def done(result: Result, job: Job) -> None:
            result.extra = job.extra
            self._finish(result)

        def handoff(job: Job, rel: str, first: Any) -> None:
            pool.submit(self._work, job, rel, first)

        def slot_done() -> None:
            client = getattr(self._local, "client", None)
            loop.handed_done(client.take_idle() if client is not None else [])

        loop = Multiplexer(self.ctx, capacity=cap, done=done, handoff=handoff,
                           feed=feed)
        self._slot_done, self._looped = slot_done, True
        self._watch()
        loop.run(items)

    def _planned(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, str]]:
        """Items that need a transfer, with --on-exists applied (for the loop)."""
        for job in jobs:
            rel = self._plan(job)
            if rel is None:
                continue
            shown = redact(job.url)
            owned = bool(len(self.index)) and self.index.size(shown, rel) is not None
            try:
                rel = self._resolve_existing(rel, owned=owned)
            except SkipExisting:
                self._finish(Result(url=shown, path=rel, status="skipped", extra=job.extra,
                                    bytes=_file_size(self.dest / rel) or 0))
                continue
            except ItemError as exc:
                self._finish(Result(url=shown, path=rel, status="failed", extra=job.extra)
                             .fail(exc))
                continue
            yield job, rel

    def _watch(self) -> None:
        """Start the thread that acts on ``cancel`` (``_cancelled``) during the run."""
        watcher = threading.Thread(target=self._watch_cancel, daemon=True,
                                   name="fetcher-cancel")
        self._watchers.append(watcher)
        watcher.start()

    def _watch_cancel(self) -> None:
        """Act on ``cancel`` (the CLI's Ctrl-C, a library caller's event) within 50 ms.
        It waits on the run's end, not on ``cancel``, so the end wakes it at once: gone
        when the run returns, a library caller's next run may fork its processes."""
        while not self._ended.wait(0.05):
            if self.ctx.cancel.is_set():
                self._cancelled()
                return

    def _cancelled(self) -> None:
        """Abort in-flight transfers."""
        self.ctx.abort_all()

    def _plan(self, job: Job) -> str | None:
        """The item's relative path, or None when it is finished here already."""
        shown = redact(job.url)
        try:
            rel = sanitize_relpath(job.path, url=shown) if job.path else path_from_url(job.url)
        except UnsafePathError as exc:
            self._finish(Result(url=shown, path=job.path, status="failed", extra=job.extra)
                         .fail(exc))
            return None
        if not job.path and not self.cfg.force and (hit := self.index.find_url(shown)):
            rel = hit[0]  # named by the server last time; look for it there
        claimed = self.names.claim(job.url, rel)
        if claimed is None:
            return None  # the same URL to the same target again: fetched once
        if not self.cfg.force and len(self.index):
            size = self.index.size(shown, claimed)
            if size is None and self.cfg.on_exists == "rename":
                claimed, size = self._renamed_earlier(job.url, shown, claimed)
            if size is not None and _file_size(self.dest / claimed) == size:
                self._finish(Result(url=shown, path=claimed, status="skipped", bytes=size,
                                    extra=job.extra))
                return None
        return claimed

    def _renamed_earlier(self, url: str, shown: str, rel: str) -> tuple[str, int | None]:
        """Where an earlier run put this URL when a foreign file held ``rel`` (name.N.ext).

        Only looked for while the names on disk are taken, so new items cost one stat.
        """
        n, candidate = 0, rel
        while os.path.lexists(self.dest / candidate) and n < 1000:
            n += 1
            candidate = variant(rel, n)
            size = self.index.size(shown, candidate)
            if size is not None:
                got = self.names.claim(url, candidate)
                return (got or candidate), size
        return rel, None

    # -- worker side ---------------------------------------------------------------------
    def _client(self) -> HttpClient:
        client: HttpClient | None = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = HttpClient(self.cfg, cancel=self.ctx.cancel)
            with self._lock:
                self._clients.append(client)
                self.ctx.clients.append(client)
        return client

    def _work(self, job: Job, rel: str, first: Prefetched | ItemError | None = None) -> None:
        shown = redact(job.url)
        try:
            try:
                if self.ctx.cancel.is_set() or (self.ctx.stop_new.is_set() and first is None):
                    if isinstance(first, Prefetched):
                        first.conn.close()
                    why = self.ctx.stop_reason or "interrupted"
                    result = Result(url=shown, path=rel, status="failed").fail(
                        CancelledError(f"not started ({why}): {shown}", url=shown))
                else:
                    result = self._download(job, rel, first)
                result.extra = job.extra
            except BaseException as exc:
                result = Result(url=shown, path=rel, status="failed", extra=job.extra).fail(exc)
            self._finish(result)  # once: a failure in there is not journaled twice
        finally:
            self._slot_done()

    def _download(self, job: Job, rel: str,
                  first: Prefetched | ItemError | None = None) -> Result:
        shown = redact(job.url)
        if not self._looped:  # the loop applied --on-exists already
            owned = self.index.size(shown, rel) is not None
            try:
                rel = self._resolve_existing(rel, owned=owned)
            except SkipExisting:
                return Result(url=shown, path=rel, status="skipped", bytes=_file_size(
                    self.dest / rel) or 0)
            except ItemError as exc:
                return Result(url=shown, path=rel, status="failed").fail(exc)
        retarget = None
        if self.cfg.content_disposition and not job.path:
            retarget = self._retarget(job.url, rel)
        return download_one(self.ctx, self._client(), job.url, rel, job.sha256, retarget,
                            first=first)

    def _resolve_existing(self, rel: str, *, owned: bool, look: bool = False) -> str:
        """Apply --on-exists to a file already at ``rel`` that this URL does not own
        (``look``: on disk even in a directory of the run's own, see ``DestDirs.exists``)."""
        if owned:
            self.ctx.planned(rel)
            return rel
        if not self.ctx.exists(rel, look=look):
            return rel
        policy = self.cfg.on_exists
        if policy == "skip":
            raise SkipExisting(rel)
        if policy == "error":
            raise TargetExistsError(f"{rel} already exists (--on-exists error)",
                                    url=rel)
        if policy == "rename":
            return self.names.reserve_free(
                rel, exists=lambda p: os.path.lexists(self.dest / p))
        return rel  # overwrite: replaced atomically once the new file is complete

    def _retarget(self, url: str, rel: str) -> Callable[[str | None], str]:
        chosen: list[str] = []

        def retarget(header: str | None) -> str:
            if chosen:
                return chosen[0]
            name = filename_from_content_disposition(header)
            new = rel
            if name:
                parent = os.path.dirname(rel)
                candidate = f"{parent}/{name}" if parent else name
                if candidate != rel:
                    claimed = self.names.claim(url, candidate)
                    # None: another item of the run holds candidate (this URL's, listed
                    # with that path, or another URL's this one got a variant of): what
                    # it put there, if anything, is looked up as d375229 always did.
                    new = self._resolve_existing(claimed or candidate, owned=False,
                                                 look=claimed is None)
            chosen.append(new)
            return new

        return retarget

    # -- completion ----------------------------------------------------------------------
    def _finish(self, result: Result) -> None:
        """Post-process (if asked), then journal, count, sink and report the item."""
        if self.pipeline is not None and result.status != "failed" and result.path:
            if result.status == "ok" and self.published is not None:
                try:
                    self.published.write(result.record())
                except OSError as exc:
                    self.ctx.stop(f"cannot write {self.published.path}: {exc}")
            try:
                future: Future[list[str]] = self.pipeline.submit(result.path)
            except Exception as exc:
                self._record(_post_failed(result, exc))
                return
            future.add_done_callback(lambda f: self._record(_post_done(result, f)))
            return
        self._record(result)

    def _record(self, result: Result) -> None:
        """Journal the item, then account for it (``_account``, or a fan-out worker's
        report to its parent)."""
        record = result.record() if self.writer is not None else None
        assert self.manifest is not None
        try:
            if record is None:
                self.manifest.write_json(result.json_line())
            else:
                self.manifest.write(record)
        except OSError as exc:  # a full disk: keep counting, start nothing new
            self.ctx.stop(f"cannot write the manifest {self.manifest.path}: {exc}")
        self._accountant(result, record)

    def _account(self, result: Result, record: dict[str, Any] | None) -> None:
        """Sink, count and report a journaled item."""
        if self.writer is not None and not self._sink_failed:
            from .errors import SinkError

            try:
                self.writer.write(record if record is not None else result.record())
            except SinkError as exc:  # the downloads are fine; the run stops loading
                self._sink_failed = True
                self.ctx.stop(f"sink failed: {exc}")
        with self._lock:
            self.report.add(result, keep=self.cfg.keep_results)
        self.progress.update(1, nbytes=result.bytes if result.status == "ok" else 0)

    def _count_ok(self, n: int, nbytes: int) -> None:
        """Account for ``n`` items downloaded elsewhere (a fan-out worker) and journaled
        there, when neither the sink nor the Report needs them one by one."""
        with self._lock:
            self.report.counts["ok"] += n
            self.report.bytes += nbytes
        self.progress.update(n, nbytes=nbytes)


class _Pool:
    """Worker threads, started as hand-offs need them (a loop run whose files are all
    small needs none), at most ``threads``.

    Not concurrent.futures: importing it (and the logging it brings) costs ~6 ms of
    every start, for futures this pool never hands out. Its few parts are imported up
    front all the same: an import at the first hand-off can fail when that hand-off is
    caused by running out of file descriptors.
    """

    def __init__(self, threads: int) -> None:
        self._max = threads
        self._tasks: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = \
            queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._busy = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            self._busy += 1
        self._tasks.put((fn, args))
        if not self._idle.acquire(blocking=False) and len(self._threads) < self._max:
            thread = threading.Thread(target=self._serve, name=f"fetcher_{len(self._threads)}")
            self._threads.append(thread)
            thread.start()

    def _serve(self) -> None:
        get = self._tasks.get
        while (task := get()) is not None:
            fn, args = task
            with contextlib.suppress(BaseException):  # a bug there must not cost the thread
                fn(*args)  # (_work records its own failures)
            with self._lock:
                self._busy -= 1
            self._idle.release()

    def busy(self) -> bool:
        """Whether submitted items are still queued or running."""
        return self._busy > 0

    def shutdown(self, wait: bool = True) -> None:
        """Let every thread end after the queued items (non-daemon: exit waits too)."""
        if not self._closed:
            self._closed = True
            for _ in self._threads:
                self._tasks.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


def _post_done(result: Result, future: Future[list[str]]) -> Result:
    exc = future.exception()
    if exc is not None:
        return _post_failed(result, exc)
    result.outputs = list(future.result())
    return result


def _post_failed(result: Result, exc: BaseException) -> Result:
    if not isinstance(exc, ProcessingError):
        exc = ProcessingError(str(exc), transform="post", path=result.path or "",
                              url=result.url)
    return result.fail(exc)


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None
