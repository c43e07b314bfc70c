"""A real HTTP/1.1 server on 127.0.0.1 for the tests: keep-alive, Range, ETags, faults.

Each route holds a body and a *script*: a queue of faults consumed one per request
(``"status:503:2"`` answers 503 with Retry-After 2; ``"cut:100"`` sends 100 bytes of
the declared body and hangs up; ``"stall:5"`` goes silent for 5 s mid-body;
``"reset"`` closes without answering; ``"norange"`` ignores Range once). When the
script is empty the route answers normally. Every request is logged.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Route:
    body: bytes = b""
    content_type: str = "application/octet-stream"
    etag: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    script: deque[str] = field(default_factory=deque)
    ranges: bool = True
    redirect: str | None = None
    status: int = 200
    slow_bps: int | None = None
    chunked: bool = False
    served: int = 0
    swap_after: int | None = None
    """After this many requests, the route serves ``swap_to`` (body, etag) instead."""
    swap_to: tuple[bytes, str] | None = None

    def __post_init__(self) -> None:
        if self.etag is None:
            self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:16] + '"'


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without NODELAY, Nagle plus the
        # client's delayed ACK would stall every keep-alive response by ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.lock:
            self.server.connections += 1

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            srv.active += 1
            srv.max_active = max(srv.max_active, srv.active)
        self._counted = True
        try:
            self._get()
        finally:
            self._finished()

    def _finished(self) -> None:
        if self._counted:
            self._counted = False
            with self.server.lock:
                self.server.active -= 1

    def _get(self) -> None:
        srv = self.server
        path = self.path
        with srv.lock:
            srv.log.append((path, dict(self.headers.items())))
            srv.times.append((path, time.monotonic()))
            route = srv.routes.get(path.split("?")[0])
            fault = route.script.popleft() if route and route.script else None
            if route is not None:
                if route.swap_after is not None and route.served == route.swap_after \
                        and route.swap_to is not None:
                    route.body, route.etag = route.swap_to  # the resource changes now
                route.served += 1
        if route is None:
            self._simple(404, b"not found")
            return
        if fault == "reset":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault and fault.startswith("status:"):
            parts = fault.split(":", 2)
            extra = {"Retry-After": parts[2]} if len(parts) > 2 else {}
            self._simple(int(parts[1]), b"<html>error page</html>", extra, "text/html")
            return
        if route.redirect is not None:
            self._simple(302, b"", {"Location": route.redirect})
            return
        if route.status != 200:
            self._simple(route.status, b"<html>error</html>", ctype="text/html")
            return
        self._serve_body(route, fault)

    def _serve_body(self, route: Route, fault: str | None) -> None:
        body, start = route.body, 0
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        honour = route.ranges and fault != "norange" and rng is not None
        if honour and if_range is not None and if_range != route.etag:
            honour = False  # resource changed: RFC 9110 says send the whole thing
        status = 200
        headers = {"ETag": route.etag or "", "Content-Type": route.content_type,
                   **route.headers}
        if route.ranges:
            headers["Accept-Ranges"] = "bytes"
        if honour and rng:
            spec = rng.removeprefix("bytes=")
            first, _, last = spec.partition("-")
            start = int(first)
            end = int(last) if last else len(body) - 1
            if start >= len(body):
                self._simple(416, b"", {"Content-Range": f"bytes */{len(body)}"})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(body)}"
            body = body[start:end + 1]
        if fault == "chunked" or route.chunked:
            self._send_chunked(status, headers, body)
            return
        if fault == "eof":  # no length: the body ends when the connection does
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return
        headers["Content-Length"] = str(len(body))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        try:
            if fault and fault.startswith("cut:"):
                self.wfile.write(body[: int(fault[4:])])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault and fault.startswith("stall:"):
                half = len(body) // 2
                self.wfile.write(body[:half])
                self.wfile.flush()
                time.sleep(float(fault[6:]))
                self.close_connection = True
                return
            if fault == "drop-idle":  # answer fully, then hang up without saying so
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True
                return
            if route.slow_bps:
                step = max(1, route.slow_bps // 10)
                for i in range(0, len(body), step):
                    time.sleep(0.1)
                    if i + step >= len(body):
                        self._finished()  # before the last byte: the client may go on
                    self.wfile.write(body[i:i + step])
                    self.wfile.flush()
                return
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send_chunked(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        step = 7777
        for i in range(0, len(body), step):
            piece = body[i:i + step]
            self.wfile.write(f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n")
        self.wfile.write(b"0\r\nX-Trailer: yes\r\n\r\n")

    def _simple(self, status: int, body: bytes, headers: dict[str, str] | None = None,
                ctype: str = "text/plain") -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 drops the SYNs of a burst of connects, which
    # then wait out TCP's retransmit back-off (1 s, 3 s, ...); real servers queue 511+.
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-response are part of the tests
    routes: dict[str, Route]
    log: list[tuple[str, dict[str, str]]]
    times: list[tuple[str, float]]
    lock: threading.Lock
    connections: int
    active: int
    max_active: int


class TestServer:
    """Start with ``TestServer().start()``; ``url(path)``; ``add(path, body, ...)``."""

    __test__ = False  # not a pytest test class

    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        self._srv = _Server(("127.0.0.1", 0), _Handler)
        self._tls = tls is not None
        if tls is not None:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self._srv.socket = ctx.wrap_socket(self._srv.socket, server_side=True)
        self._srv.routes = {}
        self._srv.log = []
        self._srv.times = []
        self._srv.lock = threading.Lock()
        self._srv.connections = self._srv.active = self._srv.max_active = 0
        self._thread = threading.Thread(target=self._srv.serve_forever, args=(0.05,),
                                        daemon=True)

    def start(self) -> TestServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()

    @property
    def base(self) -> str:
        host, port = self._srv.server_address[:2]
        scheme = "https" if self._tls else "http"
        return f"{scheme}://{host!s}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, body: bytes = b"", **kw: Any) -> str:
        with self._srv.lock:
            self._srv.routes[path] = Route(body=body, **kw)
        return self.url(path)

    def url_list(self, path: Path, prefix: str, count: int, body: bytes) -> Path:
        """Serve ``count`` files ``/{prefix}{i}`` of ``body`` and write their URLs to
        ``path``, one a line (a URL list for the CLI or ``fetch``)."""
        urls = [self.add(f"/{prefix}{i}", body) for i in range(count)]
        path.write_text("\n".join(urls) + "\n")
        return path

    def route(self, path: str) -> Route:
        return self._srv.routes[path]

    def script(self, path: str, *faults: str) -> None:
        with self._srv.lock:
            self._srv.routes[path].script.extend(faults)

    def requests(self, path: str | None = None) -> list[tuple[str, dict[str, str]]]:
        with self._srv.lock:
            log = list(self._srv.log)
        return [e for e in log if path is None or e[0] == path]

    @property
    def connections(self) -> int:
        """TCP connections accepted so far (keep-alive keeps this low)."""
        return self._srv.connections

    @property
    def max_active(self) -> int:
        """Most requests served at the same moment."""
        return self._srv.max_active

    def times(self) -> list[tuple[str, float]]:
        """(path, time.monotonic()) of every request as it arrived."""
        with self._srv.lock:
            return list(self._srv.times)

    def clear_log(self) -> None:
        with self._srv.lock:
            self._srv.log.clear()
            self._srv.times.clear()


if __name__ == "__main__":  # a standalone server for subprocess tests
    import json
    import os
    import sys

    spec = json.loads(sys.argv[1])
    srv = TestServer()
    for p, size in spec.get("files", {}).items():
        srv.add(p, os.urandom(size))
    srv.start()
    print(srv.base, flush=True)
    threading.Event().wait()
