"""A long list of small files on every core: one run's transfers shared by forked processes.

On one core the small-file loop (``multiplex.py``) spends ~50 us of interpreter time
per file, so a run of thousands of small files is bound by one CPU while the others
idle. Threads cannot help (the GIL), so a run of ``width`` processes forks
``width - 1`` workers; each process, this one included, runs the same loop with its
own thread pool behind it on its share of the ``--threads`` connections. (A parent
that only planned and dispatched cost more: four busy processes on two cores meant
~900 preemptions and 30% more CPU per run for 6% less wall time, against 14% and 17%
with this one taking its share.)

What must be decided in one place stays in this (the parent) process: reading the list,
naming every item (collision-free names in list order), skips and ``--on-exists``, the
Report, the progress bar and the sink. Planned items go to its own loop when it has a
free connection, and in batches of its share to every worker with that much room free
(at most twice its share queued or running, within the run's window: items queued behind
a slow one cannot move to another process). A worker downloads, verifies and publishes
exactly as a single-process run does and appends each item's manifest line itself, right
after publishing, on the descriptor it inherited (``O_APPEND``, one ``write`` a line, so
lines of several processes never interleave and a crash leaves no published file
unjournaled). It reports back only what the parent counts: sequence numbers of items
that ended ok, and whole Results for failures, or for every item when the sink or
``keep_results`` needs them.

Run-wide state crosses over as messages: Retry-After pauses (met in any process, they
hold the host in all), a stop (full disk, a failed sink) and cancellation. Workers
ignore SIGINT; the parent's Ctrl-C cancels them, and a parent that dies (EOF on the
link) cancels them too. A worker that dies fails its unfinished items with
``DownloadProcessError`` (those it had journaled are taken from the manifest), and
the others, this process included, go on with the rest of the list.

Messages are pickles with a 4-byte length, over one socketpair per worker. The parent
never blocks on a worker (non-blocking sends, buffered); a worker's sends block only
while the parent is busy, which its read timeouts forgive (``Multiplexer._excuse``).
"""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import select
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .config import FANOUT_MIN_ITEMS, FetchConfig
from .errors import DownloadProcessError
from .http import redact
from .models import Job, Result
from .multiplex import WAIT, SigintCancels, capacity_of
from .progress import NullProgress

if TYPE_CHECKING:
    from .downloader import _Run

FANOUT_MAX = 4
"""Most worker processes chosen automatically: past this the parent's planning (~15 us
an item) limits the run, not the workers."""
_LEN = struct.Struct("!I")
_PICKLE = pickle.HIGHEST_PROTOCOL
_BUF = 1 << 20
"""Socket buffer size each way: room for thousands of reports, so a worker rarely waits."""
_RECV = 64 * 1024
_QUIT_GRACE = 10.0
"""Seconds a cancelled worker gets to journal its items and exit before it is killed."""


def fanout_width(cfg: FetchConfig, total: int | None) -> int:
    """How many processes share a run's transfers, this one included (1: it alone).

    ``download_processes`` decides when set. Otherwise: one per available core (up to
    ``FANOUT_MAX``) for lists of at least ``FANOUT_MIN_ITEMS``, and only while this
    process runs no other thread (forking a threaded program is safe only for code
    that takes none of their locks, which a library cannot promise for its caller).
    """
    if not hasattr(os, "fork"):
        return 1
    wanted = cfg.download_processes
    if wanted is None:
        if total is None or total < FANOUT_MIN_ITEMS or threading.active_count() > 1:
            return 1
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        wanted = min(cores, FANOUT_MAX)
    return max(1, min(wanted, cfg.threads))


def _split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` near-equal whole shares."""
    return [total // parts + (i < total % parts) for i in range(parts)]


_JSON_SCALARS = (str, int, float, bool, type(None))


def _portable(extra: Any) -> dict[str, Any] | None:
    """A job's carried columns as a worker can receive them: as they are when plain
    (the usual CSV strings), else as the manifest will show them (``str()`` of what
    JSON cannot hold), which pickles whatever the caller put there."""
    if not extra:
        return None
    if type(extra) is dict and all(type(v) in _JSON_SCALARS for v in extra.values()):
        return extra
    import json

    from .models import encode_record

    portable: dict[str, Any] = json.loads(encode_record(dict(extra)))
    return portable


def _frame(message: tuple[Any, ...]) -> bytes:
    data = pickle.dumps(message, _PICKLE)
    return _LEN.pack(len(data)) + data


def _read(sock: socket.socket) -> bytes | None:
    """What the link holds: bytes, b"" at EOF (or a broken link), None for nothing yet."""
    try:
        return sock.recv(_RECV)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


class _Inbox:
    """Bytes from a socket in, whole messages out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def messages(self, data: bytes) -> list[tuple[Any, ...]]:
        buf = self._buf
        buf += data
        out: list[tuple[Any, ...]] = []
        start = 0
        while len(buf) - start >= 4:
            (size,) = _LEN.unpack_from(buf, start)
            if len(buf) - start - 4 < size:
                break
            out.append(pickle.loads(buf[start + 4:start + 4 + size]))
            start += 4 + size
        del buf[:start]
        return out


# -- the parent ---------------------------------------------------------------------------

class _Child:
    __slots__ = ("done", "inbox", "index", "items", "limit", "out", "pid", "share", "sock")

    def __init__(self, index: int, pid: int, sock: socket.socket, share: int,
                 limit: int) -> None:
        self.index, self.pid, self.sock = index, pid, sock
        self.share, self.limit = share, limit
        self.inbox = _Inbox()
        self.out = bytearray()
        self.items: dict[int, tuple[Job, str]] = {}
        """Items sent and not yet reported, by sequence number."""
        self.done = False


class Fanout:
    """The parent's side: forks ``width - 1`` workers (on entry), feeds them from the
    items it plans while running its own share of the transfers, folds in their reports,
    and reaps them (on exit, killing any still there after a grace time).

    To its own loop (``Multiplexer``) it is the ``feed``: ``fileno`` is its selector's,
    readable when a worker wrote; ``pump`` takes the reports; ``tick`` refills the
    workers and passes on a cancel or a stop. ``finish`` waits for the workers once the
    loop is done.
    """

    def __init__(self, run: _Run, width: int) -> None:
        self.owner = run
        self.width = width
        self.share = 1
        """Connections of this process's own loop."""
        self.children: list[_Child] = []
        self._items: Iterator[tuple[Job, str]] | None = None
        self._exhausted = self._told_cancel = self._told_stop = False
        self._cancel_at = 0.0
        self._seq = 0
        self._full = run.cfg.keep_results or bool(run.fetcher.sink)
        self._sel = selectors.DefaultSelector()
        self._journal_start = 0
        """Size of the manifest when the workers were forked: their lines come after."""
        # Retry-After pauses this process's threads meet go to the workers from the loop's
        # thread: queued here, with a wake-up through the selector.
        self._pauses: collections.deque[tuple[str, float]] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)

    def __enter__(self) -> Fanout:
        """Fork the workers; if the system refuses a fork, go on with those there are
        (none: the run stays in this process alone)."""
        cfg = self.owner.cfg
        connections, window = capacity_of(cfg), cfg.in_flight
        width = min(self.width, connections)
        shares = _split(connections, width)
        limits = [max(share, min(2 * share, w))
                  for share, w in zip(shares, _split(window, width), strict=True)]
        self.share = shares.pop(0)  # this process's loop; the rest go to the workers
        limits.pop(0)
        for stream in (sys.stdout, sys.stderr):  # nothing buffered is written twice
            with contextlib.suppress(Exception):
                stream.flush()
        manifest = self.owner.manifest
        if manifest is not None:
            with contextlib.suppress(OSError):
                self._journal_start = os.path.getsize(manifest.path)
        try:
            for index, (share, limit) in enumerate(zip(shares, limits, strict=True)):
                if not self._fork(index, share, limit):
                    break
        except BaseException:
            self.__exit__()
            raise
        if len(self.children) < len(shares):  # a refused fork: its connections are ours
            self.share += sum(shares[len(self.children):])
        self.width = 1 + len(self.children)
        self.owner.report.processes = self.width
        self.owner.ctx.gate.on_pause = self._paused_here
        return self

    def _paused_here(self, host: str, until: float) -> None:
        """A thread of this process was told Retry-After (any thread)."""
        self._pauses.append((host, until))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _fork(self, index: int, share: int, limit: int) -> bool:
        ours, theirs = socket.socketpair()
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _BUF)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUF)
        try:
            pid = os.fork()
        except OSError:  # EAGAIN, ENOMEM: fewer processes, not a failed run
            ours.close()
            theirs.close()
            return False
        if pid == 0:  # the worker: never returns
            code = 70
            try:
                ours.close()
                for other in self.children:  # their EOF must mean *their* parent died
                    other.sock.close()
                code = _Worker(self.owner, theirs, share, self._full).serve()
            except BaseException:
                with contextlib.suppress(BaseException):
                    import traceback

                    os.write(2, traceback.format_exc().encode(errors="replace"))
            finally:
                os._exit(code)
        theirs.close()
        ours.setblocking(False)
        # Limits: two shares, within the window. Items go in batches of a share, reports
        # come back by the share: few wake-ups each way.
        child = _Child(index, pid, ours, share, limit)
        self.children.append(child)
        self._sel.register(ours, selectors.EVENT_READ, child)
        return True

    # -- the feed of this process's loop -----------------------------------------------
    def items(self, planned: Iterator[tuple[Job, str]]) -> Iterator[tuple[Job, str]]:
        """What this process's loop downloads itself: ``planned``, which the workers
        are refilled from too (``tick``); both only ever run on this thread."""
        self._items = planned
        return planned

    def fileno(self) -> int:
        return self._sel.fileno()

    def pump(self) -> None:
        """A worker wrote (or can be written to again): take its reports."""
        for key, mask in self._sel.select(0):
            child: _Child | None = key.data
            if child is None:  # a wake-up: tick() passes on the pauses
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
                continue
            if mask & selectors.EVENT_WRITE:
                self._send(child)
            if mask & selectors.EVENT_READ:
                self._receive(child)

    def tick(self) -> None:
        """After each round of the loop: refill the workers, pass on cancel and stop."""
        ctx = self.owner.ctx
        while self._pauses:
            host, until = self._pauses.popleft()
            self._broadcast(("pause", host, until))
        if not self._exhausted and self._items is not None:
            self._exhausted = self._fill(self._items)
        if ctx.cancel.is_set() and not self._told_cancel:
            self._told_cancel, self._cancel_at = True, time.monotonic()
            self._broadcast(("cancel",))
        if ctx.stop_new.is_set() and not self._told_stop:  # a worker's, or this process's
            self._told_stop = True  # (its sink or manifest failed): every worker stops
            self._broadcast(("stop", ctx.stop_reason or "stopped"))

    def finish(self) -> None:
        """This process's loop is done: keep the workers fed until the list ends, then
        account for them until every one has ended.

        Under Python's default SIGINT handler a Ctrl-C cancels the run as the CLI's
        does and is raised as KeyboardInterrupt once the workers have journaled.
        """
        with SigintCancels(self.owner.ctx.cancel, lambda: None) as sigint:
            while any(not c.done for c in self.children):
                self.tick()
                if select.select([self._sel.fileno()], [], [], 0.1)[0]:
                    self.pump()
                if self._told_cancel and time.monotonic() - self._cancel_at > _QUIT_GRACE:
                    for child in self.children:
                        if not child.done:
                            with contextlib.suppress(OSError):
                                os.kill(child.pid, signal.SIGKILL)
        if sigint.hits:
            raise KeyboardInterrupt

    def _fill(self, items: Iterator[tuple[Job, str]]) -> bool:
        """Plan a batch (its share) for every worker with that much room; True once the
        list is exhausted or the run stops starting items."""
        ctx = self.owner.ctx
        # With every worker dead, this process's loop takes the rest of the list itself.
        for child in self.children:
            if child.done:
                continue
            free = child.limit - len(child.items)
            if free < child.share:
                continue
            room = child.share  # a connection's worth each: a short list is shared too
            batch: list[tuple[int, str, str, str | None, Any]] = []
            for _ in range(room):
                if ctx.cancel.is_set() or ctx.stop_new.is_set():
                    for entry in batch:  # not sent: never started
                        del child.items[entry[0]]
                    self._end_all()
                    return True
                item = next(items, None)  # plans: may journal skips and failures here
                if item is None:
                    if batch:
                        self._queue(child, ("items", batch))
                    self._end_all()
                    return True
                self._seq += 1
                child.items[self._seq] = item
                job, rel = item
                batch.append((self._seq, job.url, rel, job.sha256, _portable(job.extra)))
            self._queue(child, ("items", batch))
        return False

    def _end_all(self) -> None:
        self._broadcast(("end",))

    def _broadcast(self, message: tuple[Any, ...], *, skip: _Child | None = None) -> None:
        for child in self.children:
            if child is not skip and not child.done:
                self._queue(child, message)

    def _queue(self, child: _Child, message: tuple[Any, ...]) -> None:
        if child.done:
            return
        child.out += _frame(message)
        self._send(child)

    def _send(self, child: _Child) -> None:
        try:
            while child.out:
                sent = child.sock.send(child.out)
                del child.out[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            child.out.clear()  # it is gone: its EOF is on the way
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if child.out else 0)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.modify(child.sock, events, child)

    def _receive(self, child: _Child) -> None:
        data = _read(child.sock)
        if data is None:
            return
        if not data:
            self._ended(child)
            return
        run = self.owner
        for message in child.inbox.messages(data):
            kind = message[0]
            if kind == "results":
                _, oks, ok_bytes, results = message
                for seq in oks:
                    del child.items[seq]
                if oks:
                    run._count_ok(len(oks), ok_bytes)
                for seq, result in results:
                    job, _ = child.items.pop(seq)
                    result.extra = job.extra  # the caller's objects, not their JSON
                    run._account(result, result.record() if run.writer is not None
                                 else None)
            elif kind == "pause":
                _, host, until = message
                run.ctx.gate.pause_until(host, until, announce=False)
                self._broadcast(message, skip=child)
            elif kind == "stop":
                run.ctx.stop(message[1])  # the first reason is kept; _run tells the rest
            elif kind == "done":
                for seq in message[1]:  # queued there, never started: like unplanned items
                    child.items.pop(seq, None)

    def _ended(self, child: _Child) -> None:
        """EOF from a worker: it has exited, or died. Reap it; items it journaled but
        had not reported yet are taken from the manifest, the others fail."""
        child.done = True
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(child.sock)
        child.sock.close()
        status = _reap(child.pid)
        if not child.items:
            return
        run = self.owner
        wanted = {(redact(job.url), rel): job for job, rel in child.items.values()}
        journaled = self._journaled(wanted)
        why = f"download process {child.index + 1} (pid {child.pid}) {status}"
        for key, job in wanted.items():
            shown, rel = key
            record = journaled.get(key)
            if record is not None:  # published and journaled: only the report was lost
                result = _from_record(record, job)
                run._account(result, result.record() if run.writer is not None else None)
                continue
            result = Result(url=shown, path=rel, status="failed", extra=job.extra)
            run._record(result.fail(DownloadProcessError(f"{why}: {shown}", url=shown)))
        child.items.clear()

    def _journaled(self, wanted: dict[tuple[str, str], Job]) -> dict[tuple[str, str], Any]:
        """Manifest records written since the fork for the (url, path) pairs wanted."""
        import json

        found: dict[tuple[str, str], Any] = {}
        manifest = self.owner.manifest
        if manifest is None:
            return found
        try:
            with open(manifest.path, "rb") as fh:
                fh.seek(self._journal_start)
                for line in fh:
                    if not line.endswith(b"\n"):
                        break
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    key = (record.get("url"), record.get("path"))
                    if key in wanted:
                        found[key] = record
        except OSError:
            pass
        return found

    def __exit__(self, *exc: object) -> None:
        """Reap every worker: after a normal run they have exited already; after an error
        here, closing their links cancels them, and stragglers are killed."""
        for child in self.children:
            if not child.done:
                with contextlib.suppress(OSError):
                    child.sock.close()
        self.owner.ctx.gate.on_pause = None
        self._wake_r.close()
        self._wake_w.close()
        deadline = time.monotonic() + _QUIT_GRACE
        for child in self.children:
            if not child.done:
                child.done = True
                _reap(child.pid, until=deadline)
        self._sel.close()


def _from_record(record: dict[str, Any], job: Job) -> Result:
    """A Result back from its manifest record (the job's own carried columns)."""
    return Result(url=record["url"], path=record["path"], status=record["status"],
                  bytes=record.get("bytes") or 0, sha256=record.get("sha256"),
                  http_status=record.get("http_status"), attempts=record.get("attempts") or 0,
                  elapsed_s=record.get("elapsed_s") or 0.0, error_type=record.get("error_type"),
                  error=record.get("error"), outputs=list(record.get("outputs") or ()),
                  extra=job.extra)


def _reap(pid: int, *, until: float | None = None) -> str:
    """Wait for ``pid`` (killing it at ``until``); how it ended, in words."""
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG if until is not None else 0)
        except ChildProcessError:
            return "ended"
        if done:
            break
        if until is not None and time.monotonic() > until:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            until = None
            continue
        time.sleep(0.01)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(sig).name}"
        return f"was killed by signal {sig}"
    return f"exited with status {os.WEXITSTATUS(status)}"


# -- a worker -----------------------------------------------------------------------------

class _Worker:
    """One forked download process: the loop, fed by the parent, reporting back."""

    def __init__(self, run: _Run, sock: socket.socket, share: int, full: bool) -> None:
        self.run, self.sock, self.share, self.full = run, sock, share, full
        self.inbox = _Inbox()
        self.queue: collections.deque[tuple[Job, str]] = collections.deque()
        self.seqs: dict[tuple[str, str], int] = {}
        self.ended = False
        self._lock = threading.Lock()  # results come from the pool's threads too
        self._send_lock = threading.Lock()
        self._oks: list[int] = []
        self._ok_bytes = 0
        self._results: list[tuple[int, Result]] = []
        self._sent_at = 0.0

    def serve(self) -> int:
        """Run until the parent says the list has ended (or cancels, or dies)."""
        from .downloader import _Pool

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides about Ctrl-C
        run, ctx = self.run, self.run.ctx
        run.progress = NullProgress()
        run.writer = None  # the parent's sink; its threads are not here anyway
        run._accountant = self._account
        ctx.on_stop = lambda reason: self._send(("stop", reason))
        ctx.gate.on_pause = lambda host, until: self._send(("pause", host, until))
        pool = _Pool(self.share)
        try:
            run._multiplex(self, pool, share=self.share, feed=self)
            # The loop is done; files handed to threads may not be. The link is still
            # read meanwhile: a cancel, a stop, a pause or the parent's death.
            while pool.busy():
                if select.select([self.sock], [], [], 0.1)[0]:
                    self.pump()
                self.tick()
        finally:
            run._drain(pool)
            for client in run._clients:
                client.close()
        self.tick(flush=True)
        self._send(("done", [self.seqs.pop(key) for key in list(self.seqs)]))
        return 0

    # The item source the loop pulls from (an iterator that may say WAIT).
    def __iter__(self) -> Iterator[tuple[Job, str]]:
        return self

    def __next__(self) -> tuple[Job, str]:
        if self.queue:
            return self.queue.popleft()
        if self.ended:
            raise StopIteration
        return WAIT  # type: ignore[no-any-return]

    # What the loop calls (see Multiplexer's ``feed``).
    def fileno(self) -> int:
        return self.sock.fileno()

    def pump(self) -> None:
        """The parent wrote: take items and notices."""
        data = _read(self.sock)
        if data is None:
            return
        ctx = self.run.ctx
        if not data:  # the parent is gone: stop as a Ctrl-C would, keep partial files
            self.ended = True
            ctx.cancel.set()
            ctx.abort_all()
            return
        for message in self.inbox.messages(data):
            kind = message[0]
            if kind == "items":
                for seq, url, rel, sha256, extra in message[1]:
                    job = Job(url, None, sha256, extra or {})
                    self.seqs[(redact(url) if "@" in url else url, rel)] = seq
                    self.queue.append((job, rel))
            elif kind == "end":
                self.ended = True
            elif kind == "cancel":
                ctx.cancel.set()
                ctx.abort_all()
            elif kind == "stop":
                ctx.stop(message[1])
            elif kind == "pause":
                ctx.gate.pause_until(message[1], message[2], announce=False)

    def tick(self, *, flush: bool = False) -> None:
        """After each round of the loop: report what ended, once there is a share's
        worth, or the queue runs low, or it has waited 20 ms (the progress bar)."""
        with self._lock:
            count = len(self._oks) + len(self._results)
            if not count:
                return
            now = time.monotonic()
            if not (flush or count >= self.share or 2 * len(self.queue) < self.share
                    or now - self._sent_at >= 0.02):
                return
            message = ("results", self._oks, self._ok_bytes, self._results)
            self._oks, self._ok_bytes, self._results = [], 0, []
            self._sent_at = now
        self._send(message)

    def _account(self, result: Result, record: dict[str, Any] | None) -> None:
        """Instead of the Report: note the journaled item for the parent."""
        with self._lock:
            seq = self.seqs.pop((result.url, result.path or ""))
            if result.status == "ok" and not self.full:
                self._oks.append(seq)
                self._ok_bytes += result.bytes
                return
        if result.exception is not None:
            try:
                pickle.dumps(result.exception, _PICKLE)
            except Exception:  # error_type and error still say what it was
                result.exception = None
        with self._lock:
            self._results.append((seq, result))

    def _send(self, message: tuple[Any, ...]) -> None:
        data = _frame(message)
        with self._send_lock, contextlib.suppress(OSError):  # no parent: pump() sees EOF
            self.sock.sendall(data)
