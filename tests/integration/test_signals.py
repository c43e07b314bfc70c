"""A real ``fetcher get`` process killed, interrupted and starved of disk (issue 3)."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.httpserver import TestServer


def _start(args: list[str], **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "fetcher", "get", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kw)  # type: ignore[call-overload]


def _wait_for_partials(dest: Path, minimum: int = 1, limit: float = 10.0,
                       min_bytes: int = 70_000) -> None:
    """Wait until ``minimum`` partials hold ``min_bytes`` or more (resumable data)."""
    deadline = time.monotonic() + limit
    part = dest / ".fetcher" / "partial"
    while time.monotonic() < deadline:
        sizes = []
        for p in part.glob("*.part") if part.is_dir() else ():
            try:
                sizes.append(p.stat().st_size)
            except FileNotFoundError:  # published between glob and stat
                continue
        if sum(1 for n in sizes if n >= min_bytes) >= minimum:
            return
        time.sleep(0.02)
    raise AssertionError("no download started")


def _records(dest: Path) -> list[dict[str, object]]:
    path = dest / ".fetcher" / "manifest.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_sigkill_mid_download_then_rerun_completes(server: TestServer, dest: Path,
                                                   tmp_path: Path) -> None:
    bodies = {f"/k{i}.bin": os.urandom(300_000) for i in range(6)}
    for path, body in bodies.items():
        server.add(path, body, slow_bps=400_000)
    small = {f"/s{i}.txt": os.urandom(100) for i in range(10)}
    for path, body in small.items():
        server.add(path, body)
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(server.url(p) for p in [*small, *bodies]) + "\n")
    proc = _start([str(lst), "-o", str(dest), "--threads", "3", "--quiet"])
    _wait_for_partials(dest)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    # Nothing incomplete under a final name.
    for path, body in bodies.items():
        final = dest / path.lstrip("/")
        assert not final.exists() or final.read_bytes() == body
    done_before = {r["path"] for r in _records(dest) if r["status"] == "ok"}
    server.clear_log()
    rerun = subprocess.run([sys.executable, "-m", "fetcher", "get", str(lst), "-o", str(dest),
                            "--json", "--quiet"], capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    for path, body in {**small, **bodies}.items():
        assert (dest / path.lstrip("/")).read_bytes() == body
    requested = {p.lstrip("/") for p, _ in server.requests()}
    assert not requested & done_before  # complete files were not asked for again
    assert any("Range" in h for _, h in server.requests())  # partials resumed
    assert list((dest / ".fetcher" / "partial").glob("*.part")) == []
    summary = json.loads(rerun.stdout)
    assert summary["failed"] == 0 and summary["ok"] + summary["skipped"] == 16


def test_first_ctrl_c_winds_down_and_exits_130(server: TestServer, dest: Path,
                                               tmp_path: Path) -> None:
    body = os.urandom(2_000_000)
    urls = [server.add(f"/i{i}", body, slow_bps=200_000) for i in range(3)]
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(urls) + "\n")
    proc = _start([str(lst), "-o", str(dest), "--threads", "2"])
    _wait_for_partials(dest)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(10)
    assert time.monotonic() - sent < 2.5
    assert proc.returncode == 130
    records = _records(dest)
    assert records and all(r["error_type"] == "CancelledError" for r in records)
    assert list((dest / ".fetcher" / "partial").glob("*.part"))  # kept for resume
    assert not any((dest / f"i{i}").exists() for i in range(3))


def test_second_ctrl_c_exits_at_once(server: TestServer, dest: Path, tmp_path: Path) -> None:
    url = server.add("/stuck", os.urandom(1_000_000), slow_bps=50_000)
    lst = tmp_path / "urls.txt"
    lst.write_text(url + "\n")
    proc = _start([str(lst), "-o", str(dest)])
    _wait_for_partials(dest)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    proc.wait(5)
    assert proc.returncode == 130


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))


def test_full_disk_fails_the_item_keeps_the_rest_and_stops(server: TestServer, dest: Path,
                                                           tmp_path: Path) -> None:
    small = [server.add(f"/ok{i}", os.urandom(1000)) for i in range(3)]
    huge = server.add("/huge", os.urandom(3_000_000))
    later = [server.add(f"/later{i}", os.urandom(1000)) for i in range(50)]
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join([*small, huge, *later]) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fetcher", "get", str(lst), "-o", str(dest), "--threads", "1",
         "--json"], capture_output=True, text=True, timeout=60,
        preexec_fn=_limit_file_size)
    assert proc.returncode == 1
    assert "StorageError" in proc.stderr and "/huge" in proc.stderr
    by_path = {r["path"]: r for r in _records(dest)}
    assert all(by_path[f"ok{i}"]["status"] == "ok" for i in range(3))
    assert by_path["huge"]["error_type"] == "StorageError"
    assert not (dest / "huge").exists()
    assert sum(1 for r in by_path.values() if str(r["path"]).startswith("later")) < 50
    summary = json.loads(proc.stdout)
    assert summary["stopped"] and "huge" in summary["stopped"]
    for i in range(3):
        data = (dest / f"ok{i}").read_bytes()
        assert hashlib.sha256(data).hexdigest() == by_path[f"ok{i}"]["sha256"]
