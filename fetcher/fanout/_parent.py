"""The parent's side of a fan-out run (see the package docstring)."""

from __future__ import annotations

import collections
import contextlib
import os
import select
import selectors
import signal
import socket
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import DownloadProcessError
from ..http import redact
from ..loopio import SigintCancels
from ..models import Job, Result
from ..multiplex import capacity_of
from ._link import BUF, QUIT_GRACE, Inbox, frame, portable, read_link, ready, split_evenly
from ._worker import Worker

if TYPE_CHECKING:
    from ..downloader import _Run


class _Child:
    __slots__ = ("done", "inbox", "index", "items", "limit", "out", "pid", "share", "sock")

    def __init__(self, index: int, pid: int, sock: socket.socket, share: int,
                 limit: int) -> None:
        self.index, self.pid, self.sock = index, pid, sock
        self.share, self.limit = share, limit
        self.inbox = Inbox()
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
        shares = split_evenly(connections, width)
        ahead = max(4, cfg.pipeline)  # items a connection may have in flight, and more
        limits = [max(share, min(ahead * share, w))
                  for share, w in zip(shares, split_evenly(window, width), strict=True)]
        self.share = shares.pop(0)  # this process's loop; the rest go to the workers
        limits.pop(0)
        for stream in (sys.stdout, sys.stderr):  # nothing buffered is written twice
            with contextlib.suppress(Exception):
                stream.flush()
        manifest = self.owner.manifest
        if manifest is not None:
            with contextlib.suppress(OSError):
                self._journal_start = os.path.getsize(manifest.path)
        # Before forking: an import in a child can wait forever on a module lock another
        # thread of the caller held at the fork (tests/integration/test_third_review.py).
        ready()
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
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUF)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUF)
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
                code = Worker(self.owner, theirs, share, self._full).serve()
            except BaseException:
                with contextlib.suppress(BaseException):
                    import traceback

                    os.write(2, traceback.format_exc().encode(errors="replace"))
            finally:
                os._exit(code)
        theirs.close()
        ours.setblocking(False)
        # Limits: four shares, within the window. Items go in batches of a share, reports
        # come back by the share: few wake-ups each way, and a worker whose report waits
        # for this (busier) process to get round to it still has shares queued. With two
        # shares a worker sat idle ~half its time and reported nearly every item.
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
                if self._told_cancel and time.monotonic() - self._cancel_at > QUIT_GRACE:
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
        if ctx.cancel.is_set() or ctx.stop_new.is_set():
            self._end_all()  # what is not sent is not started; workers wait for this
            return True
        # With every worker dead, this process's loop takes the rest of the list itself.
        for child in self.children:
            if child.done:
                continue
            free = child.limit - len(child.items)
            if free < child.share:
                continue
            # A connection's worth each: a short list is shared too. Items join the
            # worker's books only once their batch goes out; planning that stops or raises
            # half-way leaves none it never sent.
            planned: dict[int, tuple[Job, str]] = {}
            batch: list[tuple[int, str, str, str | None, Any]] = []
            ended = False
            for _ in range(child.share):
                if ctx.cancel.is_set() or ctx.stop_new.is_set():
                    planned.clear()  # not sent: never started
                    batch.clear()
                    ended = True
                    break
                item = next(items, None)  # plans: may journal skips and failures here
                if item is None:
                    ended = True
                    break
                self._seq += 1
                planned[self._seq] = item
                job, rel = item
                batch.append((self._seq, job.url, rel, job.sha256, portable(job.extra)))
            if batch:
                child.items.update(planned)
                self._queue(child, ("items", batch))
            if ended:
                self._end_all()
                return True
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
        child.out += frame(message)
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
        data = read_link(child.sock)
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
        deadline = time.monotonic() + QUIT_GRACE
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


