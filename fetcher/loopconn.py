"""What the small-file loop (``multiplex.Multiplexer``) keeps per item and per
connection, and its per-origin HTTP/1.1 pipelining policy (``--pipeline N``).

The loop drives the sockets; ``Pipelines`` only decides, per origin, whether requests
may queue behind one another on a connection and which connection has room for one.
"""

from __future__ import annotations

import collections
import selectors
import socket
import time
from typing import Any

from .http import Origin, redact
from .models import Job
from .wire import Headers

# Connection states.
CONNECTING, HANDSHAKE, SENDING, HEAD, BODY, IDLE = range(6)
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
NO_SOCKET: Any = None

PROBE_WAIT = 2.0
"""Longest wait for the second answer of a pipelining probe (see ``Pipelines``)."""
COOL_S = 1.0
"""How long an origin that answered 429/503 with requests pipelined behind the answer
gets no new request, at most (until a thread has read its Retry-After)."""


class Item:
    """One download the loop has taken from its source."""

    __slots__ = ("job", "part", "rel", "shown", "started")

    def __init__(self, job: Job, rel: str, part: str) -> None:
        self.job, self.rel, self.part = job, rel, part
        self.shown = job.url if "@" not in job.url else redact(job.url)
        self.started = time.monotonic()


class Conn:
    """One connection of the loop and the exchange on it."""

    __slots__ = ("addrs", "body", "buf", "deadline", "events", "got", "head", "headers",
                 "http11", "item", "keep", "key", "need", "out", "pipe", "probe", "queue",
                 "requests", "sock", "state", "status")

    def __init__(self, key: Origin, addrs: list[tuple[Any, ...]]) -> None:
        self.key, self.addrs = key, addrs
        self.sock: socket.socket = NO_SOCKET
        self.state = CONNECTING
        self.events = 0
        self.buf = bytearray()
        self.body: bytearray | memoryview | None = None
        self.got = self.need = self.requests = self.status = 0
        self.headers: Headers | None = None
        self.http11 = self.keep = True
        self.item: Item | None = None
        self.head = b""
        self.deadline = 0.0
        # Pipelining: the items whose requests follow ``item``'s, oldest first; the
        # bytes of those requests not sent yet; whether it takes more now.
        self.queue: collections.deque[Item] = collections.deque()
        self.out = b""
        self.pipe = False
        self.probe = 0  # 1: probing, 2: the pipelined request's answer is due


class Pipelines:
    """Which connections take requests pipelined behind the one they carry.

    An origin starts pipelining once a probe passed: two requests in one write, both
    answered (within ``PROBE_WAIT`` for the second). A server that reads one request and
    drops what came with it would otherwise answer later requests in place of the
    dropped ones. An origin whose connection broke with requests queued, or failed its
    probe, pipelines no more this run.
    """

    def __init__(self, depth: int) -> None:
        self.depth = depth
        """Requests a connection carries at once (``FetchConfig.pipeline``; 1: off)."""
        # One entry per free slot on a connection, by origin (stale entries are dropped
        # when met).
        self.room: dict[Origin, collections.deque[Conn]] = {}
        self.cooling: dict[Origin, float] = {}
        """Origins that answered 429/503 while requests were pipelined: nothing more is
        sent to them until a thread has read the answer's Retry-After (then held items
        go to threads, which wait) or for ``COOL_S`` at most."""
        self._probing: set[Origin] = set()
        self._ok: set[Origin] = set()
        self._off: set[Origin] = set()

    def cool(self, key: Origin) -> None:
        """``key`` answered 429/503 with requests queued behind the answer."""
        self.cooling[key] = time.monotonic() + COOL_S

    def cooled(self, key: Origin) -> bool:
        """Whether ``key`` takes requests again (its cooling, if any, has ended)."""
        if time.monotonic() < self.cooling[key]:
            return False
        del self.cooling[key]
        return True

    def enroll(self, conn: Conn) -> None:
        """``conn`` has served a keep-alive response and carries a new request: let
        requests follow it where its origin pipelines, or probe the origin with it."""
        key = conn.key
        if key in self._off:
            return
        if key in self._ok:
            conn.pipe = True
            self.room.setdefault(key, collections.deque()).extend([conn] * (self.depth - 1))
        elif key not in self._probing:
            self._probing.add(key)
            conn.pipe, conn.probe = True, 1
            self.room.setdefault(key, collections.deque()).append(conn)

    def has_room(self, room: collections.deque[Conn] | None = None) -> bool:
        """Whether a connection (of ``room``'s origin, or any) takes a pipelined request
        now; stale entries in front are dropped."""
        for slots in (room,) if room is not None else self.room.values():
            while slots:
                conn = slots[0]
                if conn.pipe and len(conn.queue) < (1 if conn.probe else self.depth - 1) \
                        and conn.key not in self._off \
                        and (not conn.probe or conn.state == SENDING):
                    return True
                slots.popleft()
        return False

    def take(self, key: Origin) -> Conn | None:
        """A connection to ``key`` with a free slot, which the caller fills."""
        room = self.room.get(key)
        if not room or not self.has_room(room):
            return None
        return room.popleft()

    def carry_on(self, conn: Conn, wait: float) -> float:
        """``conn`` goes on to the next answer queued on it: how long to wait for it
        (``wait``, or ``PROBE_WAIT`` when that answer is the probe's second)."""
        if conn.probe:
            conn.probe = 2
            return min(wait, PROBE_WAIT)
        if conn.pipe:
            self.room[conn.key].append(conn)
        return wait

    def ended(self, conn: Conn) -> None:
        """``conn`` has no answer due: a probe on it passed if its second answer came
        on a connection kept alive; otherwise another connection probes later."""
        if conn.probe:
            if conn.probe == 2 and conn.keep:
                self._ok.add(conn.key)
            conn.probe = 0
            self._probing.discard(conn.key)

    def reset(self, conn: Conn) -> None:
        """``conn`` will not answer what is queued on it: it takes no more, and a
        probe on it ends without a verdict."""
        conn.pipe = False
        conn.out = b""
        if conn.probe:
            conn.probe = 0
            self._probing.discard(conn.key)

    def refuse(self, key: Origin) -> None:
        """``key``'s connections send one request at a time from now on."""
        self._off.add(key)
