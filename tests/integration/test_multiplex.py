"""The single-thread loop (multiplex.py) and its hand-offs to the thread pool.

The loop finishes plain small 200s itself; everything else goes to a thread with the
response already read, so the claims here are about request counts (nothing is asked
twice), concurrency bounds, and that every fault still ends as download_one decides.
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
from pathlib import Path

import pytest

from fetcher import FetchConfig, fetch
from fetcher.multiplex import LOOP_BODY_MAX, loop_eligible
from tests.httpserver import TestServer
from tests.rawserver import RawServer, ok


def _count(server: TestServer, path: str) -> int:
    return len(server.requests(path))


def test_small_files_go_over_at_most_threads_connections(server: TestServer,
                                                          dest: Path) -> None:
    bodies = {f"/s{i}": os.urandom(1000 + i) for i in range(120)}
    urls = [server.add(p, b) for p, b in bodies.items()]
    report = fetch(urls, dest, threads=4)
    assert report.ok and report.counts["ok"] == 120
    assert server.connections <= 4 and server.max_active <= 4
    for p, b in bodies.items():
        assert (dest / p[1:]).read_bytes() == b
    rec = next(r for r in report.results if r.path == "s7")
    assert rec.sha256 == hashlib.sha256(bodies["/s7"]).hexdigest()
    assert rec.attempts == 1 and rec.http_status == 200
    assert not list((dest / ".fetcher" / "partial").iterdir())


@pytest.mark.parametrize("kind", ["404", "redirect", "large", "chunked", "eof"])
def test_handed_off_responses_are_not_requested_twice(server: TestServer, dest: Path,
                                                      kind: str) -> None:
    body = os.urandom(LOOP_BODY_MAX + 1 if kind == "large" else 5000)
    server.add("/target", body)
    path = "/target"
    if kind == "404":
        path = "/missing"
    elif kind == "redirect":
        server.add("/moved", redirect="/target")
        path = "/moved"
    elif kind in ("chunked", "eof"):
        server.script("/target", kind)
    report = fetch([server.url(path)], dest, retries=2)
    assert _count(server, path) == 1
    if kind == "404":
        assert report.results[0].error_type == "HTTPStatusError"
        assert report.results[0].http_status == 404
        return
    assert report.ok, report.failures
    assert _count(server, "/target") == 1
    assert (dest / path[1:]).read_bytes() == body


def test_hand_offs_and_loop_items_share_the_thread_budget(server: TestServer,
                                                          dest: Path) -> None:
    urls = []
    for i in range(40):
        size = 200_000 if i % 5 == 0 else 2000  # every fifth streams on a thread
        urls.append(server.add(f"/m{i}", os.urandom(size), slow_bps=2_000_000
                               if size > LOOP_BODY_MAX else None))
    report = fetch(urls, dest, threads=3)
    assert report.ok, report.failures
    assert server.max_active <= 3


def test_small_body_cut_or_stalled_is_retried(server: TestServer, dest: Path) -> None:
    cut = server.add("/cut", os.urandom(30_000))
    stall = server.add("/stall", os.urandom(30_000))
    server.script("/cut", "cut:1000")
    server.script("/stall", "stall:3")
    started = time.monotonic()
    report = fetch([cut, stall], dest, timeout=0.5, backoff_base=0.01, backoff_max=0.02)
    assert report.ok, report.failures
    assert time.monotonic() - started < 2.5  # the stall was cut short by the timeout
    assert {r.path: r.attempts for r in report.results} == {"cut": 2, "stall": 2}
    assert (dest / "cut").stat().st_size == 30_000


def test_checksum_mismatch_counts_as_an_attempt(server: TestServer, dest: Path) -> None:
    url = server.add("/sum", b"actual bytes")
    report = fetch([{"url": url, "sha256": "0" * 64}], dest, retries=5, backoff_base=0.01)
    result = report.results[0]
    assert result.error_type == "ChecksumError"
    assert result.attempts == 2  # two mismatches in a row: the list is wrong, stop
    assert not (dest / "sum").exists()


def test_expect_type_and_content_disposition_are_handed_off(server: TestServer,
                                                            dest: Path) -> None:
    page = server.add("/page", b"<html/>", content_type="text/html")
    named = server.add("/dl?id=3", b"data",
                       headers={"Content-Disposition": 'attachment; filename="report.csv"'})
    server.add("/dl", b"data",
               headers={"Content-Disposition": 'attachment; filename="report.csv"'})
    report = fetch([page], dest, expect_type="image/*")
    assert report.results[0].error_type == "ContentTypeError"
    report = fetch([named], dest, content_disposition=True)
    assert report.ok and (dest / "report.csv").read_bytes() == b"data"
    assert _count(server, "/page") == 1 and _count(server, "/dl?id=3") == 1


def test_connection_close_responses_reconnect(server: TestServer, dest: Path) -> None:
    urls = [server.add(f"/c{i}", os.urandom(700), headers={"Connection": "close"})
            for i in range(8)]
    report = fetch(urls, dest, threads=2, retries=0)
    assert report.ok, report.failures
    assert all(r.attempts == 1 for r in report.results)


def test_two_origins_share_the_connection_budget(dest: Path) -> None:
    a, b = TestServer().start(), TestServer().start()
    try:
        urls = []
        for i in range(30):
            urls.append(a.add(f"/a{i}", os.urandom(900)))
            urls.append(b.add(f"/b{i}", os.urandom(900)))
        report = fetch(urls, dest, threads=2, retries=0)
        assert report.ok, report.failures
        assert a.max_active + b.max_active <= 4
        assert (dest / "a29").stat().st_size == 900 and (dest / "b29").stat().st_size == 900
    finally:
        a.stop()
        b.stop()


def test_tls_small_files_reuse_one_connection(tls_server: TestServer, dest: Path,
                                              cert: tuple[str, str]) -> None:
    bodies = [os.urandom(20_000) for _ in range(12)]
    urls = [tls_server.add(f"/t{i}", b) for i, b in enumerate(bodies)]
    report = fetch(urls, dest, verify=cert[0], threads=1)
    assert report.ok, report.failures
    assert tls_server.connections == 1
    assert all((dest / f"t{i}").read_bytes() == b for i, b in enumerate(bodies))


def test_cancel_stops_the_loop_and_journals_what_was_in_flight(server: TestServer,
                                                      dest: Path) -> None:
    urls = [server.add(f"/w{i}", os.urandom(20_000)) for i in range(6)]
    for i in range(6):
        server.script(f"/w{i}", "stall:5")
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    report = fetch(urls, dest, threads=3, cancel=cancel, timeout=30)
    assert time.monotonic() - started < 2
    # The three in flight are journaled as cancelled; the rest never started.
    assert report.interrupted and report.counts["failed"] == 3
    assert {r.error_type for r in report.results} == {"CancelledError"}
    assert not any((dest / f"w{i}").exists() for i in range(6))
    lines = (dest / ".fetcher" / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_options_the_loop_lacks_keep_the_thread_pool() -> None:
    assert loop_eligible(FetchConfig())
    assert not loop_eligible(FetchConfig(rate=5))
    assert not loop_eligible(FetchConfig(per_host=2, threads=8))
    assert not loop_eligible(FetchConfig(proxies={"http": "http://127.0.0.1:1"}))
    assert loop_eligible(FetchConfig(per_host=8, threads=8))


def test_reset_of_a_reused_connection_is_a_silent_reconnect(dest: Path) -> None:
    def answer_once_then_reset(sock: socket.socket, n: int, path: str) -> bool:
        sock.sendall(ok(path.encode()))
        sock.recv(1, socket.MSG_PEEK)  # the next request has arrived, unread
        time.sleep(0.05)
        return False  # closing with unread data sends a TCP reset, not a FIN

    with RawServer(answer_once_then_reset) as srv:
        report = fetch([srv.url(f"/r{i}") for i in range(4)], dest, threads=1, retries=0)
    assert report.ok, report.failures
    assert all(r.attempts == 1 for r in report.results)


def test_interim_responses_restart_the_read_timeout(dest: Path) -> None:
    def slow_with_102s(sock: socket.socket, n: int, path: str) -> bool:
        for _ in range(4):
            sock.sendall(b"HTTP/1.1 102 Processing\r\n\r\n")
            time.sleep(0.25)
        sock.sendall(ok(b"finally"))
        return True

    with RawServer(slow_with_102s) as srv:
        report = fetch([srv.url("/slow")], dest, retries=0, timeout=0.6)
    assert report.ok, report.failures
    assert (dest / "slow").read_bytes() == b"finally"


def test_hand_offs_give_their_connection_back(dest: Path) -> None:
    def mixed(sock: socket.socket, n: int, path: str) -> bool:
        if path.endswith("4"):
            sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nnop")
        else:
            sock.sendall(ok(os.urandom(500)))
        return True

    with RawServer(mixed) as srv:
        report = fetch([srv.url(f"/h{i}") for i in range(60)], dest, threads=2, retries=0)
    assert report.counts == {"ok": 54, "skipped": 0, "failed": 6}
    # The 404s went to threads and their sockets came back with their slots: a slot
    # seen free before its socket came back used to open a third connection (and
    # close one), which the server could count as three open at once.
    assert srv.max_open <= 2
    assert srv.connections == 2


def test_host_names_resolve_off_the_loop_and_fall_back_across_addresses(
        server: TestServer, dest: Path) -> None:
    # "localhost" may list ::1 first; the server listens on 127.0.0.1 only.
    port = server.base.rsplit(":", 1)[1]
    urls = [server.add(f"/n{i}", os.urandom(800)).replace("127.0.0.1", "localhost")
            for i in range(30)]
    assert all(f"localhost:{port}" in u for u in urls)
    report = fetch(urls, dest, threads=4, retries=0)
    assert report.ok, report.failures
    assert server.max_active <= 4


def test_ctrl_c_in_library_use_journals_every_started_item(server: TestServer,
                                                           dest: Path) -> None:
    urls = [server.add(f"/i{i}", os.urandom(5000)) for i in range(40)]
    for i in range(20, 40):
        server.script(f"/i{i}", "stall:3")
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        fetch(urls, dest, threads=4, timeout=30)
    lines = [json.loads(x) for x in
             (dest / ".fetcher" / "manifest.jsonl").read_text().splitlines()]
    journaled = {r["path"] for r in lines}
    on_disk = {p.name for p in dest.iterdir() if p.is_file()}
    assert on_disk <= journaled  # no published file without its manifest line
    assert {r["status"] for r in lines} <= {"ok", "failed"}
    assert any(r["error_type"] == "CancelledError" for r in lines)


def test_running_out_of_file_descriptors_fails_items_not_the_run(server: TestServer,
                                                                 tmp_path: Path) -> None:
    urls = [server.add(f"/e{i}", os.urandom(300)) for i in range(100)]
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(urls) + "\n")
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (30, 30))\n"
        "from fetcher import fetch\n"
        "r = fetch(sys.argv[1], sys.argv[2], threads=64, retries=0)\n"
        "print(r.counts['ok'] + r.counts['failed'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(lst), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "100"


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nCONTENT-LENGTH: 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length:5\r\nConnection: Keep-Alive\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length:    5   \r\nConnection: close\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: close\r\n"
    b"Content-Length: 5\r\n\r\n",
])
def test_response_heads_the_loop_reads_without_a_full_parse(dest: Path, head: bytes) -> None:
    def answer(sock: socket.socket, n: int, path: str) -> bool:
        sock.sendall(head + b"hello")
        return b"close" not in head.lower() and not head.startswith(b"HTTP/1.0 200 OK\r\nC"
                                                                    b"ontent-Length: 5\r\n\r\n")

    with RawServer(answer) as srv:
        report = fetch([srv.url(f"/x{i}") for i in range(3)], dest, threads=1, retries=1,
                       backoff_base=0.01)
    assert report.ok, report.failures
    assert all((dest / f"x{i}").read_bytes() == b"hello" for i in range(3))
    assert all(r.attempts == 1 for r in report.results)


def test_disagreeing_content_lengths_fail_the_item(dest: Path) -> None:
    def answer(sock: socket.socket, n: int, path: str) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello")
        return False

    with RawServer(answer) as srv:
        report = fetch([srv.url("/bad")], dest, retries=0)
    result = report.results[0]
    assert result.error_type == "TransportError"
    assert "invalid Content-Length '5, 7'" in (result.error or "")
    assert not (dest / "bad").exists()


def test_waiting_on_post_processing_does_not_time_out_transfers(server: TestServer,
                                                                dest: Path) -> None:
    # One worker, 0.6 s per file, two pending at most: the loop waits ~1 s at a time
    # to hand over a file, longer than the 0.5 s read timeout of the transfers it holds.
    urls = [server.add(f"/p{i}.txt", b"text %d" % i) for i in range(8)]
    report = fetch(urls, dest, threads=4, timeout=0.5, retries=0,
                   post=["test_transform_helpers:very_slow_copy"], processes=1)
    assert report.ok, report.failures
    assert all(r.attempts == 1 for r in report.results)


@pytest.mark.parametrize("status_line", [b"HTTP/1.10 200 OK", b"HTTP/1.100 200 OK",
                                         b"HTTP/1.1 200"])
def test_unusual_status_lines_are_read_as_the_full_parser_reads_them(
        dest: Path, status_line: bytes) -> None:
    def answer(sock: socket.socket, n: int, path: str) -> bool:
        sock.sendall(status_line + b"\r\nContent-Length: 5\r\n\r\nhello")
        return True

    with RawServer(answer) as srv:
        report = fetch([srv.url(f"/s{i}") for i in range(3)], dest, retries=0, timeout=5)
    assert report.ok, report.failures
    assert all((dest / f"s{i}").read_bytes() == b"hello" for i in range(3))


@pytest.mark.parametrize("field", [b"Transfer-Encoding : chunked",
                                   b"Transfer-Encoding\t: chunked",
                                   b"X-Folded: a\r\n Transfer-Encoding: chunked"])
def test_heads_the_raw_lookup_could_misread_take_the_full_parser(dest: Path,
                                                                  field: bytes) -> None:
    framed = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"

    def answer(sock: socket.socket, n: int, path: str) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\n" + field + b"\r\nContent-Length: %d\r\n\r\n"
                     % len(framed) + framed)
        return False

    with RawServer(answer) as srv:
        fetch([srv.url("/te")], dest, retries=0, timeout=2)
    # Whatever the verdict, the chunk framing is never saved as the file's content.
    saved = dest / "te"
    assert not saved.exists() or saved.read_bytes() == b"hello world"


def test_a_manifest_inside_an_empty_dest_is_never_replaced(server: TestServer,
                                                           dest: Path) -> None:
    url = server.add("/log.jsonl", b"not a manifest")
    report = fetch([url], dest, manifest=dest / "log.jsonl")
    assert report.ok and report.results[0].path == "log.1.jsonl"
    record = json.loads((dest / "log.jsonl").read_text().splitlines()[-1])
    assert record["path"] == "log.1.jsonl"

