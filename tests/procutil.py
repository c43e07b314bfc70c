"""Processes of the run under test, read from /proc (Linux): children, liveness."""

from __future__ import annotations

import os
import time
from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, or None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def parents() -> dict[int, list[int]]:
    """Every process's children, by parent PID."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def children(pid: int) -> list[int]:
    return parents().get(pid, [])


def descendants(pid: int) -> set[int]:
    tree, found, todo = parents(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent counts as ended)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def wait_children(pid: int, count: int, limit: float = 10.0) -> list[int]:
    """The children of ``pid`` once there are ``count`` of them (AssertionError after
    ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        kids = children(pid)
        if len(kids) >= count:
            return kids
        time.sleep(0.005)
    raise AssertionError(f"{pid} has no {count} children")


def gone(pids: list[int], limit: float = 10.0) -> bool:
    """Whether every one of ``pids`` has ended within ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.02)
    return False


def bare_python() -> tuple[list[str], dict[str, str]]:
    """An interpreter command and environment that start as a user's installed fetcher
    does: ``-S`` skips site-packages and their .pth start-up code (this checkout's
    editable install imports pathlib, and with it ipaddress, into every interpreter),
    and fetcher comes from this checkout. Only fetcher's own modules can be imported."""
    import os
    import sys

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    return [sys.executable, "-S"], env


def cli_modules(argv: list[str], modules: list[str], timeout: float = 60, *,
                bare: bool = False) -> tuple[int | str | None, list[bool], str]:
    """Run ``fetcher ARGV`` in a fresh interpreter as the console script does; return
    its exit code, whether each of ``modules`` was imported by the end (a stub the entry
    point left for a deferred module does not count), and stderr. ``bare``: in
    ``bare_python()``'s interpreter."""
    import json
    import subprocess
    import sys

    # The console entry point may leave through os._exit (no teardown): the probe
    # reports from there too, in this process only (not in a fan-out worker).
    probe = ("import json, os, sys, runpy\n"
             "argv, modules = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n"
             "sys.argv = ['fetcher', *argv]\n"
             "me, hard_exit = os.getpid(), os._exit\n"
             "def report(code):\n"
             "    loaded = [type(sys.modules.get(m)).__name__ == 'module' for m in modules]\n"
             "    print(json.dumps([code, loaded]), flush=True)\n"
             "def spied_exit(code):\n"
             "    if os.getpid() == me:\n        report(code)\n"
             "    hard_exit(code)\n"
             "os._exit = spied_exit\n"
             "try:\n    runpy.run_module('fetcher', run_name='__main__')\n"
             "except SystemExit as exc:\n    report(exc.code)\n")
    python, env = bare_python() if bare else ([sys.executable], None)
    done = subprocess.run([*python, "-c", probe, json.dumps(argv), json.dumps(modules)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    lines = done.stdout.strip().splitlines()
    if not lines:
        return None, [], done.stderr
    code, loaded = json.loads(lines[-1])
    return code, loaded, done.stderr
