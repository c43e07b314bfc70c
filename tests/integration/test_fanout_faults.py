"""Faults around the fan-out (``fanout``) that an independent review found; each test
failed before its fix. Real servers on 127.0.0.1 only; every test under ~5 s."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fetcher import Job, fetch, wire
from fetcher.download import RunContext
from tests.httpserver import TestServer
from tests.procutil import alive, children, wait_children
from tests.rawserver import RawServer, ok


def _records(dest: Path) -> list[dict[str, Any]]:
    path = dest / ".fetcher" / "manifest.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _lines(dest: Path) -> int:
    try:
        return (dest / ".fetcher" / "manifest.jsonl").read_bytes().count(b"\n")
    except OSError:
        return 0


def _wait_lines(dest: Path, n: int, limit: float = 5.0, *, spin: bool = False) -> None:
    deadline = time.monotonic() + limit
    while _lines(dest) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"the manifest never reached {n} lines")
        if not spin:
            time.sleep(0.005)


class _Cli:
    """``python -m fetcher get ...`` in its own session, so that the test can always
    clean up the whole process group (the parent and any worker it left behind)."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fetcher", "get", *args], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.pid = self.proc.pid

    def kill_group(self) -> None:
        with contextlib.suppress(Exception):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.proc.communicate(timeout=5)


@pytest.fixture
def cli() -> Iterator[list[_Cli]]:
    started: list[_Cli] = []
    yield started
    for run in started:
        run.kill_group()


def _big_and_slow(server: TestServer, tmp_path: Path) -> Path:
    """With --threads 8 and 3 processes the loop here takes items 0-2 first, then the
    workers get a batch of their share each: 3-5 and 6-7. Items 3 and 6 are large and
    slow (thread hand-offs, ~10 s), everything else small: once the small ones are
    journaled, the list has ended and each worker's loop has returned while its large
    transfer still runs on its thread."""
    urls = [server.add(f"/big{i}", os.urandom(400_000), slow_bps=40_000) if i in (3, 6)
            else server.add(f"/s{i:02}", os.urandom(300)) for i in range(40)]
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(urls) + "\n")
    return lst


def _wait_transferring(dest: Path, count: int = 2, limit: float = 10.0) -> None:
    """Until ``count`` partial files have bytes: every transfer has started."""
    part = dest / ".fetcher" / "partial"
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if sum(1 for p in part.glob("*.part") if p.stat().st_size) >= count:
                return
        time.sleep(0.02)
    raise AssertionError(f"{count} transfers never started")


# 1 --------------------------------------------------------------------------------------
def test_ctrl_c_after_the_list_ended_still_cancels_in_every_process(
        server: TestServer, tmp_path: Path, cli: list[_Cli]) -> None:
    """A worker whose loop has returned (the list ended) still reads its link while its
    threads finish large files: Ctrl-C reaches them and the run exits 130 at once."""
    dest = tmp_path / "o"
    run = _Cli([str(_big_and_slow(server, tmp_path)), "-o", str(dest), "--threads", "8",
                "--download-processes", "3", "--json", "-q"])
    cli.append(run)
    _wait_transferring(dest)
    _wait_lines(dest, 38)
    time.sleep(0.3)  # the parent has sent "end"; the workers' loops have returned
    sent = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        run.proc.wait(timeout=3)
    assert run.proc.returncode is not None, \
        "Ctrl-C still not done after 3 s: the workers never heard of it"
    assert time.monotonic() - sent < 3.5
    assert run.proc.returncode == 130
    big = [r for r in _records(dest) if r["path"].startswith("big")]
    assert big and all(r["error_type"] == "CancelledError" for r in big), big


# 2 --------------------------------------------------------------------------------------
def test_workers_exit_when_the_parent_dies_after_the_list_ended(
        server: TestServer, tmp_path: Path, cli: list[_Cli]) -> None:
    """In that same phase, a parent killed is noticed (EOF on the link) and the workers
    cancel instead of running on as orphans."""
    dest = tmp_path / "o"
    run = _Cli([str(_big_and_slow(server, tmp_path)), "-o", str(dest), "--threads", "8",
                "--download-processes", "3", "-q"])
    cli.append(run)
    kids = wait_children(run.pid, 2)
    _wait_transferring(dest)
    _wait_lines(dest, 38)
    time.sleep(0.3)
    os.kill(run.pid, signal.SIGKILL)
    run.proc.wait(5)
    deadline = time.monotonic() + 3  # unaware of it, they would run ~10 s
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.02)
    left = [k for k in kids if alive(k)]
    assert not left, f"orphaned download processes still running: {left}"


# 3 --------------------------------------------------------------------------------------
def test_a_killed_worker_journals_no_item_twice(tmp_path: Path, cli: list[_Cli]) -> None:
    """A worker killed after journaling items it had not reported yet: the parent takes
    them from the manifest, so no item gets a second (failed) line and the summary
    agrees with the manifest."""
    release = threading.Event()

    def handler(sock: Any, n: int, path: str) -> bool:
        if path.startswith("/now"):
            sock.sendall(ok(b"now"))
            return True
        if path.startswith("/soon"):  # 10 ms after "now": inside the 20 ms report pacing
            time.sleep(0.01)
            sock.sendall(ok(b"soon"))
            return True
        release.wait(10)
        return False

    dest = tmp_path / "o"
    with RawServer(handler) as srv:
        # Whichever worker gets now*/soon*: both are killed below.
        urls = [srv.url("/now0"), srv.url("/now1"), srv.url("/soon2"), srv.url("/soon3")]
        urls += [srv.url(f"/hang{i}") for i in range(4, 32)]
        lst = tmp_path / "urls.txt"
        lst.write_text("\n".join(urls) + "\n")
        run = _Cli([str(lst), "-o", str(dest), "--threads", "8", "--download-processes", "3",
                    "--json", "-q", "--retries", "0", "--timeout", "5"])
        cli.append(run)
        kids = wait_children(run.pid, 2)
        _wait_lines(dest, 4, spin=True)  # now0, now1, soon2, soon3 published and journaled
        for kid in kids:
            os.kill(kid, signal.SIGKILL)
        release.set()  # what this process holds ends now (the server hangs up)
        out, _ = run.proc.communicate(timeout=10)
    records = _records(dest)
    twice = {p: n for p, n in collections.Counter(r["path"] for r in records).items() if n > 1}
    assert not twice, [r for r in records if r["path"] in twice]
    summary = json.loads(out)
    assert summary["ok"] == sum(r["status"] == "ok" for r in records)


# 4 --------------------------------------------------------------------------------------
def test_when_every_worker_dies_this_process_finishes_the_list(
        server: TestServer, tmp_path: Path, cli: list[_Cli]) -> None:
    """With every worker dead, the rest of the list is neither lost nor silently dropped:
    this process's own loop downloads it; only the dead workers' unfinished items fail."""
    urls = [server.add(f"/k{i:03}", os.urandom(500), slow_bps=1000 if i < 40 else None)
            for i in range(300)]
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(urls) + "\n")
    dest = tmp_path / "o"
    run = _Cli([str(lst), "-o", str(dest), "--threads", "6", "--download-processes", "3",
                "--json", "-q"])
    cli.append(run)
    kids = wait_children(run.pid, 2)
    time.sleep(0.3)
    for kid in kids:
        os.kill(kid, signal.SIGKILL)
    out, _ = run.proc.communicate(timeout=60)
    summary = json.loads(out)
    records = _records(dest)
    assert summary["total"] == 300 == len({r["path"] for r in records})
    lost = [r for r in records if r["status"] == "failed"]
    assert summary["failed"] == len(lost) > 0
    assert all(r["error_type"] == "DownloadProcessError" for r in lost)


# 5 --------------------------------------------------------------------------------------
def test_window_bounds_transfers_across_processes(server: TestServer, tmp_path: Path) -> None:
    """``FetchConfig.window`` bounds the transfers in flight across all processes, as it
    does in one."""
    urls = [server.add(f"/w{i:02}", os.urandom(500), slow_bps=2500) for i in range(16)]
    report = fetch(urls, tmp_path / "o", threads=8, window=2, download_processes=2)
    assert report.ok
    assert server.max_active <= 2, f"{server.max_active} transfers at once with window=2"


# 6 --------------------------------------------------------------------------------------
def test_a_stop_decided_by_the_parent_reaches_the_workers(
        server: TestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop the parent decides (its sink failed) reaches the workers: nothing queued
    with them starts afterwards, as in one process."""
    stops: list[tuple[int, float, str]] = []
    original = RunContext.stop

    def stop(self: RunContext, reason: str) -> None:
        stops.append((os.getpid(), time.monotonic(), reason))
        original(self, reason)

    monkeypatch.setattr(RunContext, "stop", stop)
    db = tmp_path / "sink.db"
    with sqlite3.connect(db) as conn:  # a table whose every insert is refused
        conn.execute("CREATE TABLE downloads (url TEXT, status TEXT)")
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON downloads "
                     "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    conn.close()
    # 0.2 s each, 4 at a time: the sink's first batch (after 2 s) fails mid-run.
    urls = [server.add(f"/q{i:03}", b"q" * 20, slow_bps=100) for i in range(120)]
    report = fetch(urls, tmp_path / "o", threads=4, download_processes=2,
                   sink=f"sqlite:///{db}", keep_results=False)
    ours = [(t, why) for pid, t, why in stops if pid == os.getpid()]
    assert ours and ours[0][1].startswith("sink failed"), stops
    assert report.stopped and report.stopped.startswith("sink failed")
    stopped_at = ours[0][0]
    late = sorted(p for p, t in server.times() if t > stopped_at + 0.1)
    assert not late, f"{len(late)} transfers started after the run stopped: {late}"


# 7 --------------------------------------------------------------------------------------
def test_carried_columns_need_not_pickle(server: TestServer, tmp_path: Path) -> None:
    """Carried columns that do not pickle (a mappingproxy) reach the workers as the manifest
    shows them, and the Report keeps the caller's objects."""
    jobs = [Job(server.add(f"/m{i}", b"m"), extra=types.MappingProxyType({"tag": f"t{i}"}))
            for i in range(20)]
    report = fetch(jobs, tmp_path / "o", threads=4, download_processes=2)
    assert report.ok and report.counts["ok"] == 20
    assert all(type(r.extra) is types.MappingProxyType for r in report.results)
    assert sorted(r["tag"] for r in _records(tmp_path / "o")) == sorted(
        f"t{i}" for i in range(20))


# 8 --------------------------------------------------------------------------------------
def test_a_fork_while_another_thread_builds_a_tls_context_does_not_hang(
        tls_server: TestServer, cert: tuple[str, str], tmp_path: Path) -> None:
    """Explicit ``download_processes`` forks even while other threads run: fetcher's own
    TLS lock, held by another thread at that moment, is not inherited held."""
    urls = [tls_server.add(f"/t{i}", b"t" * 10) for i in range(8)]
    held, release = threading.Event(), threading.Event()

    def other_thread() -> None:  # another thread of the caller, inside tls_context
        with wire._tls_lock:
            held.set()
            release.wait(10)

    helper = threading.Thread(target=other_thread, daemon=True)
    helper.start()
    assert held.wait(5)
    before = set(children(os.getpid()))
    box: dict[str, Any] = {}

    def run() -> None:
        box["report"] = fetch(urls, tmp_path / "o", threads=4, download_processes=2,
                              verify=cert[0], timeout=2, retries=0)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 5
        while not set(children(os.getpid())) - before and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.2)  # forked: the workers' copy of the lock is held for good
        release.set()  # the other thread is done: the lock is free again in this process
        runner.join(3)
        stuck = runner.is_alive()
    finally:
        release.set()
        for pid in set(children(os.getpid())) - before:  # never leave a worker behind
            with contextlib.suppress(Exception):
                os.kill(pid, signal.SIGKILL)
        runner.join(10)
    assert not stuck, "the download processes hung on a lock inherited held at fork time"
    assert box["report"].ok


# 9 --------------------------------------------------------------------------------------
def test_bytes_beyond_a_body_that_arrived_in_pieces_are_not_the_next_response(
        tmp_path: Path) -> None:
    """A server sending more than its Content-Length, the body in pieces: the surplus is
    noticed and that connection is not reused, so it cannot answer the next item."""
    first = os.urandom(3000)

    def handler(sock: Any, n: int, path: str) -> bool:
        if path == "/first":  # a server sending more than its Content-Length
            resp = ok(first)
            sock.sendall(resp[:1000])
            time.sleep(0.05)
            sock.sendall(resp[1000:] + ok(b"not for anybody"))
            return True
        sock.sendall(ok(f"body of {path}".encode()))
        return True

    dest = tmp_path / "o"
    with RawServer(handler) as srv:
        urls = [srv.url("/first")] + [srv.url(f"/second{i}") for i in range(7)]
        report = fetch(urls, dest, threads=2, download_processes=2, retries=0)
    assert report.ok
    assert (dest / "first").read_bytes() == first
    wrong = {f"second{i}": (dest / f"second{i}").read_bytes() for i in range(7)
             if (dest / f"second{i}").read_bytes() != f"body of /second{i}".encode()}
    assert not wrong, wrong


@pytest.mark.parametrize("processes", [1, 2])
def test_running_out_of_descriptors_fails_items_and_every_one_is_counted(
        server: TestServer, tmp_path: Path, processes: int) -> None:
    """Imports that failure paths need (json for a failed item's line, pickle for its
    report) are made while files can still be opened: a lazy import at the moment
    descriptors ran out failed, was taken for a manifest write error, and the run
    stopped with most items neither journaled nor counted."""
    lst = server.url_list(tmp_path / "urls.txt", "d", 300, os.urandom(300))
    script = ("import resource, sys\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))\n"
              "from fetcher import fetch\n"
              "r = fetch(sys.argv[1], sys.argv[2], threads=64, retries=0,\n"
              "          download_processes=int(sys.argv[3]))\n"
              "print(r.processes, r.counts['ok'] + r.counts['failed'])\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", script, str(lst), str(out), str(processes)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(processes), "300"]
    assert len(_records(out)) == 300
