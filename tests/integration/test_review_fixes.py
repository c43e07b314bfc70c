"""Regressions found by review: ownership on re-runs, full disks, stuck requests, framing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fetcher import fetch
from fetcher.errors import ConfigError
from tests.httpserver import TestServer


def test_force_replaces_our_own_file_instead_of_renaming(server: TestServer,
                                                         dest: Path) -> None:
    url = server.add("/a.txt", b"v1")
    fetch([url], dest)
    server.route("/a.txt").body = b"v2"
    for _ in range(2):
        assert fetch([url], dest, force=True).ok
    assert sorted(p.name for p in dest.iterdir() if p.name != ".fetcher") == ["a.txt"]
    assert (dest / "a.txt").read_bytes() == b"v2"


def test_rerun_after_a_rename_is_skipped_without_a_request(server: TestServer,
                                                           dest: Path) -> None:
    (dest / "a.txt").write_text("foreign")
    url = server.add("/a.txt", b"ours")
    assert fetch([url], dest).results[0].path == "a.1.txt"
    server.clear_log()
    for _ in range(2):
        again = fetch([url], dest)
        assert again.counts["skipped"] == 1 and again.results[0].path == "a.1.txt"
    assert server.requests() == []
    assert sorted(p.name for p in dest.iterdir() if p.name != ".fetcher") == \
        ["a.1.txt", "a.txt"]


def test_files_are_not_executable(server: TestServer, dest: Path) -> None:
    fetch([server.add("/plain.txt", b"x")], dest)
    assert not (dest / "plain.txt").stat().st_mode & (stat.S_IXUSR | stat.S_IXGRP)


def test_non_ascii_paths_are_percent_encoded(server: TestServer, dest: Path) -> None:
    server.add("/%E6%97%A5%E6%9C%AC.txt", b"nihon")
    report = fetch([server.url("/日本.txt")], dest)
    assert report.ok, report.failures
    assert (dest / "日本.txt").read_bytes() == b"nihon"


def test_retry_after_beyond_the_cap_fails_at_once(server: TestServer, dest: Path) -> None:
    url = server.add("/later", b"x")
    server.script("/later", "status:503:3600")
    started = time.monotonic()
    report = fetch([url], dest, retries=3, retry_after_max=60)
    assert report.results[0].error_type == "HTTPStatusError"
    assert time.monotonic() - started < 2


def test_credentials_do_not_return_after_leaving_the_origin(dest: Path) -> None:
    a, b = TestServer().start(), TestServer().start()
    try:
        final = a.add("/final", b"ok")
        b.add("/bounce", redirect=final)
        a.add("/start", redirect=b.url("/bounce"))
        report = fetch([a.url("/start").replace("http://", "http://u:pw@")], dest)
        assert report.ok
        assert "Authorization" in a.requests("/start")[0][1]
        assert "Authorization" not in b.requests("/bounce")[0][1]
        assert "Authorization" not in a.requests("/final")[0][1]
    finally:
        a.stop()
        b.stop()


def test_bad_options_and_a_single_url(server: TestServer, dest: Path) -> None:
    with pytest.raises(ConfigError, match="auth"):
        fetch([server.url("/x")], dest, auth="user:pw")
    with pytest.raises(ConfigError, match="header"):
        fetch([server.url("/x")], dest, headers={"X-Name": "日本"})
    url = server.add("/single.txt", b"one")
    assert fetch(url, dest).ok and (dest / "single.txt").read_bytes() == b"one"


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
])
def test_ambiguous_framing_is_refused(dest: Path, raw: bytes) -> None:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(raw)
            time.sleep(0.2)

    threading.Thread(target=serve, daemon=True).start()
    port = listener.getsockname()[1]
    report = fetch([f"http://127.0.0.1:{port}/f"], dest, retries=0)
    listener.close()
    assert report.results[0].status == "failed"
    assert not (dest / "f").exists()


def test_ctrl_c_while_waiting_for_a_response_exits_promptly(dest: Path,
                                                            tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept_and_hold() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)  # never answers

    threading.Thread(target=accept_and_hold, daemon=True).start()
    lst = tmp_path / "urls.txt"
    lst.write_text(f"http://127.0.0.1:{listener.getsockname()[1]}/silent\n")
    proc = subprocess.Popen([sys.executable, "-m", "fetcher", "get", str(lst), "-o",
                             str(dest), "--timeout", "30"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not held and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(15)
    listener.close()
    assert proc.returncode == 130 and time.monotonic() - sent < 2.5
    record = json.loads((dest / ".fetcher" / "manifest.jsonl").read_text().splitlines()[0])
    assert record["error_type"] == "CancelledError"


def test_split_download_of_a_changing_file_starts_over(server: TestServer,
                                                       dest: Path) -> None:
    old, new = os.urandom(1_500_000), os.urandom(1_200_000)
    url = server.add("/moving.bin", old, swap_after=3, swap_to=(new, '"v2"'))
    server.script("/moving.bin", "none", "cut:1000", "cut:1000")  # two segments break
    report = fetch([url], dest, split=3, split_min_size=100_000, retries=3,
                   backoff_base=0.01, backoff_max=0.05)
    assert report.ok, report.failures
    assert (dest / "moving.bin").read_bytes() == new  # never a mix of versions
    assert report.results[0].attempts == 2


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                          capture_output=True)
    if proc.returncode != 0 or shutil.disk_usage(mnt).total > 4 * 2**20:
        pytest.skip("cannot mount a small tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_with_the_manifest_on_it(server: TestServer, small_disk: Path,
                                           tmp_path: Path) -> None:
    urls = [server.add(f"/big{i}.bin", os.urandom(600_000)) for i in range(8)]
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(urls) + "\n")
    out = small_disk / "o"
    proc = subprocess.run([sys.executable, "-m", "fetcher", "get", str(lst), "-o", str(out),
                           "--threads", "2", "--retries", "1", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["stopped"] and summary["ok"] >= 1
    assert summary["ok"] + summary["failed"] + summary["skipped"] == summary["total"]
    text = (out / ".fetcher" / "manifest.jsonl").read_text()
    for line in text.splitlines():
        json.loads(line)  # every line whole
    for rec in map(json.loads, text.splitlines()):
        if rec["status"] == "ok":
            assert (out / rec["path"]).stat().st_size == 600_000
