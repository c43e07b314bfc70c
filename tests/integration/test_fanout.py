"""Transfers shared by forked download processes (``fanout``) keep every guarantee."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fetcher import fetch
from fetcher.config import FANOUT_MIN_ITEMS, FetchConfig
from fetcher.fanout import fanout_width
from tests.httpserver import TestServer
from tests.procutil import cli_modules, gone, wait_children


def _records(dest: Path) -> list[dict[str, Any]]:
    path = dest / ".fetcher" / "manifest.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _mixed_list(server: TestServer, tmp_path: Path, n_small: int = 400) -> Path:
    """Small files, large ones (thread hand-offs), redirects, a 404, a checksum error,
    name collisions and carried columns, as a CSV."""
    rows = ["url,path,sha256,tag"]
    for i in range(n_small):
        body = os.urandom(200 + i % 700)
        url = server.add(f"/d{i % 7}/f{i}.bin", body)
        rows.append(f"{url},,{hashlib.sha256(body).hexdigest() if i % 5 == 0 else ''},t{i}")
    for i in range(4):
        rows.append(server.add(f"/big{i}.bin", os.urandom(300_000)) + ",,,big")
    target = server.add("/target.txt", b"redirected here")
    rows.append(server.add("/moved", redirect=target) + ",,,moved")
    rows.append(server.url("/missing") + ",,,missing")
    rows.append(server.add("/bad.bin", b"not what the list says") + ",," + "0" * 64 + ",bad")
    for i in range(3):  # three URLs, one name: same.txt, same.1.txt, same.2.txt
        rows.append(server.add(f"/x{i}/same.txt", f"same {i}".encode()) + ",same.txt,,dup")
    lst = tmp_path / "urls.csv"
    lst.write_text("\n".join(rows) + "\n")
    return lst


def _outcome(dest: Path) -> dict[str, tuple[str, Any, Any, Any]]:
    """Per path: status, bytes, sha256 and carried tag: what must not depend on processes."""
    return {r["path"]: (r["status"], r["bytes"], r["sha256"], r.get("tag"))
            for r in _records(dest)}


def test_two_processes_download_what_one_does(server: TestServer, tmp_path: Path) -> None:
    lst = _mixed_list(server, tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = fetch(lst, one, threads=8, retries=1, backoff_base=0.01, download_processes=1)
    r2 = fetch(lst, two, threads=8, retries=1, backoff_base=0.01, download_processes=2)
    assert r2.processes == 2 and r1.processes == 1
    assert r1.counts == r2.counts == {"ok": 408, "skipped": 0, "failed": 2}
    assert len(r2.results) == 410 and r2.bytes == r1.bytes
    assert {f.url.rsplit("/", 1)[1] for f in r2.failures} == {"missing", "bad.bin"}
    records = _records(two)
    assert len(records) == 410  # one line per item, none torn or doubled
    assert _outcome(two) == _outcome(one)
    for rec in records:
        if rec["status"] == "ok":
            data = (two / rec["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == rec["sha256"]
    assert sorted((two / "same.txt", two / "same.1.txt", two / "same.2.txt")) == sorted(
        p for p in two.glob("same*.txt"))
    assert not list((two / ".fetcher" / "partial").iterdir())

    server.clear_log()  # a re-run skips everything without a request
    again = fetch(lst, two, threads=8, retries=0, download_processes=2)
    assert again.counts["skipped"] == 408
    assert {p for p, _ in server.requests()} == {"/missing", "/bad.bin"}


def test_sink_gets_every_record_once(server: TestServer, tmp_path: Path) -> None:
    urls = [server.add(f"/s{i}", os.urandom(100)) for i in range(300)]
    db = tmp_path / "out.db"
    report = fetch(urls, tmp_path / "o", threads=6, download_processes=2,
                   sink=f"sqlite:///{db}", keep_results=False)
    assert report.ok and report.processes == 2
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT url, status FROM downloads").fetchall()
    assert sorted(rows) == sorted((u, "ok") for u in urls)


@pytest.mark.parametrize("told", ["/p002", "/p005"])  # this process's loop, a worker's
def test_retry_after_pauses_the_host_in_every_process(server: TestServer, tmp_path: Path,
                                                      told: str) -> None:
    """The loop here takes the first items itself (p000-p003 on 4 of the 8 connections)
    and the worker gets the next batch (p004-p011): a 503 with Retry-After met in either
    process holds the host in both."""
    urls = [server.add(f"/p{i:03}", b"x" * 100, slow_bps=20_000) for i in range(120)]
    server.script(told, "status:503:1")
    started = time.monotonic()
    report = fetch(urls, tmp_path / "o", threads=8, download_processes=2,
                   backoff_base=0.01)
    assert report.ok and report.processes == 2
    times = server.times()
    answered = min(t for p, t in times if p == told)
    # After the 503 (and the few ms its news takes to reach the other process), no new
    # request starts until the second it asked for is over.
    quiet = [p for p, t in times if answered + 0.15 < t < answered + 0.9]
    assert not quiet, quiet
    assert time.monotonic() - started > 1.0


def _cli(args: list[str], **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "fetcher", "get", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture
def slow_list(server: TestServer, tmp_path: Path) -> Path:
    """300 files, the first 24 slow (a second each): workers busy for a while."""
    urls = [server.add(f"/w{i:03}", os.urandom(2000), slow_bps=2000 if i < 24 else None)
            for i in range(300)]
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(urls) + "\n")
    return lst


def test_a_killed_worker_fails_its_items_and_the_rest_go_on(slow_list: Path,
                                                            tmp_path: Path) -> None:
    dest = tmp_path / "o"
    proc = _cli([str(slow_list), "-o", str(dest), "--threads", "8",
                 "--download-processes", "3", "--json", "-q", "--timeout", "5"])
    kids = wait_children(proc.pid, 2)
    time.sleep(0.5)
    os.kill(kids[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    summary = json.loads(out)
    assert summary["failed"] >= 1 and summary["ok"] + summary["failed"] == 300
    lost = [r for r in _records(dest) if r["status"] == "failed"]
    assert lost and all(r["error_type"] == "DownloadProcessError" for r in lost)
    assert "was killed by SIGKILL" in lost[0]["error"]
    for rec in _records(dest):
        if rec["status"] == "ok":
            assert (dest / rec["path"]).stat().st_size == 2000


def test_ctrl_c_cancels_every_process_and_exits_130(slow_list: Path, tmp_path: Path) -> None:
    dest = tmp_path / "o"
    proc = _cli([str(slow_list), "-o", str(dest), "--threads", "8",
                 "--download-processes", "3"])
    kids = wait_children(proc.pid, 2)
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(15)
    assert time.monotonic() - sent < 5
    assert proc.returncode == 130
    assert gone(kids, 5)
    records = _records(dest)
    cancelled = [r for r in records if r["status"] == "failed"]
    assert cancelled and all(r["error_type"] == "CancelledError" for r in cancelled)
    assert len(records) < 300  # queued items were never started, so never journaled


def test_workers_stop_when_their_parent_is_killed(server: TestServer, tmp_path: Path) -> None:
    urls = [server.add(f"/v{i:03}", os.urandom(2000), slow_bps=400) for i in range(300)]
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(urls) + "\n")
    proc = _cli([str(lst), "-o", str(tmp_path / "o"), "--threads", "8",
                 "--download-processes", "3", "-q"])
    kids = wait_children(proc.pid, 2)
    time.sleep(0.3)
    proc.kill()
    proc.wait(10)
    assert gone(kids, 3)  # EOF on the link cancels them; unaware, they would take 5 s+


def test_width_policy() -> None:
    cfg = FetchConfig(threads=16)
    small = FANOUT_MIN_ITEMS - 1
    assert fanout_width(cfg, small) == 1
    assert fanout_width(cfg, None) == 1
    cores = min(len(os.sched_getaffinity(0)), 4)
    alone = threading.active_count() == 1  # else forking is left to explicit requests
    assert fanout_width(cfg, 10_000) == (cores if alone else 1)
    assert fanout_width(cfg.replace(download_processes=3), 5) == 3
    assert fanout_width(cfg.replace(download_processes=3, threads=2), 5) == 2  # 1 each
    assert fanout_width(cfg.replace(download_processes=1), 10_000) == 1
    # A re-run whose manifest has every item is planning (skips): one process, unless asked.
    assert fanout_width(cfg, 10_000, done=10_000) == 1
    assert fanout_width(cfg.replace(download_processes=2), 10_000, done=10_000) == 2


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))


def test_a_full_disk_in_one_worker_stops_them_all(server: TestServer, tmp_path: Path) -> None:
    small = [server.add(f"/ok{i}", os.urandom(1000)) for i in range(3)]
    huge = server.add("/huge", os.urandom(3_000_000))
    later = [server.add(f"/later{i}", os.urandom(1000), slow_bps=10_000) for i in range(400)]
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join([*small, huge, *later]) + "\n")
    dest = tmp_path / "o"
    proc = subprocess.run(
        [sys.executable, "-m", "fetcher", "get", str(lst), "-o", str(dest), "--threads", "4",
         "--download-processes", "3", "--json"], capture_output=True, text=True, timeout=60,
        preexec_fn=_limit_file_size)
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["processes"] == 3
    assert summary["stopped"] and "huge" in summary["stopped"]
    by_path = {r["path"]: r for r in _records(dest)}
    assert by_path["huge"]["error_type"] == "StorageError"
    assert not (dest / "huge").exists()
    assert sum(1 for p in by_path if p.startswith("later")) < 100  # both stopped early
    assert all(by_path[f"ok{i}"]["status"] == "ok" for i in range(3))


def test_one_process_runs_skip_the_fanout_machinery() -> None:
    """The policy module is all a run that stays in one process imports of fan-out."""
    probe = ("import sys, fetcher.entry, fetcher.downloader\n"
             "print('fetcher.fanout._parent' in sys.modules, 'pickle' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.split() == ["False", "False"]


def test_a_fanned_out_cli_run_without_a_bar_imports_no_tqdm(server: TestServer,
                                                             tmp_path: Path) -> None:
    """Start-up is budgeted: a bar that is never drawn needs no tqdm (~25 ms)."""
    lst = server.url_list(tmp_path / "urls.txt", "t", 300, b"t" * 50)
    code, loaded, err = cli_modules(
        ["get", str(lst), "-o", str(tmp_path / "o"), "-q", "--download-processes", "2"],
        ["tqdm"])
    assert (code, loaded) == (0, [False]), err[-2000:]
    assert len(list((tmp_path / "o").glob("t*"))) == 300


def test_a_library_callers_next_run_fans_out_too(server: TestServer, tmp_path: Path) -> None:
    """Back-to-back fetch() calls: nothing of the first run (its cancel watcher, a
    progress bar's threads) is still running when the second decides whether to fork.
    The watcher used to wait up to 0.2 s on ``cancel`` before seeing the run had ended."""
    lst = server.url_list(tmp_path / "urls.txt", "b", 300, b"b" * 50)
    script = ("import io, sys, threading\n"
              "from fetcher import fetch, TqdmProgress\n"
              "bar = TqdmProgress(file=io.StringIO(), disable=False, delay=0.0)\n"
              "one = fetch(sys.argv[1], sys.argv[2], progress=bar)\n"
              "two = fetch(sys.argv[1], sys.argv[3])\n"
              "print(one.processes, two.processes, threading.active_count())\n")
    done = subprocess.run([sys.executable, "-c", script, str(lst), str(tmp_path / "a"),
                           str(tmp_path / "b")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    cores = min(len(os.sched_getaffinity(0)), 4)
    assert done.stdout.split() == [str(cores), str(cores), "1"]
