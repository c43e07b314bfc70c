"""``--pipeline N``: the small-file loop sends requests ahead on keep-alive connections.

What must hold whatever the server does with them: every file arrives whole under its
own name, nothing is lost or journaled twice, and the run's guarantees (retries,
hand-offs, cancellation) are those of a run without pipelining.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fetcher import FetchConfig, fetch
from fetcher.errors import ConfigError
from fetcher.multiplex import LOOP_BODY_MAX
from tests.httpserver import TestServer
from tests.rawserver import RawServer, ok


def _bodies(count: int) -> dict[str, bytes]:
    return {f"/p{i}": os.urandom(500 + 37 * i) for i in range(count)}


def _check(dest: Path, bodies: dict[str, bytes], report: object) -> None:
    for path, body in bodies.items():
        assert (dest / path[1:]).read_bytes() == body, path
    lines = (dest / ".fetcher" / "manifest.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert sorted(r["path"] for r in records) == sorted(p[1:] for p in bodies)
    assert all(r["status"] == "ok" for r in records)
    assert not list((dest / ".fetcher" / "partial").iterdir())


def _raw(bodies: dict[str, bytes], **kw: object) -> RawServer:
    def handler(sock: socket.socket, n: int, path: str) -> bool:
        sock.sendall(ok(bodies[path]))
        return True

    return RawServer(handler, **kw)  # type: ignore[arg-type]


def _all_ok_first_time(handler: Callable[[socket.socket, int, str], bool],
                       bodies: dict[str, bytes], dest: Path) -> None:
    """Every file, whole, and none charged a second attempt (threads=2, pipeline=4)."""
    with RawServer(handler) as srv:
        report = fetch([srv.url(p) for p in bodies], dest, threads=2, pipeline=4,
                       download_processes=1)
    assert report.ok, [r.error for r in report.failures]
    _check(dest, bodies, report)
    assert all(r.attempts == 1 for r in report.results)


@pytest.mark.parametrize("tls", [False, True])
def test_pipelined_files_arrive_whole_once_each(server: TestServer, tls_server: TestServer,
                                                dest: Path, tls: bool) -> None:
    srv = tls_server if tls else server
    bodies = _bodies(300)
    urls = [srv.add(p, b) for p, b in bodies.items()]
    kw = {"verify": False} if tls else {}
    report = fetch(urls, dest, threads=4, pipeline=4, download_processes=1, **kw)
    assert report.ok and report.counts["ok"] == 300
    _check(dest, bodies, report)
    assert all(len(srv.requests(p)) == 1 for p in bodies)
    assert srv.connections <= 4
    rec = next(r for r in report.results if r.path == "p9")
    assert rec.sha256 == hashlib.sha256(bodies["/p9"]).hexdigest() and rec.attempts == 1


def test_requests_are_sent_ahead_only_when_asked(dest: Path) -> None:
    bodies = _bodies(200)
    for depth, tmp in ((1, dest / "one"), (4, dest / "four")):
        with _raw(bodies) as srv:
            report = fetch([srv.url(p) for p in bodies], tmp, threads=2, pipeline=depth,
                           download_processes=1)
            assert report.ok
            _check(tmp, bodies, report)
            assert srv.connections <= 2
            if depth == 1:
                assert srv.ahead == 0
            else:  # most requests were on the wire before the answer ahead of them
                assert srv.ahead > 100


def test_responses_a_thread_must_finish_mid_pipeline(server: TestServer, dest: Path) -> None:
    """404s, redirects, large and chunked bodies between small files: each goes to a
    thread with its connection, which is closed after it; what was pipelined behind it
    is asked again on another connection."""
    bodies = _bodies(120)
    for path, body in bodies.items():
        server.add(path, body)
    big = os.urandom(LOOP_BODY_MAX + 5000)
    server.add("/big", big)
    server.add("/chunky", b"c" * 3000)
    server.script("/chunky", "chunked")
    server.add("/moved", redirect="/p3")
    paths = list(bodies)
    urls = []
    for i, path in enumerate(paths):
        urls.append(server.url(path))
        if i % 10 == 5:
            extra = ("/big", "/chunky", "/missing", "/moved")[i // 10 % 4]
            urls.append(server.url(extra) + f"?n={i}")
    report = fetch(urls, dest, threads=3, pipeline=4, download_processes=1, retries=0)
    by_url = {r.url: r for r in report.results}
    for path, body in bodies.items():
        assert (dest / path[1:]).read_bytes() == body
    for url, rec in by_url.items():
        if "/missing" in url:
            assert rec.status == "failed" and rec.http_status == 404
        else:
            assert rec.status == "ok", (url, rec.error)
            data = (dest / rec.path).read_bytes()
            if "/big" in url:
                assert data == big
            elif "/chunky" in url:
                assert data == b"c" * 3000
            elif "/moved" in url:
                assert data == bodies["/p3"]
    assert len(report.results) == len(urls)
    # Asked again at most once: only when a response ahead of it went to a thread.
    assert all(len(server.requests(p)) <= 2 for p in paths if p != "/p3")  # moved: p3


def test_connection_close_mid_pipeline_sends_the_rest_again(dest: Path) -> None:
    bodies = _bodies(60)

    def handler(sock: socket.socket, n: int, path: str) -> bool:
        if n == 2:  # the third answer of every connection ends it
            body = bodies[path]
            sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n"
                         b"\r\n%s" % (len(body), body))
            return False
        sock.sendall(ok(bodies[path]))
        return True

    _all_ok_first_time(handler, bodies, dest)


def test_server_closing_without_answering_the_pipelined_costs_no_attempt(
        dest: Path) -> None:
    """A keep-alive limit: the server answers three requests, then closes with the
    rest unanswered. They are sent again on a new connection, not counted as failures."""
    bodies = _bodies(60)

    def handler(sock: socket.socket, n: int, path: str) -> bool:
        if n == 3:
            return False
        sock.sendall(ok(bodies[path]))
        return True

    _all_ok_first_time(handler, bodies, dest)


def test_a_server_that_drops_pipelined_requests_turns_pipelining_off(dest: Path) -> None:
    """Requests that arrive behind another are thrown away (a server without pipelining):
    the one waiting for its answer times out and is retried; the origin's connections
    then send one request at a time, and the run completes."""
    bodies = _bodies(40)
    with _raw(bodies, drop_ahead=True) as srv:
        started = time.monotonic()
        report = fetch([srv.url(p) for p in bodies], dest, threads=2, pipeline=4,
                       download_processes=1, timeout=1.0, backoff_base=0.01)
        took = time.monotonic() - started
        dropped = srv.ahead
    assert report.ok, [r.error for r in report.failures]
    _check(dest, bodies, report)
    assert dropped > 0
    assert took < 6  # one timeout per connection that pipelined, not one per file
    assert sum(r.attempts > 1 for r in report.results) <= 2


def test_pipelining_with_download_processes(server: TestServer, dest: Path) -> None:
    bodies = _bodies(400)
    urls = [server.add(p, b) for p, b in bodies.items()]
    report = fetch(urls, dest, threads=6, pipeline=3, download_processes=2)
    assert report.ok and report.processes == 2
    _check(dest, bodies, report)
    assert all(len(server.requests(p)) == 1 for p in bodies)


def test_ctrl_c_journals_every_item_pipelined_or_held(dest: Path, tmp_path: Path) -> None:
    """Answers stop after a few files: on Ctrl-C every item taken from the list, in
    flight, queued behind another or waiting for a connection, is journaled."""
    bodies = _bodies(200)
    answered = threading.Semaphore(25)

    def handler(sock: socket.socket, n: int, path: str) -> bool:
        if not answered.acquire(blocking=False):
            time.sleep(30)
            return False
        sock.sendall(ok(bodies[path]))
        return True

    with RawServer(handler) as srv:
        lst = tmp_path / "urls.txt"
        lst.write_text("".join(srv.url(p) + "\n" for p in bodies))
        proc = subprocess.Popen(
            [sys.executable, "-m", "fetcher", "get", str(lst), "-o", str(dest),
             "--threads", "3", "--pipeline", "4", "--download-processes", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        manifest = dest / ".fetcher" / "manifest.jsonl"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if manifest.exists() and len(manifest.read_text().splitlines()) >= 20:
                break
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    assert proc.returncode == 130
    records = [json.loads(x) for x in manifest.read_text().splitlines()]
    paths = [r["path"] for r in records]
    assert len(paths) == len(set(paths))  # nothing journaled twice
    ok_ = [r for r in records if r["status"] == "ok"]
    cancelled = [r for r in records if r["error_type"] == "CancelledError"]
    assert len(ok_) == 25 and len(ok_) + len(cancelled) == len(records)
    assert len(cancelled) >= 3  # at least the connections' items in flight
    for r in ok_:
        assert (dest / r["path"]).read_bytes() == bodies["/" + r["path"]]
    for r in cancelled:
        assert not (dest / r["path"]).exists()


@pytest.mark.parametrize("depth", [0, 17])
def test_pipeline_out_of_range_is_a_config_error(depth: int) -> None:
    with pytest.raises(ConfigError, match="pipeline"):
        FetchConfig(pipeline=depth)


def test_cli_rejects_a_bad_pipeline(tmp_path: Path) -> None:
    lst = tmp_path / "u.txt"
    lst.write_text("http://127.0.0.1:9/x\n")
    proc = subprocess.run([sys.executable, "-m", "fetcher", "get", str(lst), "-o",
                           str(tmp_path / "o"), "--pipeline", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "pipeline" in proc.stderr


def test_checksum_failures_mid_pipeline(dest: Path) -> None:
    """An item the loop hands to a thread after its body (a checksum mismatch): the
    connection it came on gives its share of ``threads`` back (closed, what was queued
    on it asked again), and every item still ends as it should."""
    bodies = {f"/p{i}": os.urandom(800) for i in range(90)}
    with _raw(bodies) as srv:
        jobs = [{"url": srv.url(p), "sha256": "0" * 64 if i % 3 == 0
                 else hashlib.sha256(b).hexdigest()} for i, (p, b) in enumerate(bodies.items())]
        report = fetch(jobs, dest, threads=2, pipeline=4, download_processes=1, retries=1,
                       backoff_base=0.001)
    failed = {r.path for r in report.failures}
    assert failed == {f"p{i}" for i in range(0, 90, 3)}
    assert all(r.error_type == "ChecksumError" and r.attempts == 2 for r in report.failures)
    for i in range(1, 90, 3):
        assert (dest / f"p{i}").read_bytes() == bodies[f"/p{i}"]
    assert not list((dest / ".fetcher" / "partial").iterdir())


def test_retry_after_mid_pipeline_waits_before_asking_again(dest: Path) -> None:
    """A 503 with Retry-After on a pipelining connection: what was queued behind it (its
    answers are lost with the connection) is asked again only after the pause, not at
    once (review: asked again during the pause)."""
    bodies = _bodies(120)
    told: list[float] = []
    seen: dict[str, list[float]] = {}

    def handler(sock: socket.socket, n: int, path: str) -> bool:
        seen.setdefault(path, []).append(time.monotonic())
        if path == "/p30" and not told:
            told.append(time.monotonic())
            sock.sendall(b"HTTP/1.1 503 Busy\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n")
            return True
        sock.sendall(ok(bodies[path]))
        return True

    with RawServer(handler) as srv:
        report = fetch([srv.url(p) for p in bodies], dest, threads=2, pipeline=4,
                       download_processes=1)
    assert report.ok
    _check(dest, bodies, report)
    assert len(seen.pop("/p30")) == 2
    again = {p: t for p, t in seen.items() if len(t) > 1}
    assert all(len(t) == 2 for t in again.values())
    for path, (_, second) in again.items():
        assert second - told[0] > 0.9, path
