"""Faults a third independent review found in today's changes (fan-out link, feeding,
writer split, start-up imports). Real servers on 127.0.0.1 and real processes only;
every test under ~5 s."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.httpserver import TestServer

ROOT = Path(__file__).resolve().parents[2]


# 1 --------------------------------------------------------------------------------------
_IMPORTING_THREAD = r"""
import importlib.machinery, json, sys, threading
from fetcher import fetch

inside, done = threading.Event(), threading.Event()


class _SlowLoader:
    # A module read off a slow disk (NFS, a cold cache): its body runs a while later.
    def __init__(self, real):
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        inside.set()
        done.wait(10)
        self.real.exec_module(module)


class _SlowDisk:
    def find_spec(self, name, path=None, target=None):
        if name != "_compat_pickle":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        spec.loader = _SlowLoader(spec.loader)
        return spec


sys.meta_path.insert(0, _SlowDisk())


def other():  # another thread of the caller happens to import pickle (logging, a cache...)
    import pickle  # noqa: F401


threading.Thread(target=other, daemon=True).start()
assert inside.wait(5)
threading.Timer(0.3, done.set).start()  # ... and is done with it 0.3 s later
report = fetch(sys.argv[1].split(), sys.argv[2], threads=2, download_processes=2,
               retries=0, timeout=2)
print(json.dumps({"processes": report.processes, "counts": report.counts}))
"""


def test_a_fork_while_another_thread_imports_pickle_does_not_hang(
        server: TestServer, tmp_path: Path) -> None:
    """``download_processes`` forks even while other threads of the caller run. When the
    link imported pickle in the worker *after* the fork (548176e), a worker forked while
    another thread was inside ``import pickle`` waited forever for that thread's module
    lock (the thread does not exist in the child), and the parent for the worker: the
    run never ended. Imported before the fork, the parent waits for the other thread's
    import to finish instead."""
    urls = [server.add(f"/f{i}", b"f" * 100) for i in range(6)]
    proc = subprocess.Popen(
        [sys.executable, "-c", _IMPORTING_THREAD, " ".join(urls), str(tmp_path / "o")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        start_new_session=True)
    try:
        out, err = proc.communicate(timeout=3)
    except subprocess.TimeoutExpired:
        out, err = "", "still running after 3 s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the parent and a stuck worker
        with contextlib.suppress(Exception):
            proc.communicate(timeout=5)
    assert out, f"the run never ended ({err[-1500:]})"
    summary = json.loads(out)
    assert summary["processes"] == 2
    assert summary["counts"] == {"ok": 6, "skipped": 0, "failed": 0}
