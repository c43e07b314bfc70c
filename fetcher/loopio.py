"""Parts of the small-file loop (``multiplex.py``) that hold no loop state.

- ``Resolver``: host lookups off the loop thread, cached per run.
- ``loop_framing``: the few response-head fields the loop needs, read from the raw
  head without parsing every header.
- ``tls_would_block``: an SSL socket's "try again", without importing ssl.
- ``SigintCancels``: a first Ctrl-C cancels the run instead of raising mid-step.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .config import FetchConfig
from .download import type_matches
from .wire import _host_bytes

Address = tuple[Any, ...]
"""(family, type, proto, sockaddr): what ``socket.socket`` and ``connect`` take."""

DNS_RETRY_S = 5.0
"""After a failed lookup, the host's items go to threads (which retry) this long."""


class Resolver:
    """Addresses per (host, port), looked up on helper threads.

    Names are never resolved on the loop thread: one slow DNS server would stall every
    transfer. IP literals need no lookup and are answered at once.
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._addrs: dict[tuple[str, int], list[Address]] = {}
        self._resolving: set[tuple[str, int]] = set()
        self._failed_until: dict[tuple[str, int], float] = {}

    def addresses(self, host: str, port: int) -> list[Address] | None:
        """Cached addresses; None while a lookup runs (or failed lately)."""
        hostport = (host, port)
        addrs = self._addrs.get(hostport)
        if addrs is not None:
            return addrs
        if _is_ip(host):
            return self._lookup(hostport)
        if hostport not in self._resolving and \
                self._failed_until.get(hostport, 0.0) <= time.monotonic():
            self._resolving.add(hostport)
            threading.Thread(target=self._lookup, args=(hostport,), daemon=True,
                             name="fetcher-dns").start()
        return None

    def remember(self, host: str, port: int, working: Address) -> None:
        """Try ``working`` first from now on (the address a connect succeeded with)."""
        self._addrs[(host, port)] = [working]

    def _lookup(self, hostport: tuple[str, int]) -> list[Address] | None:
        host, port = hostport
        try:
            infos = socket.getaddrinfo(_host_bytes(host), port, type=socket.SOCK_STREAM)
        except OSError:
            self._failed_until[hostport] = time.monotonic() + DNS_RETRY_S
            addrs = None
        else:
            addrs = self._addrs[hostport] = [(*i[:3], i[4]) for i in infos]
        self._resolving.discard(hostport)
        self._wake()
        return addrs


def loop_framing(raw: bytes, cfg: FetchConfig, limit: int) -> tuple[int, bool]:
    """(body length, keep-alive) of a ``200`` head the loop can finish itself, else
    (-1, False).

    Reads the few fields it needs straight from the raw head (parsing every header was
    the loop's costliest Python step). Anything unusual (whitespace before a colon,
    folded lines, bare CR or LF, a repeated Content-Length, a Transfer-Encoding) is left
    to the full parser on a thread, so both paths always frame a response alike.

    ``find`` rather than ``in`` throughout: on Python 3.11 ``bytes in bytes`` first
    tries the needle as an integer and builds and drops a TypeError every time.
    """
    if _unusual(raw):
        return -1, False
    low = raw.lower()
    if low.find(b"\r\ntransfer-encoding:") >= 0:
        return -1, False
    length = _field(low, b"\r\ncontent-length:")
    if length is None or not length.isdigit():
        return -1, False
    size = int(length)
    if size > limit:
        return -1, False
    if cfg.content_disposition and low.find(b"\r\ncontent-disposition:") >= 0:
        return -1, False
    if cfg.expect_type:
        ctype = _field(low, b"\r\ncontent-type:")
        if ctype is None or not type_matches(ctype.decode("latin-1"), cfg.expect_type):
            return -1, False
    connection = _field(low, b"\r\nconnection:")
    http11 = raw[5:8] == b"1.1"
    if connection is None:
        keep = http11 and low.find(b"\r\nconnection:") < 0  # repeated: be safe
    else:
        keep = (http11 and connection.find(b"close") < 0) or connection.find(b"keep-alive") >= 0
    return size, keep


def tls_would_block(exc: BaseException) -> bool:
    """An SSL socket's "try again" (ssl is imported only by runs that use https)."""
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(exc, (ssl.SSLWantReadError, ssl.SSLWantWriteError))


def _is_ip(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            pass
    return False


def _unusual(raw: bytes) -> bool:
    """Whitespace before a colon, folded lines, bare CR or LF: heads the raw field lookups
    could read differently from ``wire.parse_head``.

    Substring scans, not a regex: one with look-arounds cost ~8 us a head. Every CR is
    followed by an LF and every LF preceded by a CR exactly when the three counts agree;
    heads rarely hold a tab, and one memchr for it spares two scans.
    """
    crlf = raw.count(b"\r\n")
    if raw.count(b"\r") != crlf or raw.count(b"\n") != crlf:
        return True
    if raw.find(b"\t") >= 0 and (raw.find(b"\t:") >= 0 or raw.find(b"\r\n\t") >= 0):
        return True
    return raw.find(b" :") >= 0 or raw.find(b"\r\n ") >= 0


def _field(low: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (``b"\\r\\nname:"``) in a lower-cased head; None when
    it is missing or repeated."""
    i = low.find(name)
    if i < 0:
        return None
    start = i + len(name)
    if low.find(name, start) >= 0:
        return None
    j = low.find(b"\r\n", start)
    return (low[start:j] if j >= 0 else low[start:]).strip()


class SigintCancels:
    """While active in the main thread under Python's default SIGINT handler, a first
    Ctrl-C sets ``cancel`` (and calls ``wake``) instead of raising wherever the main
    thread happens to be; ``hits`` says whether it came. The next one raises."""

    def __init__(self, cancel: threading.Event, wake: Callable[[], None]) -> None:
        self._cancel, self._wake = cancel, wake
        self.hits = 0
        self._handler: Callable[[int, Any], None] | None = None

    def __enter__(self) -> SigintCancels:
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._handler = self._on_sigint
            signal.signal(signal.SIGINT, self._handler)
        return self

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.hits += 1
        self._cancel.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next one raises
        self._wake()

    def __exit__(self, *exc: object) -> None:
        if self._handler is not None and signal.getsignal(signal.SIGINT) is self._handler:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self._handler = None
