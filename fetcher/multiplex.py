"""Many small downloads on one thread: keep-alive connections multiplexed by a selector.

Why not only threads: with 16 threads each small file costs GIL hand-offs, futex
wake-ups and context switches on top of its own work, and on 2 cores that, not the
network, is what limits a Python downloader (about 600 us of CPU per 10 KiB file
with threads against about 60 us here; see ARCHITECTURE.md). This loop runs the
common case end to end: GET, ``200`` with a Content-Length of at most
``LOOP_BODY_MAX``, body read into one buffer, SHA-256, written to the partial file,
``os.replace`` to its name.

Everything else goes to the thread pool with what the loop already has, so the one
policy in ``download.download_one`` decides and nothing is requested twice:

* redirects, error statuses, chunked or large bodies, Content-Disposition names,
  an unexpected Content-Type: the open connection and its parsed response head
  (``http.Prefetched``), which ``HttpClient.get`` carries on from;
* a failed first attempt (connect error, timeout, truncation, checksum, disk):
  the error, which download_one treats as attempt 1 (backoff, retry, stop on a
  full disk);
* items with a resumable partial file, or whose host asked for a pause
  (Retry-After): nothing, they start on a thread.

Bodies up to ``LOOP_BODY_MAX`` (64 KiB) are held in memory; like ``download.py``,
which gives bodies that small no resume sidecar, the loop re-fetches them whole after
a failure, so resume behaves the same on both paths.

What it keeps per item and per connection, and when requests may be pipelined on a
connection (``--pipeline``), live in ``loopconn``; helpers that hold no loop state in
``loopio``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import os
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .config import FetchConfig
from .download import (
    RESUME_MIN_BYTES,
    RunContext,
    _publish,
    _storage_error,
    partial_name,
)
from .errors import (
    CancelledError,
    ChecksumError,
    ItemError,
    TransportError,
    TruncatedError,
)
from .http import HttpClient, Origin, Prefetched
from .loopconn import (
    BODY,
    CONNECTING,
    HANDSHAKE,
    HEAD,
    IDLE,
    READ,
    SENDING,
    WRITE,
    Conn,
    Item,
    Pipelines,
)
from .loopio import Resolver, SigintCancels, loop_framing, tls_would_block
from .models import Job, Result
from .wire import (
    MAX_HEAD,
    Connection,
    WireError,
    parse_head,
    tls_context,
)

LOOP_BODY_MAX = RESUME_MIN_BYTES
"""Largest body the loop keeps in memory. Larger ones stream on a thread to a partial
file with a resume sidecar, so an interrupted transfer of one resumes."""
_HEAD_RECV = 64 * 1024
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux
_TICK = 0.1
"""Longest select wait: how soon a cancel or a timeout is noticed."""
_WOULD_BLOCK = (BlockingIOError, InterruptedError)

Handoff = Callable[[Job, str, Prefetched | ItemError | None], None]

WAIT: Any = ("wait",)
"""What an item source yields when it has nothing yet but is not exhausted (the items
of a fan-out worker arrive from its parent; see ``fanout``)."""


def loop_eligible(config: FetchConfig) -> bool:
    """Whether a run can use the loop: options it does not implement keep threads."""
    return (not config.proxies and config.rate is None
            and (config.per_host is None or config.per_host >= config.threads))


class Multiplexer:
    """Runs items on up to ``capacity`` connections from one thread (see module doc)."""

    def __init__(self, ctx: RunContext, *, capacity: int,
                 done: Callable[[Result, Job], None], handoff: Handoff,
                 feed: Any = None) -> None:
        """``capacity`` connections are shared by the loop and the items it hands off:
        each hand-off holds one until its thread calls ``handed_done``. ``feed``, if
        given, is watched beside the connections: ``feed.pump()`` runs when its
        ``fileno()`` is readable and ``feed.tick()`` after every round of events (a
        fan-out worker's link to its parent)."""
        self.ctx = ctx
        self.cfg = ctx.config
        self._cap = capacity
        self._handed = 0  # hand-offs still on a thread; changed on the loop's thread only
        self._done = done
        self._pass = handoff
        self._heads = HttpClient(self.cfg)  # builds request heads; never connects
        self._sel = selectors.DefaultSelector()
        self._idle: dict[Origin, list[Conn]] = {}
        self._active: set[Conn] = set()
        self._n_idle = 0
        self._resolver = Resolver(self.wake)
        self._tls: Any = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, READ, None)
        self._feed = feed
        if feed is not None:
            self._sel.register(feed.fileno(), READ, feed)
        # One entry per ended hand-off: its slot and its idle connections come back
        # together, so the loop never sees the slot free without the connection (and
        # opens another) nor the connection without the slot (and closes it).
        self._returned: collections.deque[list[tuple[Origin, Connection]]] = \
            collections.deque()
        self._ended_lock = threading.Lock()
        self._ended = False
        self._depth = self.cfg.pipeline
        self._pipes = Pipelines(self._depth)
        # Items taken from the source that found no connection and no pipeline slot
        # yet, or whose connection closed under them, oldest first; connections with
        # requests begun this round (``_write_round``).
        self._held: collections.deque[Item] = collections.deque()
        self._unsent: list[Conn] = []

    # -- public ----------------------------------------------------------------------
    def wake(self) -> None:
        """Called from other threads when capacity frees up (a handed-off item ended)."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def handed_done(self, idle: list[tuple[Origin, Connection]]) -> None:
        """A handed-off item ended on its thread (any thread): its slot comes back, with
        the thread's ``idle`` keep-alive connections (the one the loop passed it).

        Taking the connection back keeps the run at ``capacity`` connections and spares
        a connect; after the loop has ended they are closed here.
        """
        with self._ended_lock:
            if not self._ended:
                self._returned.append(idle)
                idle = []
        for _, conn in idle:
            conn.close()
        self.wake()

    def _handoff(self, job: Job, rel: str, first: Any) -> None:
        self._handed += 1
        self._pass(job, rel, first)

    def _capacity(self) -> int:
        return self._cap - self._handed

    def _take_back(self) -> None:
        while self._returned:
            returned = self._returned.popleft()
            self._handed -= 1
            for key, wired in returned:
                self._adopt_idle(key, wired)

    def _adopt_idle(self, key: Origin, wired: Connection) -> None:
        unread = wired.buf or (key[0] == "https" and wired.sock.pending())  # type: ignore[attr-defined]
        if not unread:  # bytes (or the server's FIN) already waiting in the socket
            try:
                unread = bool(select.select([wired.sock], [], [], 0)[0])
            except (OSError, ValueError):
                unread = True
        if unread or len(self._active) + self._n_idle >= self._capacity():
            wired.close()
            return
        conn = Conn(key, [])
        conn.sock, conn.requests, conn.state = wired.sock, wired.requests, IDLE
        try:
            conn.sock.setblocking(False)
        except OSError:
            wired.close()
            return
        self._watch(conn, READ)
        self._idle.setdefault(key, []).append(conn)
        self._n_idle += 1

    def run(self, items: Iterator[tuple[Job, str]]) -> None:
        """Download every item; returns when all are done or handed off.

        A Ctrl-C (SIGINT with Python's default handler) does what the CLI's first
        Ctrl-C does: the loop stops, every item in flight is journaled as cancelled,
        and KeyboardInterrupt is raised after that, never between a file's publish
        and its manifest line. A second Ctrl-C interrupts at once.
        """
        with SigintCancels(self.ctx.cancel, self.wake) as sigint:
            self._run(items)
        if sigint.hits:
            raise KeyboardInterrupt

    def _run(self, items: Iterator[tuple[Job, str]]) -> None:
        ctx, sel = self.ctx, self._sel
        cancel, stop_new = ctx.cancel, ctx.stop_new
        exhausted = False
        next_sweep = time.monotonic() + _TICK
        try:
            while True:
                while self._held and not cancel.is_set():
                    held = self._held[0]
                    if ctx.gate.paused(held.job.url):  # a thread waits out the pause
                        self._held.popleft()
                        self._handoff(held.job, held.rel, None)
                    elif self._start(held):
                        self._held.popleft()
                    else:
                        break
                while not exhausted and not self._held and (
                        len(self._active) < self._capacity() or self._pipes.has_room()):
                    if cancel.is_set() or stop_new.is_set():
                        exhausted = True
                        break
                    started = time.monotonic()
                    item = next(items, None)  # may journal skips, and wait on --post
                    self._excuse(time.monotonic() - started)
                    if item is None:
                        exhausted = True
                        break
                    if item is WAIT:
                        break
                    self._begin(*item)
                if self._unsent:
                    self._write_round()
                if cancel.is_set():
                    break
                if exhausted and not self._active and not self._held:
                    return
                feed = self._feed
                for key, mask in sel.select(_TICK):
                    conn = key.data
                    if conn is None:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                        self._take_back()
                    elif conn is feed:
                        feed.pump()
                    else:
                        self._step(conn, mask)
                if feed is not None:
                    started = time.monotonic()
                    feed.tick()  # may wait for a busy parent: not the servers' silence
                    self._excuse(time.monotonic() - started)
                now = time.monotonic()
                if now >= next_sweep:
                    next_sweep = now + _TICK
                    self._sweep(now)
            self._cancel_active()
        except BaseException:
            cancel.set()
            self._cancel_active()
            raise
        finally:
            self._close_all()

    # -- starting an item ------------------------------------------------------------
    def _begin(self, job: Job, rel: str) -> None:
        url = job.url
        name = partial_name(url, rel)
        if name in self.ctx.partials or self.ctx.gate.paused(url):
            self._handoff(job, rel, None)  # resume or wait: thread work
            return
        item = Item(job, rel, self.ctx.partial_str + "/" + name)
        if not self._start(item):
            self._held.append(item)

    def _start(self, item: Item) -> bool:
        """Send ``item``'s request: on an idle connection, a new one while there is
        capacity, or pipelined behind another on a connection with room. False if none
        can take it now (the caller holds it)."""
        if self._returned:
            self._take_back()
        job = item.job
        try:
            key, head = self._heads.prepare(job.url)
            if self._pipes.cooling and key in self._pipes.cooling \
                    and not self._pipes.cooled(key):
                return False
            conns = self._idle.get(key)
            if conns:
                conn = conns.pop()
                self._n_idle -= 1
            elif len(self._active) < self._capacity():
                addrs = self._resolver.addresses(key[1], key[2])
                if addrs is None:  # being looked up, or the lookup failed: a thread waits
                    self._handoff(job, item.rel, None)
                    return True
                conn = self._open(key, addrs, item)
            else:
                slot = self._pipes.take(key)
                if slot is None:
                    return False
                conn = slot
                conn.queue.append(item)
                self._pipeline(conn, head)
                return True
        except ItemError as exc:
            self._handoff(job, item.rel, exc)
            return True
        conn.item, conn.head = item, head
        self._active.add(conn)
        if conn.state == IDLE:
            # It has served a keep-alive response: requests may follow this one on it.
            if self._depth > 1:
                self._pipes.enroll(conn)
            self._send(conn)
        return True

    def _pipeline(self, conn: Conn, head: bytes) -> None:
        """Send ``head`` behind the requests already on ``conn``."""
        conn.requests += 1
        if conn.state == SENDING:  # the first request is still going out: after it
            conn.head += head
            return
        if not conn.out:
            self._unsent.append(conn)
        conn.out += head

    def _write_round(self) -> None:
        """Send the requests begun this round, each connection's in one write."""
        for conn in self._unsent:
            if conn not in self._active:
                continue  # failed since
            if conn.state == SENDING:
                self._write(conn)
            elif conn.out and not conn.events & WRITE:  # else waiting for room already
                try:
                    self._flush(conn)
                except (OSError, WireError) as exc:  # a broken connection: its next
                    if not isinstance(exc, _WOULD_BLOCK) and not tls_would_block(exc):
                        conn.pipe = False  # event tells
                    self._watch(conn, READ | WRITE)
        self._unsent.clear()

    def _flush(self, conn: Conn) -> None:
        conn.out = conn.out[conn.sock.send(conn.out):]
        self._watch(conn, READ | WRITE if conn.out else READ)

    def _requeue(self, conn: Conn) -> None:
        """Items pipelined on ``conn``, which will not answer them, start again."""
        self._pipes.reset(conn)
        if conn.queue:
            self._held.extendleft(reversed(conn.queue))
            conn.queue.clear()

    def _open(self, key: Origin, addrs: list[tuple[Any, ...]], item: Item) -> Conn:
        while self._n_idle and len(self._active) + self._n_idle >= self._capacity():
            self._drop_idle()  # another origin's spare connection makes room
        conn = Conn(key, list(addrs))
        self._connect(conn, item)
        return conn

    def _connect(self, conn: Conn, item: Item) -> None:
        """Start connecting to the first address that does not fail at once."""
        last = ""
        while conn.addrs:
            family, kind, proto, address = conn.addrs[0]
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:  # e.g. out of file descriptors
                last = f"{type(exc).__name__}: {exc}"
                conn.addrs.pop(0)
                continue
            sock.setblocking(False)
            err = sock.connect_ex(address)
            if err in (0, errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
                conn.sock = sock
                conn.state = CONNECTING
                conn.deadline = time.monotonic() + self.cfg.timeout
                self._watch(conn, WRITE)
                return
            sock.close()
            last = os.strerror(err)
            conn.addrs.pop(0)
        raise TransportError(f"request failed for {item.shown}: connect: {last}",
                             url=item.shown)

    def _send(self, conn: Conn) -> None:
        """Queue ``conn.head`` for this round's writes (``_write_round``), where requests
        pipelined behind it join it in one write."""
        conn.state = SENDING
        conn.requests += 1
        conn.deadline = time.monotonic() + self.cfg.timeout
        if self._depth == 1:
            self._write(conn)
        else:
            self._unsent.append(conn)

    def _write(self, conn: Conn) -> None:
        try:
            n = conn.sock.send(conn.head)
        except _WOULD_BLOCK:
            n = 0
        except OSError as exc:
            if not tls_would_block(exc):
                self._broken(conn, exc)
                return
            n = 0
        conn.head = conn.head[n:]
        if conn.head:
            self._watch(conn, WRITE)
            return
        conn.state = HEAD
        self._watch(conn, READ)

    # -- events ----------------------------------------------------------------------
    def _watch(self, conn: Conn, events: int) -> None:
        if conn.events == events:
            return
        if conn.events:
            self._sel.modify(conn.sock, events, conn)
        else:
            self._sel.register(conn.sock, events, conn)
        conn.events = events

    def _step(self, conn: Conn, mask: int) -> None:
        state = conn.state
        try:
            if conn.out and mask & WRITE:
                self._flush(conn)
                if not mask & READ:
                    return
            if state == BODY:
                self._read_body(conn)
            elif state == HEAD:
                self._read_head(conn)
            elif state == SENDING:
                self._send_rest(conn)
            elif state == CONNECTING:
                self._connected(conn)
            elif state == HANDSHAKE:
                self._handshake(conn)
            else:  # an idle connection became readable: the server closed it
                self._discard(conn)
        except _WOULD_BLOCK:
            pass
        except (OSError, WireError, ItemError) as exc:
            if not tls_would_block(exc):
                self._broken(conn, exc)

    def _connected(self, conn: Conn) -> None:
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            conn.addrs.pop(0)
            self._unwatch(conn)
            conn.sock.close()
            if not conn.addrs:
                raise OSError(err, f"connect: {os.strerror(err)}")
            assert conn.item is not None
            self._connect(conn, conn.item)  # e.g. ::1 refused, 127.0.0.1 listening
            return
        self._resolver.remember(conn.key[1], conn.key[2], conn.addrs[0])
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if conn.key[0] == "https":
            if self._tls is None:
                self._tls = tls_context(self.cfg.verify, self.cfg.cert)
            self._unwatch(conn)  # the SSL socket replaces the plain one in the selector
            conn.sock = self._tls.wrap_socket(conn.sock, server_hostname=conn.key[1],
                                              do_handshake_on_connect=False)
            conn.state = HANDSHAKE
            self._handshake(conn)
            return
        self._send(conn)

    def _handshake(self, conn: Conn) -> None:
        import ssl  # imported already: tls_context made the socket

        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(conn, READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(conn, WRITE)
            return
        self._send(conn)

    def _send_rest(self, conn: Conn) -> None:
        n = conn.sock.send(conn.head)
        conn.head = conn.head[n:]
        if not conn.head:
            conn.state = HEAD
            self._watch(conn, READ)

    def _read_head(self, conn: Conn) -> None:
        data = conn.sock.recv(_HEAD_RECV)
        if not data:
            if conn.requests > 1 and not conn.buf and conn.item is not None:
                self._retry_stale(conn)
                return
            raise WireError("closed", "connection closed before the response head")
        conn.deadline = time.monotonic() + self.cfg.timeout
        if conn.buf:  # the head came in pieces
            conn.buf += data
            data = bytes(conn.buf)
            conn.buf.clear()
        self._responses(conn, data)

    def _responses(self, conn: Conn, data: bytes) -> None:
        """Take the response(s) in ``data``, which starts at a response head: the
        current item's, then those of requests pipelined behind it.

        A small response arrives whole in one read: head and body are sliced out of
        ``data`` (no bytearray, no copies), and only a body still on its way gets a
        buffer of its own.
        """
        pos, size = 0, len(data)
        while True:
            while True:
                end = data.find(b"\r\n\r\n", pos)
                if end < 0:
                    if size - pos > MAX_HEAD:
                        raise WireError("protocol", "response head larger than 64 KiB")
                    conn.buf += memoryview(data)[pos:]
                    self._more_tls(conn)
                    return
                if end - pos > MAX_HEAD:
                    raise WireError("protocol", "response head larger than 64 KiB")
                raw = data[pos:end]
                pos = end + 4
                code = raw[9:12]
                if raw[:9] in (b"HTTP/1.1 ", b"HTTP/1.0 ") and code.isdigit() \
                        and raw[12:13] in (b" ", b"\r", b""):
                    status = int(code)
                else:  # anything less plain (HTTP/1.10, no space...): the full parser decides
                    status = parse_head(raw)[0]
                if status >= 200 or status == 101:
                    break  # 1xx interim responses are skipped
            conn.status = status
            length, conn.keep = loop_framing(raw, self.cfg, LOOP_BODY_MAX) \
                if status == 200 else (-1, False)
            here = size - pos
            if length < 0:
                if here:
                    conn.buf += memoryview(data)[pos:]  # the thread reads the body from here
                conn.status, conn.headers, conn.http11 = parse_head(raw)
                self._pass_response(conn)
                return
            conn.state = BODY
            if here < length:
                break
            conn.body = memoryview(data)[pos:pos + length]
            conn.got = conn.need = length
            pos += length
            if pos < size and not conn.queue:
                # Bytes beyond the body, and no request behind it: not reused.
                conn.buf += memoryview(data)[pos:]
                self._complete(conn)
                return
            if not self._complete(conn):
                return
            if pos == size:  # the next response is still on its way
                self._ack_now(conn)
                self._more_tls(conn)
                return
        # One byte of slack: a server that sends more than its Content-Length is caught
        # here, and its connection is not reused with those bytes waiting in it.
        # (With requests pipelined behind it, what follows is the next response: read
        # no more than the body.)
        body = conn.body = bytearray(length + 1)
        body[:here] = memoryview(data)[pos:]
        conn.got, conn.need = here, length
        self._more_tls(conn)

    def _read_body(self, conn: Conn) -> None:
        body = conn.body
        assert isinstance(body, bytearray)
        n = conn.sock.recv_into(memoryview(body)[conn.got:],
                                conn.need - conn.got + (not conn.queue))
        if not n:
            raise WireError("truncated", f"connection closed with {conn.need - conn.got} "
                                         "bytes of the body missing")
        conn.got += n
        conn.deadline = time.monotonic() + self.cfg.timeout
        if conn.got >= conn.need:
            if conn.got > conn.need:
                conn.keep = False  # more than the body: never reuse this connection
            conn.body = memoryview(body)[:conn.need]
            if self._complete(conn):
                self._ack_now(conn)
                self._more_tls(conn)
        else:
            self._more_tls(conn)

    @staticmethod
    def _ack_now(conn: Conn) -> None:
        """Answers to pipelined requests are due: acknowledge what came at once. A
        server that writes each answer as it is ready (Nagle's algorithm on, or nginx's
        ``tcp_nopush``) holds the next one back until the last is acknowledged, and a
        delayed ACK would stall it by ~40 ms."""
        if _QUICKACK is not None:
            with contextlib.suppress(OSError):
                conn.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)

    def _more_tls(self, conn: Conn) -> None:
        """Decrypted bytes an SSL socket holds never wake the selector: read them now."""
        sock = conn.sock
        if conn.key[0] == "https" and sock.pending():  # type: ignore[attr-defined]
            self._step(conn, READ)

    # -- endings ---------------------------------------------------------------------
    def _complete(self, conn: Conn) -> bool:
        """Publish the body read for ``conn``'s item; True if ``conn`` carries on with
        the next request pipelined on it."""
        item, body = conn.item, conn.body
        assert item is not None and body is not None
        conn.item = conn.body = None
        carry_on = False
        if conn.queue and conn.keep and not conn.buf:
            conn.item = conn.queue.popleft()
            conn.state = HEAD
            conn.deadline = time.monotonic() + self._pipes.carry_on(conn, self.cfg.timeout)
            carry_on = True
        else:
            if conn.probe:
                self._pipes.ended(conn)
            self._active.discard(conn)
            if conn.keep and not conn.buf and not conn.out:
                conn.state = IDLE
                conn.pipe = False
                self._idle.setdefault(conn.key, []).append(conn)
                self._n_idle += 1
            else:  # closing (Connection: close, say): what was pipelined starts again
                self._requeue(conn)
                self._discard(conn)
        job, rel = item.job, item.rel
        digest = hashlib.sha256(body).hexdigest()
        if job.sha256 and digest != job.sha256:
            self._handed_over(conn, carry_on)
            self._handoff(job, rel, ChecksumError(url=item.shown, expected=job.sha256,
                                                  actual=digest))
            return False
        try:
            fd = os.open(item.part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            _publish(self.ctx, item.part, "", rel, item.shown, False)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(item.part)
            self._handed_over(conn, carry_on)
            self._handoff(job, rel, _storage_error(exc, item.shown, item.part))
            return False
        except ItemError as exc:
            with contextlib.suppress(OSError):
                os.unlink(item.part)
            self._handed_over(conn, carry_on)
            self._handoff(job, rel, exc)
            return False
        started = time.monotonic()
        # Positional: keywords to a class call cost a dict per file.
        self._done(Result(item.shown, rel, "ok", len(body), digest, 200, 1,
                          time.monotonic() - item.started), job)
        self._excuse(time.monotonic() - started)
        return carry_on

    def _handed_over(self, conn: Conn, carry_on: bool) -> None:
        """An item ``conn`` carried on from goes to a thread, which takes a connection's
        share of the capacity: ``conn`` gives its share back (closed, what is queued on
        it starting again), so the run stays at ``threads`` transfers."""
        if not carry_on:
            return
        self._active.discard(conn)
        if conn.item is not None:
            conn.queue.appendleft(conn.item)
            conn.item = None
        self._requeue(conn)
        self._discard(conn)

    def _pass_response(self, conn: Conn) -> None:
        """Hand the open response to a thread (see the module doc)."""
        item, headers = conn.item, conn.headers
        assert item is not None and headers is not None
        self._active.discard(conn)
        self._unwatch(conn)
        # Requests pipelined behind this one: their answers follow its body, so the
        # thread closes the connection after it and they start again here.
        reuse = not conn.queue and not conn.out
        if not reuse and conn.status in (429, 503):
            self._pipes.cool(conn.key)
        self._requeue(conn)
        try:
            adopted = Connection.adopt(conn.sock, conn.key[1], conn.buf, conn.requests,
                                       self.cfg.timeout)
        except OSError as exc:
            self._handoff(item.job, item.rel, self._error(item, exc))
            return
        self._handoff(item.job, item.rel, Prefetched(adopted, conn.key, conn.status,
                                                     headers, conn.http11, reuse))

    def _retry_stale(self, conn: Conn) -> None:
        """The server closed a reused keep-alive connection before answering: reconnect."""
        item = conn.item
        assert item is not None
        self._active.discard(conn)
        self._requeue(conn)
        self._discard(conn)
        addrs = conn.addrs or self._resolver.addresses(conn.key[1], conn.key[2])
        if not addrs:
            self._handoff(item.job, item.rel, None)
            return
        try:
            fresh = self._open(conn.key, addrs, item)
        except ItemError as exc:
            self._handoff(item.job, item.rel, exc)
            return
        fresh.item, fresh.head = item, self._heads.prepare(item.job.url)[1]
        self._active.add(fresh)

    def _broken(self, conn: Conn, exc: BaseException) -> None:
        """A failed step: a reused connection the server had already closed (EOF,
        reset, broken pipe before any byte of the answer) is retried on a new one."""
        if isinstance(exc, (ConnectionResetError, BrokenPipeError)) and conn.requests > 1 \
                and conn.state in (SENDING, HEAD) and not conn.buf and conn.item is not None:
            self._retry_stale(conn)
            return
        self._fail(conn, exc)

    def _fail(self, conn: Conn, exc: BaseException) -> None:
        item = conn.item
        if conn.queue or conn.pipe:
            # Broken with requests pipelined on it (or about to be): this origin's
            # connections send one request at a time from now on.
            self._pipes.refuse(conn.key)
        self._active.discard(conn)
        self._requeue(conn)
        self._discard(conn)
        if item is not None:
            self._handoff(item.job, item.rel, self._error(item, exc))

    def _error(self, item: Item, exc: BaseException) -> ItemError:
        if isinstance(exc, ItemError):
            return exc
        if isinstance(exc, WireError) and exc.kind == "truncated":
            return TruncatedError(f"connection broken for {item.shown}: {exc}",
                                  url=item.shown)
        if isinstance(exc, TimeoutError):
            return TransportError(f"request failed for {item.shown}: {exc}", url=item.shown)
        return TransportError(f"request failed for {item.shown}: {type(exc).__name__}: "
                              f"{exc}", url=item.shown)

    def _excuse(self, waited: float) -> None:
        """The loop was busy elsewhere for ``waited`` s (handing a file to a full
        --post pipeline, say): that silence is not the servers', so every transfer's
        read timeout starts again."""
        if waited > 0.001:  # many short waits add up too
            for conn in self._active:
                conn.deadline += waited

    def _sweep(self, now: float) -> None:
        for conn in [c for c in self._active if c.deadline < now]:
            if conn.probe == 2 and conn.item is not None:
                # The probe's second answer did not come: no pipelining with this
                # origin, and the item starts again, not charged an attempt.
                self._pipes.refuse(conn.key)
                self._active.discard(conn)
                conn.queue.append(conn.item)
                conn.item = None
                self._requeue(conn)
                self._discard(conn)
                continue
            what = "connect" if conn.state in (CONNECTING, HANDSHAKE) else "read"
            self._fail(conn, TimeoutError(f"{what} timed out after {self.cfg.timeout:g} s"))

    def _cancel_active(self) -> None:
        for conn in list(self._active):
            item = conn.item
            self._active.discard(conn)
            if item is not None:
                conn.queue.appendleft(item)
            self._requeue(conn)
            self._discard(conn)
        while self._held:
            item = self._held.popleft()
            result = Result(url=item.shown, path=item.rel, status="failed", attempts=1,
                            elapsed_s=time.monotonic() - item.started)
            self._done(result.fail(CancelledError(f"cancelled: {item.shown}",
                                                  url=item.shown)), item.job)

    # -- connection bookkeeping ------------------------------------------------------
    def _unwatch(self, conn: Conn) -> None:
        if conn.events:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(conn.sock)
            conn.events = 0

    def _discard(self, conn: Conn) -> None:
        conn.pipe = False
        if conn.state == IDLE:
            pool = self._idle.get(conn.key)
            if pool and conn in pool:
                pool.remove(conn)
                self._n_idle -= 1
        self._unwatch(conn)
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _drop_idle(self) -> None:
        for pool in self._idle.values():
            if pool:
                self._discard(pool[0])
                return

    def _close_all(self) -> None:
        for pool in list(self._idle.values()):
            for conn in list(pool):
                self._discard(conn)
        for conn in list(self._active):
            self._discard(conn)
        self._active.clear()
        with self._ended_lock:
            self._ended = True
        while self._returned:
            for _, wired in self._returned.popleft():
                wired.close()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()


def capacity_of(config: FetchConfig) -> int:
    """Concurrent transfers a run allows (threads, bounded by the window)."""
    return max(1, min(config.threads, config.in_flight))
