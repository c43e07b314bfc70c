"""A local HTTP/1.1 file server with a fixed delay per request, in its own process.

The demos download from it instead of the internet, so they run anywhere and measure
the same thing every time. Over loopback a request takes microseconds, which would
hide what makes downloading I/O-bound; each response therefore waits ``latency``
seconds first (default 20 ms, a plausible round trip to a nearby server). The server
runs in a separate process so that its CPU time is not mixed into the client's.

Run by hand: ``python -m fetcher.demos.server ROOT --latency 0.02``; it prints
``PORT <n>`` and serves until stdin closes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

DEFAULT_LATENCY_S = 0.02


class _Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    disable_nagle_algorithm = True  # else headers and body meet delayed ACKs: +40 ms
    latency = DEFAULT_LATENCY_S

    def do_GET(self) -> None:
        time.sleep(self.latency)
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # many workers connect at once; the default 5 drops SYNs


def serve(root: Path, latency: float) -> None:
    """Serve ``root`` on an ephemeral port of 127.0.0.1 until stdin closes."""
    handler = functools.partial(type("H", (_Handler,), {"latency": latency}),
                                directory=str(root))
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"PORT {server.server_address[1]}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        sys.stdin.read()  # returns when the parent closes the pipe (or dies)
    server.shutdown()


class LocalServer:
    """Start ``serve(root, latency)`` in a child process: ``with LocalServer(d) as s:``.

    ``s.url("a/b.bin")`` is the URL of ``root/a/b.bin``; ``s.pid`` is the server's pid
    (the demos exclude it from CPU accounting).
    """

    def __init__(self, root: Path, *, latency: float = DEFAULT_LATENCY_S) -> None:
        self.root = root
        self.latency = latency
        self._proc: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        """The server process id."""
        if self._proc is None:
            raise RuntimeError("server not started")
        return self._proc.pid

    def url(self, rel: str) -> str:
        """The URL of a file below ``root``."""
        return f"http://127.0.0.1:{self.port}/{rel.lstrip('/')}"

    def __enter__(self) -> LocalServer:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "fetcher.demos.server", str(self.root),
             "--latency", str(self.latency)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.startswith("PORT "):
            self._proc.kill()
            self._proc.wait()
            raise RuntimeError(f"the demo HTTP server did not start (said {line!r})")
        self.port = int(line.split()[1])
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a stuck server
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m fetcher.demos.server ROOT [--latency S]``."""
    parser = argparse.ArgumentParser(description="Serve ROOT on 127.0.0.1 with a delay.")
    parser.add_argument("root", type=Path)
    parser.add_argument("--latency", type=float, default=DEFAULT_LATENCY_S)
    args = parser.parse_args(argv)
    serve(args.root, args.latency)


if __name__ == "__main__":
    main()
