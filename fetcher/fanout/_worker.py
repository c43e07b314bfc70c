"""A worker of a fan-out run: a forked process running the loop on what its parent
sends, reporting back (see the package docstring)."""

from __future__ import annotations

import collections
import contextlib
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..http import redact
from ..models import Job, Result
from ..multiplex import WAIT
from ..progress import NullProgress
from ._link import Inbox, dumps, frame, read_link

if TYPE_CHECKING:
    from ..downloader import _Run


class Worker:
    """One forked download process: the loop, fed by the parent, reporting back."""

    def __init__(self, run: _Run, sock: socket.socket, share: int, full: bool) -> None:
        self.run, self.sock, self.share, self.full = run, sock, share, full
        self.inbox = Inbox()
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
        from ..downloader import _Pool

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
            # The loop is done; files handed to threads may not be, and after a stop of
            # its own (a full disk) the parent may still be sending batches. The link is
            # read until both are over: a cancel, a stop, a pause, the parent's "end" or
            # its death. Items that arrive now are never started ("done" returns them).
            while pool.busy() or not self.ended:
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
        data = read_link(self.sock)
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
        worth, or the queue is empty (connections about to idle), or it has waited 20 ms
        (the progress bar)."""
        with self._lock:
            count = len(self._oks) + len(self._results)
            if not count:
                return
            now = time.monotonic()
            if not (flush or count >= self.share or not self.queue
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
                dumps(result.exception)
            except Exception:  # error_type and error still say what it was
                result.exception = None
        with self._lock:
            self._results.append((seq, result))

    def _send(self, message: tuple[Any, ...]) -> None:
        data = frame(message)
        with self._send_lock, contextlib.suppress(OSError):  # no parent: pump() sees EOF
            self.sock.sendall(data)
