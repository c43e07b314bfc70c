"""A tiny HTTP/1.1 file server on 127.0.0.1 for the examples (no internet needed).

    with serve_directory(root, latency=0.02) as base_url:
        urls = [f"{base_url}/images/a.jpg", ...]

``latency`` delays every response, so downloads behave like downloads (waiting on the
network) even over loopback. The server runs on daemon threads of the calling process.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class _Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    disable_nagle_algorithm = True  # headers and body leave at once (no 40 ms stalls)
    latency = 0.0

    def do_GET(self) -> None:
        if self.latency:
            time.sleep(self.latency)
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


@contextlib.contextmanager
def serve_directory(root: Path, *, latency: float = 0.0) -> Iterator[str]:
    """Serve ``root`` on an ephemeral port; yields the base URL (no trailing slash)."""
    handler = functools.partial(type("Handler", (_Handler,), {"latency": latency}),
                                directory=str(root))
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
