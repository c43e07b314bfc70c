"""A bare HTTP/1.1 server on 127.0.0.1 for protocol edge cases the tidy one cannot make:
resets on reused connections, interim 1xx responses, counts of open connections,
pipelined requests (counted; or dropped, as a server that does not support them would).

``handler(sock, n, path)`` answers the n-th request of a connection (0-based) by writing
to ``sock`` itself; it returns False to end the connection.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

Handler = Callable[[socket.socket, int, str], bool]


def ok(body: bytes) -> bytes:
    """A complete keep-alive 200 response."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class RawServer:
    __test__ = False

    def __init__(self, handler: Handler, *, drop_ahead: bool = False) -> None:
        self.handler = handler
        self.drop_ahead = drop_ahead
        self.ahead = 0
        """Requests that had arrived whole before the one ahead of them was answered."""
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.open_now = self.max_open = self.connections = 0
        self.paths: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self.open_now += 1
                self.max_open = max(self.max_open, self.open_now)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf, n = b"", 0
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                path = head.split(b" ")[1].decode()
                with self.lock:
                    self.paths.append(path)
                    self.ahead += buf.count(b"\r\n\r\n")
                if self.drop_ahead:
                    buf = b""
                if not self.handler(conn, n, path):
                    return
                n += 1
        except OSError:
            pass
        finally:
            with self.lock:
                self.open_now -= 1
            conn.close()
