"""Faults a second independent review found in the fan-out (this process taking its
share), the entry point's fast parser and the hand-off pool; each test failed before its
fix. Real servers on 127.0.0.1 and real processes only; every test under ~5 s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fetcher import fetch
from tests.httpserver import TestServer

ROOT = Path(__file__).resolve().parents[2]


def _records(dest: Path) -> list[dict[str, Any]]:
    path = dest / ".fetcher" / "manifest.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _python(script: str, *args: str, timeout: float = 20,
            **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, **kw)


# 1 --------------------------------------------------------------------------------------
def _limit_file_size() -> None:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))


_STOP_SCRIPT = r"""
import json, sys, time
from fetcher import fetch
urls = json.loads(sys.argv[1])
def source():
    yield urls[0]     # this process's loop
    yield urls[1]     # the worker's first batch: too large for the disk, it stops there
    time.sleep(1.0)   # this process is busy planning while the worker winds down
    yield from urls[2:]
report = fetch(source(), sys.argv[2], threads=2, download_processes=2, retries=0)
print(json.dumps({"processes": report.processes, "stopped": report.stopped,
                  "failures": [[f.url, f.error_type, f.error] for f in report.failures]}))
"""


def test_a_worker_that_stopped_itself_does_not_lose_the_batch_sent_meanwhile(
        server: TestServer, tmp_path: Path) -> None:
    """A worker that meets a full disk stops and exits without waiting for the parent's
    "end": a batch the parent planned and sent before hearing of the stop is never read,
    and the parent fails those never-started items as if the process had died
    ("DownloadProcessError: download process 1 ... exited with status 0")."""
    urls = [server.add("/s0", os.urandom(500)), server.add("/huge", os.urandom(3_000_000))]
    urls += [server.add(f"/s{i}", os.urandom(500)) for i in range(1, 6)]
    dest = tmp_path / "o"
    done = _python(_STOP_SCRIPT, json.dumps(urls), str(dest), preexec_fn=_limit_file_size)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["processes"] == 2 and out["stopped"] and "huge" in out["stopped"]
    blamed = [r for r in _records(dest) if r["error_type"] == "DownloadProcessError"]
    assert not blamed, f"no process died, yet items were failed as if one had: {blamed}"
    assert not [f for f in out["failures"] if f[1] == "DownloadProcessError"]


# 2 --------------------------------------------------------------------------------------
def test_items_planned_for_a_batch_that_was_never_sent_are_not_blamed_on_a_worker(
        server: TestServer, tmp_path: Path) -> None:
    """Planning raises half-way through a worker's batch (a generator source with a bad
    entry): the items of that batch planned before the error stay in the child's
    bookkeeping although they were never sent, and are journaled as failed with
    DownloadProcessError "exited with status 0". One process journals nothing for them
    (never started); a worker that is fine must not be blamed either way."""
    urls = [server.add(f"/g{i}", os.urandom(300), slow_bps=1000 if i < 2 else None)
            for i in range(8)]

    def source() -> Any:
        yield from urls[:5]  # g0, g1 here (slow); g2, g3 a worker's batch; then g4 ...
        yield "not a url"   # ... and this one, in the same batch as g4
        yield from urls[5:]

    dest = tmp_path / "o"
    with pytest.raises(Exception, match="not a url"):
        fetch(source(), dest, threads=4, download_processes=2, retries=0)
    blamed = [(r["path"], r["error"]) for r in _records(dest)
              if r["error_type"] == "DownloadProcessError"]
    assert not blamed, blamed


# 3 --------------------------------------------------------------------------------------
_POOL_SCRIPT = r"""
import sys
from fetcher import fetch
from fetcher.progress import NullProgress

class Flaky(NullProgress):
    calls = 0
    def update(self, n=1, nbytes=0):
        Flaky.calls += 1
        if Flaky.calls <= 2:  # the item's report and the report of its failure
            raise RuntimeError("progress callback failed")

urls = [sys.argv[1] + f"/missing{i}" for i in range(6)]  # 404s: thread hand-offs
try:
    report = fetch(urls, sys.argv[2], threads=1, retries=0, download_processes=1,
                   progress=Flaky())
    print("returned", report.counts)
except Exception as exc:
    print("raised", type(exc).__name__)
"""


def test_a_task_that_raises_does_not_leave_the_pool_without_threads(
        server: TestServer, tmp_path: Path) -> None:
    """``_Pool._serve`` lets an exception end its thread but still releases ``_idle``,
    so the next ``submit`` believes a thread is waiting and starts none: the hand-off is
    queued forever, the loop's capacity never comes back and the run hangs. (With
    ThreadPoolExecutor the exception stayed in a future and the thread went on.)"""
    try:
        done = _python(_POOL_SCRIPT, server.base, str(tmp_path / "o"), timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("the run hung after a task raised on the pool's only thread")
    assert "returned" in done.stdout or "raised" in done.stdout, done.stderr


# 4 --------------------------------------------------------------------------------------
def _without_dac_override() -> None:
    """Root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH after exec: permission bits
    apply to it as to any user (a no-op for a non-root user, who has neither)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP


_PARSE_SCRIPT = r"""
import json, os, sys
import typer.main
from fetcher.cli import app
from fetcher.entry import parse_get
GET = typer.main.get_command(app).commands["get"]
args = json.loads(sys.argv[1])
fast = parse_get(args)
try:
    GET.make_context("get", list(args))
    click = "accepts"
except Exception as exc:
    click = f"{type(exc).__name__}: {exc}"
print(json.dumps({"readable": os.access(sys.argv[2], os.R_OK),
                  "fast": fast is not None, "click": click}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl")
def test_fast_parser_refuses_what_click_refuses_for_an_unreadable_path(tmp_path: Path) -> None:
    """typer's ``Path`` options are ``click.Path(readable=True)``: an existing directory
    (or manifest) the user cannot read is a usage error (exit 2) on the typer path, while
    ``parse_get`` accepts it and the run goes ahead, so ``-q -o DIR`` and ``-qo DIR``
    (which goes to typer) do different things."""
    unreadable = tmp_path / "noread"
    unreadable.mkdir(mode=0o333)
    unreadable.chmod(0o333)
    args = ["urls.txt", "-o", str(unreadable)]
    done = _python(_PARSE_SCRIPT, json.dumps(args), str(unreadable),
                   preexec_fn=_without_dac_override)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    if out["readable"]:
        pytest.skip("permission bits do not apply to this user here")
    assert out["click"] != "accepts"  # click: "Path '...' is not readable."
    assert not out["fast"], f"parse_get accepted what click refuses ({out['click']})"
