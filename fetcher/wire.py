"""A lean HTTP/1.1 client connection: the bytes on the wire, nothing else.

Why not urllib3 here: on 2,000 x 10 KiB files from local nginx, urllib3 (with
http.client and its email-module header parser underneath) spends about 1,100 Python
calls and ~200 us of CPU per request, which caps a thread pool at a few thousand
files per second and dominates the run. This module does one GET per call with a
pre-built request head, parses the status line and headers with ``bytes.split``,
and streams the body (Content-Length, chunked, or until close) straight from the
socket. Policy (redirects, auth, errors with URLs) stays in ``http.py``, which also
keeps urllib3 for proxies.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ssl

MAX_HEAD = 64 * 1024
_RECV = 256 * 1024
# Below glibc's mmap threshold: a 256 KiB recv buffer for every response head costs an
# mmap, page faults and a munmap per request. Small bodies arrive within this read.
_HEAD_RECV = 64 * 1024


class WireError(Exception):
    """A transport failure; ``kind`` is connect, timeout, closed, protocol or truncated."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class StaleConnection(WireError):
    """A reused keep-alive connection was closed by the server before it answered."""


class Headers(dict[str, str]):
    """Response headers with case-insensitive lookup (names stored lower-case)."""

    def get(self, key: str, default: Any = None) -> Any:
        return dict.get(self, key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return dict.__getitem__(self, key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and dict.__contains__(self, key.lower())


_tls_lock = threading.Lock()
_tls_cache: dict[tuple[Any, ...], ssl.SSLContext] = {}
# A process forked while another thread loads CA certificates must not inherit the lock
# held (fan-out workers fork; a caller may run threads): fork waits for it instead.
os.register_at_fork(before=_tls_lock.acquire, after_in_parent=_tls_lock.release,
                    after_in_child=_tls_lock.release)


def tls_context(verify: bool | str, cert: str | tuple[str, str] | None) -> ssl.SSLContext:
    """One shared context per TLS setting (loading CA certificates costs milliseconds)."""
    import ssl  # only runs that use https pay for importing it (~7 ms)

    key = (verify, cert)
    with _tls_lock:
        ctx = _tls_cache.get(key)
        if ctx is None:
            ctx = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
            if verify is False:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if isinstance(cert, str):
                ctx.load_cert_chain(cert)
            elif cert is not None:
                ctx.load_cert_chain(cert[0], cert[1])
            _tls_cache[key] = ctx
        return ctx


def _connect(host: str, port: int, timeout: float, cancel: threading.Event | None,
             on_socket: Callable[[socket.socket | None], None] | None) -> socket.socket:
    """Connect in short slices so that ``cancel`` (Ctrl-C) interrupts a hanging connect."""
    try:
        infos = socket.getaddrinfo(_host_bytes(host), port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise WireError("connect", f"cannot resolve {host}: {exc}") from exc
    last: BaseException | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        if on_socket is not None:
            on_socket(sock)
        try:
            sock.setblocking(False)
            err = sock.connect_ex(address)
            deadline = time.monotonic() + timeout
            while err in (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WireError("connect", f"connect timed out after {timeout:g} s")
                if cancel is not None and cancel.is_set():
                    raise WireError("connect", "cancelled while connecting")
                _, writable, _ = select.select([], [sock], [], min(left, 0.2))
                if writable:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            sock.settimeout(timeout)
            return sock
        except WireError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            last = exc
    raise WireError("connect", f"{type(last).__name__}: {last}")


def _host_bytes(host: str) -> str | bytes:
    """An ASCII host as bytes: getaddrinfo would otherwise run it through the idna codec,
    which imports unicodedata (~3 ms) to change nothing (http.py IDNA-encodes hosts)."""
    return host.encode("ascii") if host.isascii() else host


class Connection:
    """One keep-alive connection to one origin."""

    __slots__ = ("buf", "host", "requests", "sock")

    def __init__(self, host: str, port: int, *, timeout: float,
                 tls: ssl.SSLContext | None, cancel: threading.Event | None = None,
                 on_socket: Callable[[socket.socket | None], None] | None = None) -> None:
        self.host = host
        sock = _connect(host, port, timeout, cancel, on_socket)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=host)
        except TimeoutError as exc:
            sock.close()
            raise WireError("connect", "TLS handshake timed out") from exc
        except OSError as exc:  # ssl.SSLError included
            sock.close()
            raise WireError("connect", f"{type(exc).__name__}: {exc}") from exc
        self.sock = sock
        self.buf = bytearray()
        self.requests = 0

    @classmethod
    def adopt(cls, sock: socket.socket, host: str, buf: bytearray, requests: int,
              timeout: float) -> Connection:
        """Wrap a socket another loop connected (and used ``requests`` times)."""
        sock.settimeout(timeout)
        conn = cls.__new__(cls)
        conn.host, conn.sock, conn.buf, conn.requests = host, sock, buf, requests
        return conn

    def request(self, head: bytes) -> tuple[int, Headers, bool]:
        """Send a request head; read the response head. Returns (status, headers, 1.1?)."""
        reused = self.requests > 0
        self.requests += 1
        try:
            self.sock.sendall(head)
            while True:
                status, headers, http11 = self._read_head(reused)
                if status >= 200 or status == 101:
                    return status, headers, http11
                reused = False  # 1xx interim response: the real one follows
        except TimeoutError as exc:
            raise WireError("timeout", "timed out waiting for the response") from exc
        except (BrokenPipeError, ConnectionResetError) as exc:
            if reused:
                raise StaleConnection("closed", "keep-alive connection closed") from exc
            raise WireError("closed", f"{type(exc).__name__}: {exc}") from exc
        except OSError as exc:  # ssl.SSLError included
            raise WireError("closed", f"{type(exc).__name__}: {exc}") from exc

    def _read_head(self, reused: bool) -> tuple[int, Headers, bool]:
        buf = self.buf
        start = 0
        while (end := buf.find(b"\r\n\r\n", start)) < 0:
            if len(buf) > MAX_HEAD:
                raise WireError("protocol", "response head larger than 64 KiB")
            start = max(0, len(buf) - 3)
            data = self.sock.recv(_HEAD_RECV)
            if not data:
                if reused and not buf:
                    raise StaleConnection("closed", "keep-alive connection closed")
                raise WireError("closed", "connection closed before the response head")
            buf += data
        if end > MAX_HEAD:
            raise WireError("protocol", "response head larger than 64 KiB")
        head = bytes(buf[:end])
        del buf[: end + 4]
        return parse_head(head)

    def close(self) -> None:
        """Close the socket (never raises)."""
        with contextlib.suppress(OSError):
            self.sock.close()


def parse_head(head: bytes) -> tuple[int, Headers, bool]:
    """Status, headers and HTTP/1.1-ness of a response head (without its final CRLFCRLF)."""
    status_line, _, rest = head.decode("latin-1").partition("\r\n")
    version, _, tail = status_line.partition(" ")
    code = tail[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise WireError("protocol", f"not an HTTP/1.x status line: {status_line[:80]!r}")
    fields: dict[str, str] = {}
    for line in rest.split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            key = name.strip().lower()
            value = value.strip()
            old = fields.get(key)
            fields[key] = value if old is None else f"{old}, {value}"
    return int(code), Headers(fields), version == "HTTP/1.1"


class Body:
    """A response body read from a connection: by length, chunked, or until close."""

    __slots__ = ("_chunk_left", "_chunked", "conn", "done", "keep_alive", "remaining")

    def __init__(self, conn: Connection, status: int, headers: Headers, *, http11: bool,
                 head_request: bool = False) -> None:
        self.conn = conn
        te = headers.get("transfer-encoding", "").lower()
        self._chunked = "chunked" in te
        self._chunk_left = 0
        length = headers.get("content-length")
        conn_hdr = headers.get("connection", "").lower()
        self.keep_alive = (http11 and "close" not in conn_hdr) or "keep-alive" in conn_hdr
        if head_request or status in (204, 304) or 100 <= status < 200:
            self.remaining: int | None = 0
        elif self._chunked:
            self.remaining = None
        elif length is not None and length.strip().isdigit():
            self.remaining = int(length)
        elif length is not None:
            # "5, 5" (a repeated header) is one length (RFC 9110 8.6); "5, 7" is no
            # framing to trust.
            values = {v.strip() for v in length.split(",")}
            value = values.pop() if len(values) == 1 else ""
            if not (value.isascii() and value.isdigit()):
                raise WireError("protocol", f"invalid Content-Length {length[:40]!r}")
            self.remaining = int(value)
        else:
            self.remaining = None  # read until the server closes
            self.keep_alive = False
        self.done = self.remaining == 0 and not self._chunked

    def chunks(self, size: int) -> Iterator[bytes]:
        """Body bytes in pieces of at most ``size``, as they arrive."""
        if self._chunked:
            yield from self._chunked_body(size)
            return
        conn = self.conn
        buf = conn.buf
        recv = conn.sock.recv
        remaining = self.remaining
        if buf:
            take = len(buf) if remaining is None else min(len(buf), remaining)
            piece = bytes(buf[:take])
            del buf[:take]
            if remaining is not None:
                remaining -= take
                self.remaining = remaining
            yield piece
        while remaining is None or remaining > 0:
            data = self._recv(recv, size if remaining is None else min(size, remaining))
            if not data:
                if remaining is None:
                    break
                raise WireError("truncated",
                                f"connection closed with {remaining} bytes of the body missing")
            if remaining is not None:
                remaining -= len(data)
                self.remaining = remaining
            yield data
        self.done = True

    def readinto(self, buf: memoryview) -> int:
        """Fill the front of ``buf`` with body bytes; 0 at the end. Length-framed bodies
        only (``chunked`` is False): read straight into the caller's buffer, no copies
        and no fresh allocation per read."""
        remaining = self.remaining
        if remaining == 0:
            self.done = True
            return 0
        want = len(buf) if remaining is None else min(len(buf), remaining)
        pending = self.conn.buf
        if pending:
            n = min(want, len(pending))
            buf[:n] = pending[:n]
            del pending[:n]
        else:
            try:
                n = self.conn.sock.recv_into(buf, want)
            except TimeoutError as exc:
                raise WireError("timeout", "read timed out") from exc
            except OSError as exc:
                raise WireError("truncated", f"{type(exc).__name__}: {exc}") from exc
            if not n:
                if remaining is None:
                    self.done = True
                    return 0
                raise WireError("truncated",
                                f"connection closed with {remaining} bytes of the body missing")
        if remaining is not None:
            self.remaining = remaining - n
            self.done = self.remaining == 0
        return n

    @property
    def chunked(self) -> bool:
        return self._chunked

    @staticmethod
    def _recv(recv: Any, n: int) -> bytes:
        try:
            data: bytes = recv(n)
            return data
        except TimeoutError as exc:
            raise WireError("timeout", "read timed out") from exc
        except OSError as exc:  # ssl.SSLError included
            raise WireError("truncated", f"{type(exc).__name__}: {exc}") from exc

    def _fill(self) -> None:
        data = self._recv(self.conn.sock.recv, _RECV)
        if not data:
            raise WireError("truncated", "connection closed inside a chunked body")
        self.conn.buf += data

    def _line(self) -> bytes:
        buf = self.conn.buf
        while (i := buf.find(b"\r\n")) < 0:
            if len(buf) > MAX_HEAD:
                raise WireError("protocol", "chunk header too long")
            self._fill()
        line = bytes(buf[:i])
        del buf[: i + 2]
        return line

    def _chunked_body(self, size: int) -> Iterator[bytes]:
        buf = self.conn.buf
        while True:
            if self._chunk_left == 0:
                text = self._line().split(b";", 1)[0].strip()
                if not text or len(text) > 16 or text.strip(b"0123456789abcdefABCDEF"):
                    raise WireError("protocol", f"bad chunk size {text[:20]!r}")
                self._chunk_left = int(text, 16)
                if self._chunk_left == 0:
                    while self._line():  # trailers, up to the empty line
                        pass
                    self.done = True
                    return
            if not buf:
                self._fill()
            take = min(len(buf), self._chunk_left, size)
            piece = bytes(buf[:take])
            del buf[:take]
            self._chunk_left -= take
            if self._chunk_left == 0:
                while len(buf) < 2:
                    self._fill()
                if buf[:2] != b"\r\n":
                    raise WireError("protocol", "chunk not followed by CRLF")
                del buf[:2]
            yield piece
