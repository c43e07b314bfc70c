"""Shared machinery for the benchmarks: a private nginx, test data, timing, tools.

Everything lives under a work directory (default ``bench/.work/``, gitignored):

```
bench/.work/
  nginx/     prefix: nginx.conf, nginx.pid, logs/, tmp/   (one private server)
  data/      the files nginx serves (generated once, reused while the spec matches)
  lists/     URL lists and tool config files (rewritten per run: they hold the port)
  out/       per-tool output directories, emptied before every timed run
  venv-fetcher/      a virtualenv with fetcher installed from the repo (not editable)
  venv-fetcher-src/  the snapshot of the sources it was last installed from
```

Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import grp
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import pwd
import random
import resource
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_WORK = BENCH_DIR / ".work"
RESULTS_DIR = BENCH_DIR / "results"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# --------------------------------------------------------------------------- utilities


def log(msg: str) -> None:
    """Progress notes go to stderr so stdout stays the table."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def clean_env() -> dict[str, str]:
    """The environment every tool runs in: no proxies, so 127.0.0.1 is reached directly."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.setdefault("LC_ALL", "C.UTF-8")
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def remove_tree(path: Path) -> None:
    """``rm -rf`` (much faster than shutil.rmtree for a million files)."""
    if not path.exists() and not path.is_symlink():
        return
    if shutil.which("rm"):
        subprocess.run(["rm", "-rf", "--", str(path)], check=False)
    if path.exists():
        shutil.rmtree(path)


def empty_dir(path: Path) -> Path:
    """Remove ``path`` (if any) and recreate it empty."""
    remove_tree(path)
    path.mkdir(parents=True)
    return path


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


# --------------------------------------------------------------------------- nginx


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` so nginx gets SIGTERM if the harness dies (even by SIGKILL).

    Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere, ``None``. The signal goes
    when the *thread* that started nginx exits, so start it from a thread that
    outlives it (the main thread, in every script here).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def child() -> None:
        prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the harness died before prctl took effect
            os._exit(1)

    return child


class DelayProxy:
    """bench/delay_proxy.py in front of ``port``: ``delay_ms`` each way (a far server)."""

    def __init__(self, port: int, delay_ms: float) -> None:
        self.target, self.delay_ms = port, delay_ms
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> DelayProxy:
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / "delay_proxy.py"), "--to",
             f"127.0.0.1:{self.target}", "--delay-ms", str(self.delay_ms)],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.__exit__()
            raise RuntimeError("bench/delay_proxy.py did not start")
        self.port = int(line)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@dataclasses.dataclass
class Nginx:
    """A private nginx on 127.0.0.1, run in the foreground (``daemon off``) as a child.

    ``root`` is served at ``/``; ``/slow/`` serves the same files with
    ``limit_rate`` per connection; ``/t/<anything>`` answers ``200 "x"`` without
    touching the disk (for million-line URL lists). Keep-alive is on with a very
    high ``keepalive_requests``, ``sendfile`` on, ``access_log`` off; Range
    requests are nginx's default for static files.
    """

    root: Path
    work: Path = DEFAULT_WORK
    slow_rate: str = "20m"
    workers: int = 1
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def prefix(self) -> Path:
        return self.work / "nginx"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _conf(self) -> str:
        p = self.prefix
        user = ""
        if os.geteuid() == 0:
            # As root nginx would drop workers to "nobody"; keep them as us instead.
            user = f"user {pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name};"
        return f"""# generated by bench/common.py: private benchmark server
{user}
worker_processes {self.workers};
worker_rlimit_nofile 65536;
daemon off;
master_process on;
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;
events {{
    worker_connections 8192;
    multi_accept on;
}}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 100000;
    open_file_cache max=20000 inactive=120s;
    default_type application/octet-stream;
    types {{ }}
    server_tokens off;
    client_body_temp_path {p}/tmp/client_body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    server {{
        listen 127.0.0.1:{self.port} backlog=4096;
        server_name localhost;
        root {self.root};
        location / {{ }}
        location /slow/ {{
            alias {self.root}/;
            limit_rate {self.slow_rate};
        }}
        location /t/ {{
            default_type text/plain;
            return 200 "x";
        }}
    }}
}}
"""

    def start(self) -> Nginx:
        exe = nginx_path()
        if exe is None:
            raise RuntimeError("nginx not found and apt-get install nginx did not help")
        for d in ("logs", "tmp"):
            (self.prefix / d).mkdir(parents=True, exist_ok=True)
        last_err = ""
        for _attempt in range(5):
            self.port = free_port()
            conf = self.prefix / "nginx.conf"
            conf.write_text(self._conf())
            errlog = self.prefix / "logs" / "error.log"
            cmd = [exe, "-p", f"{self.prefix}/", "-c", str(conf), "-e", str(errlog)]
            with open(self.prefix / "logs" / "stderr.log", "ab") as stderr:
                self.proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    start_new_session=True,
                    preexec_fn=_die_with_parent(),
                )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                        log(f"nginx {self.base_url} (pid {self.proc.pid}, root {self.root})")
                        return self
                except OSError:
                    time.sleep(0.05)
            last_err = (self.prefix / "logs" / "error.log").read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError(f"nginx did not start:\n{last_err}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)  # fast shutdown
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- output location


def is_tmpfs(path: Path) -> bool:
    """Whether ``path`` is the mount point of a tmpfs (from /proc/mounts)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[1] == str(path) and parts[2] == "tmpfs":
                return True
    return False


class OutputRoots:
    """Where tools write their downloads: tmpfs when it fits, else the work dir.

    ``mode``: ``auto`` (tmpfs ``/dev/shm`` when it has room, else disk), ``disk``
    (``WORK/out``), or a directory path. Writing to tmpfs takes the machine's
    filesystem out of the comparison: on some virtual disks creating a small file
    costs ~1 ms of kernel time, the same for every tool, which would swamp the
    differences between downloaders and vary from minute to minute.
    """

    def __init__(self, mode: str, work: Path) -> None:
        self.mode, self.work = mode, work
        self.tmp = Path("/dev/shm") / f"fetcher-bench-{os.getpid()}"

    def pick(self, need_bytes: int) -> tuple[Path, str]:
        """A root for a suite whose outputs take up to ``need_bytes``, and its label."""
        if self.mode == "disk":
            return self.work / "out", "disk"
        if self.mode != "auto":
            return Path(self.mode).resolve(), "given"
        shm = self.tmp.parent
        if is_tmpfs(shm) and shutil.disk_usage(shm).free > need_bytes * 1.5 + 512 * MiB:
            return self.tmp, "tmpfs"
        return self.work / "out", "disk (tmpfs too small)"

    def cleanup(self) -> None:
        remove_tree(self.tmp)


def files_footprint(count: int, size: int, page: int = 4096) -> int:
    """Bytes ``count`` files of ``size`` occupy (rounded up to pages, plus slack)."""
    return count * (-(-max(size, 1) // page) * page + 1024)


# --------------------------------------------------------------------------- data


def _spec_ok(marker: Path, spec: dict[str, Any]) -> bool:
    try:
        return bool(json.loads(marker.read_text()) == spec)
    except (OSError, ValueError):
        return False


def make_file_set(directory: Path, count: int, size: int, *, seed: int = 1) -> list[Path]:
    """``count`` files of ``size`` random bytes named ``f000000.bin``...; reused if present."""
    spec = {"kind": "set", "count": count, "size": size, "seed": seed}
    marker = directory / ".spec.json"
    names = [directory / f"f{i:06d}.bin" for i in range(count)]
    if _spec_ok(marker, spec):
        return names
    log(f"generating {count} x {size} B in {directory}")
    empty_dir(directory)
    rng = random.Random(seed)
    for p in names:
        p.write_bytes(rng.randbytes(size))
    marker.write_text(json.dumps(spec))
    return names


def block_at(index: int, base: bytes) -> bytes:
    """Block ``index`` of a big file: a shared random block stamped with its index.

    Every 1 MiB block differs (the first 8 bytes are its number), so a download
    that puts ranges in the wrong place fails verification.
    """
    return struct.pack(">Q", index) + base[8:]


def make_big_file(path: Path, size: int, *, seed: int = 2, block: int = MiB) -> Path:
    """A real (not sparse) file of ``size`` bytes; reused if present and the spec matches."""
    spec = {"kind": "big", "size": size, "seed": seed, "block": block}
    marker = path.with_name(path.name + ".spec.json")
    if path.exists() and path.stat().st_size == size and _spec_ok(marker, spec):
        return path
    log(f"generating {path} ({size / MiB:.0f} MiB)")
    path.parent.mkdir(parents=True, exist_ok=True)
    base = random.Random(seed).randbytes(block)
    with open(path, "wb") as f:
        full, rest = divmod(size, block)
        for i in range(full):
            f.write(block_at(i, base))
        if rest:
            f.write(block_at(full, base)[:rest])
    marker.write_text(json.dumps(spec))
    return path


def write_lines(path: Path, lines: Iterable[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", buffering=1 << 20) as f:
        for line in lines:
            f.write(line)
            f.write("\n")
    return path


def write_curl_config(path: Path, pairs: Iterable[tuple[str, Path]]) -> Path:
    """A curl ``--config`` file of ``url = ...`` / ``output = ...`` pairs."""
    return write_lines(path, (f'url = "{u}"\noutput = "{o}"' for u, o in pairs))


# --------------------------------------------------------------------------- verification


def iter_output_files(root: Path) -> Iterator[Path]:
    """Regular files under ``root``, skipping bookkeeping: dot-dirs/-files, ``*.aria2``."""
    stack = [root] if root.is_dir() else []
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                if e.name.startswith(".") or e.name.endswith(".aria2"):
                    continue
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=False):
                    yield Path(e.path)


def verify_by_name(out: Path, expected: Sequence[Path], *, sample: int = 20) -> str | None:
    """Every expected file (matched by basename) is present with the right size.

    Also compares the full content of up to ``sample`` small files, and sampled
    1 MiB blocks of large ones. Returns ``None`` when all is well, else a reason.
    """
    want = {p.name: p for p in expected}
    got: dict[str, Path] = {}
    for f in iter_output_files(out):
        if f.name in want:
            got[f.name] = f
    missing = [n for n in want if n not in got]
    if missing:
        return f"{len(missing)}/{len(want)} files missing (e.g. {missing[0]})"
    total_want = total_got = 0
    for name, src in want.items():
        s_want, s_got = src.stat().st_size, got[name].stat().st_size
        total_want += s_want
        total_got += s_got
        if s_want != s_got:
            return f"{name}: {s_got} bytes, expected {s_want}"
    rng = random.Random(len(want))
    names = list(want)
    for name in rng.sample(names, min(sample, len(names))):
        reason = _compare_content(want[name], got[name], rng)
        if reason:
            return reason
    return None


def _compare_content(src: Path, dst: Path, rng: random.Random, blocks: int = 32) -> str | None:
    size = src.stat().st_size
    with open(src, "rb") as a, open(dst, "rb") as b:
        if size <= 4 * MiB:
            return None if a.read() == b.read() else f"{dst.name}: content differs"
        offsets = {0, max(0, size - MiB)} | {rng.randrange(0, size) for _ in range(blocks)}
        for off in sorted(offsets):
            a.seek(off)
            b.seek(off)
            if a.read(MiB) != b.read(MiB):
                return f"{dst.name}: content differs near offset {off}"
    return None


# --------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Timed:
    """One measured command: wall clock, CPU, peak RSS and the process tree's peak PSS."""

    cmd: list[str]
    wall_s: float
    user_s: float
    sys_s: float
    peak_rss_mib: float
    returncode: int
    timed_out: bool = False
    stderr_tail: str = ""
    # Peak over ~20 ms samples of the PSS summed over the command's process tree
    # (None when /proc/<pid>/smaps_rollup cannot be read, or no sample was taken).
    tree_pss_mib: float | None = None
    tree_procs: int = 0  # most processes of the command alive at one sample
    tree_samples: int = 0
    sampler_cpu_s: float = 0.0  # the harness's own CPU spent sampling (not in user_s/sys_s)
    # Descendants still alive when the command exited (e.g. a multiprocessing
    # forkserver, which Python never waits for): reaped by the harness as a child
    # subreaper, and their CPU added to user_s/sys_s (orphan_cpu_s of it).
    orphans: int = 0
    orphan_cpu_s: float = 0.0
    unaccounted: int = 0  # descendants that escaped both (their CPU is missing)

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    @property
    def peak_mem_mib(self) -> float:
        """The larger of the two memory measures: what memory targets are judged on."""
        return max(self.peak_rss_mib, self.tree_pss_mib or 0.0)


def gnu_time() -> str | None:
    """Path of GNU ``time`` (package ``time``), used to read the child's own peak RSS."""
    exe = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    if exe is None:
        exe = ensure_command("time", "time")
    if exe is None:
        return None
    try:
        p = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return exe if "GNU" in (p.stdout + p.stderr) else None


_GNU_TIME: list[str | None] = []


def _gnu_time_cached() -> str | None:
    if not _GNU_TIME:
        _GNU_TIME.append(gnu_time())
        if _GNU_TIME[0] is None:
            log(
                "GNU time not found: peak RSS falls back to wait4 ru_maxrss, which "
                "includes the harness's own RSS at fork (an overestimate)"
            )
    return _GNU_TIME[0]


def _ppid_sid(pid: int) -> tuple[int, int] | None:
    """(parent pid, session id) of ``pid`` from /proc/<pid>/stat; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        rest = data[data.rindex(b")") + 2 :].split()
        return int(rest[1]), int(rest[3])  # fields 4 (ppid) and 6 (session)
    except (OSError, ValueError, IndexError):
        return None


def _proc_pids() -> set[int]:
    return {int(n) for n in os.listdir("/proc") if n.isdigit()}


def _pss_kib(pid: int) -> int | None:
    """Proportional set size of ``pid`` in KiB (/proc/<pid>/smaps_rollup); None if unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            data = f.read()
    except OSError:
        return None
    i = data.find(b"\nPss:")
    if i < 0:
        return 0  # a zombie: no memory left
    return int(data[i + 5 : data.index(b"kB", i)])


class TreeSampler(threading.Thread):
    """Samples the summed PSS of a command's whole process tree every ``interval`` s.

    RSS counts a page in every process that maps it, so after ``fork`` the
    copy-on-write pages a parent shares with its workers would count once per
    process; PSS charges a page shared by N processes 1/N to each, so the sum over
    the tree counts it once. The tree is every process in the command's session
    (the harness starts each command with ``start_new_session``) plus every
    descendant of the root that left the session. This kernel has no
    /proc/<pid>/task/<tid>/children, so /proc is listed each time, but only *new*
    pids have their stat read: a sample costs one directory listing plus one
    smaps_rollup read per process of the tree.

    The first 0.1 s is sampled twice as often (short commands). The period is
    stretched when a sample is expensive (PSS makes the kernel walk the page
    tables, ~10 ns per resident page), so the sampler stays under ~5% of one core.
    Sampling misses peaks shorter than the period and the last instants before
    exit, so this is a lower bound of the true peak.
    """

    def __init__(self, *, skip_root: bool, interval: float = 0.02) -> None:
        """Create it *before* starting the command: the pids alive now are not its tree."""
        super().__init__(name="tree-sampler", daemon=True)
        self.root, self.skip_root, self.interval = -1, skip_root, interval
        self._halt = threading.Event()
        # pids already classified (in or out of the tree)
        self._seen: set[int] = _proc_pids() if interval > 0 else set()
        self.tree: set[int] = set()
        self.peak_kib: int | None = None
        self.max_procs = 0
        self.samples = 0
        self.cpu_s = 0.0
        self.ok = Path(f"/proc/{os.getpid()}/smaps_rollup").exists()

    def _classify(self) -> None:
        pids = _proc_pids()
        self._seen &= pids
        self.tree &= pids
        pending: dict[int, tuple[int, int]] = {}
        for pid in pids - self._seen:
            info = _ppid_sid(pid)
            if info is not None:
                pending[pid] = info
        grew = True
        while grew:  # a parent may be listed after its child
            grew = False
            for pid, (ppid, sid) in list(pending.items()):
                if pid == self.root or sid == self.root or ppid in self.tree:
                    self.tree.add(pid)
                    del pending[pid]
                    grew = True
        self._seen |= pids

    def sample(self) -> None:
        self._classify()
        total, procs = 0, 0
        for pid in self.tree:
            if pid == self.root and self.skip_root:
                continue
            kib = _pss_kib(pid)
            if kib is not None:
                total += kib
                procs += 1
        self.samples += 1
        self.max_procs = max(self.max_procs, procs)
        if procs:
            self.peak_kib = max(self.peak_kib or 0, total)

    def begin(self, root: int) -> None:
        """Sample the tree of ``root`` (a process started after ``__init__``)."""
        self.root = root
        if self.interval > 0:
            self.start()

    def run(self) -> None:
        if not self.ok:
            return
        t0 = time.thread_time()
        start = time.monotonic()
        while True:
            t = time.thread_time()
            with contextlib.suppress(OSError):
                self.sample()
            # Half the period for the first 0.1 s, so that commands of a few
            # tens of ms are sampled at all (the first sample may precede the exec).
            period = self.interval / 2 if time.monotonic() - start < 0.1 else self.interval
            # smaps_rollup walks the page tables (~2 ms for 200 MiB resident): stretch
            # the period so that sampling never takes more than ~5% of one core.
            if self._halt.wait(max(period, (time.thread_time() - t) * 19)):
                break
        self.cpu_s = time.thread_time() - t0

    def stop(self) -> None:
        self._halt.set()
        self.join()


_PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper(on: bool) -> bool:
    """Make orphaned descendants reparent to us (Linux prctl), so we can reap them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _reap_orphans(sid: int, grace: float) -> tuple[int, float, float, float, int]:
    """Wait for the command's processes that were reparented to us; kill them after ``grace``.

    Returns (count, user s, sys s, max RSS KiB, left): the rusage of every one we
    reaped (each includes whatever it reaped itself), and how many processes of
    the session are still alive but not ours to reap (their CPU is lost).
    """
    me = os.getpid()
    deadline = time.monotonic() + grace
    count, user, system, maxrss = 0, 0.0, 0.0, 0.0
    killed = False
    while True:
        mine, others = [], 0
        for pid in _proc_pids():
            info = _ppid_sid(pid)
            if info is not None and info[1] == sid:
                if info[0] == me:
                    mine.append(pid)
                else:
                    others += 1
        if not mine:
            return count, user, system, maxrss, others
        for pid in mine:
            try:
                got, _, ru = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if got:
                count += 1
                user += ru.ru_utime
                system += ru.ru_stime
                maxrss = max(maxrss, float(ru.ru_maxrss))
        now = time.monotonic()
        if now > deadline and not killed:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(sid, signal.SIGKILL)
            killed = True
        elif now > deadline + 5:
            return count, user, system, maxrss, others + len(mine)
        time.sleep(0.01)


def _sample_interval() -> float:
    """Tree sampling period: ``BENCH_TREE_SAMPLE_MS`` (default 20; 0 turns sampling off)."""
    with contextlib.suppress(ValueError):
        return float(os.environ.get("BENCH_TREE_SAMPLE_MS", "20")) / 1000
    return 0.02


def run_timed(
    cmd: Sequence[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
) -> Timed:
    """Run ``cmd`` and measure it.

    - wall: ``perf_counter`` from spawn to the exit of the command's main process;
    - CPU user/sys: the ``os.wait4`` rusage of the child. Linux folds into it the
      CPU of every descendant that was waited for (by it, or by whoever reaped
      it in between). Descendants the command never waits for (Python's
      multiprocessing ``forkserver``, and the workers it reaped) would be lost:
      the harness makes itself a child subreaper while the command runs, so they
      are reparented to it when the command exits; it waits up to 2 s for them
      (then SIGKILLs) and adds their rusage (``orphan_cpu_s``);
    - peak RSS: the largest resident set of one process of the command, in MiB.
      Read through GNU ``time -f %M``, because ``ru_maxrss`` of a process we fork
      directly starts at *our* RSS (the fork/vfork inherits the parent's
      high-water mark); ``time`` is ~1.5 MiB, so that floor becomes negligible.
      Reaped orphans' ``ru_maxrss`` counts too (their floor is the command's RSS);
    - tree PSS: the peak over ~20 ms samples of the PSS summed over the command's
      whole process tree (see ``TreeSampler``), the ``time`` wrapper excluded.

    On timeout the process group gets SIGINT (GNU time ignores it and still
    reports), then SIGKILL 5 s later; ``timed_out`` is set.
    """
    log_dir = log_dir or DEFAULT_WORK / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / "last.stdout", log_dir / "last.stderr"
    rss_path = log_dir / "last.rss"
    rss_path.unlink(missing_ok=True)
    timer_exe = _gnu_time_cached()
    full = [timer_exe, "-f", "%M", "-o", str(rss_path), *cmd] if timer_exe else list(cmd)
    timed_out = threading.Event()
    interval = _sample_interval()
    subreaper = _set_subreaper(True)
    sampler = TreeSampler(skip_root=bool(timer_exe), interval=interval)
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                full,
                cwd=cwd,
                env=env if env is not None else clean_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            sampler.begin(proc.pid)

            def _signal(sig: int) -> None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)

            def _interrupt() -> None:
                timed_out.set()
                _signal(signal.SIGINT)

            timers = [
                threading.Timer(timeout, _interrupt),
                threading.Timer(timeout + 5, _signal, (signal.SIGKILL,)),
            ]
            for t in timers:
                t.daemon = True
                t.start()
            try:
                while True:
                    try:
                        _, status, ru = os.wait4(proc.pid, 0)
                        break
                    except InterruptedError:
                        continue
            finally:
                wall = time.perf_counter() - t0
                for t in timers:
                    t.cancel()
                if sampler.is_alive():
                    sampler.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
        orphans, o_user, o_sys, o_rss, left = _reap_orphans(proc.pid, grace=2.0)
    finally:
        if subreaper:
            _set_subreaper(False)
    _signal(signal.SIGKILL)  # anything the command left behind in its group
    rss_kib = float(ru.ru_maxrss)
    if timer_exe:
        # If time itself was killed, keep the (over)estimate from wait4.
        with contextlib.suppress(OSError, ValueError, IndexError):
            rss_kib = float(rss_path.read_text().split()[-1])
    tail = err_path.read_bytes()[-1500:].decode(errors="replace").strip()
    return Timed(
        cmd=list(cmd),
        wall_s=wall,
        user_s=ru.ru_utime + o_user,
        sys_s=ru.ru_stime + o_sys,
        peak_rss_mib=max(rss_kib, o_rss) / 1024,
        returncode=proc.returncode,
        timed_out=timed_out.is_set(),
        stderr_tail=tail,
        tree_pss_mib=None if sampler.peak_kib is None else sampler.peak_kib / 1024,
        tree_procs=sampler.max_procs,
        tree_samples=sampler.samples,
        sampler_cpu_s=sampler.cpu_s,
        orphans=orphans,
        orphan_cpu_s=o_user + o_sys,
        unaccounted=left,
    )


# --------------------------------------------------------------------------- tools

_install_tried: set[str] = set()


def _apt_install(pkg: str) -> None:
    if shutil.which("apt-get") is None:
        return
    log(f"trying: apt-get install -y {pkg}")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run([*sudo, "apt-get", "update", "-qq"], env=env, check=False, timeout=300)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-qq", pkg], env=env, check=False, timeout=600
    )


def ensure_command(name: str, apt_pkg: str | None = None) -> str | None:
    """Path of ``name``; if missing, try ``apt-get install`` once; ``None`` if still missing."""
    found = shutil.which(name)
    if found or apt_pkg is None:
        return found
    if apt_pkg not in _install_tried:
        _install_tried.add(apt_pkg)
        with contextlib.suppress(Exception):
            _apt_install(apt_pkg)
    found = shutil.which(name)
    if not found:
        log(f"{name} not available (apt package {apt_pkg}); skipping it")
    return found


def ensure_module(module: str, pip_pkg: str | None = None) -> bool:
    """Whether ``module`` imports; if not, try ``pip install`` once."""
    if importlib.util.find_spec(module) is not None:
        return True
    pkg = pip_pkg or module
    if pkg not in _install_tried:
        _install_tried.add(pkg)
        log(f"trying: pip install {pkg}")
        with contextlib.suppress(Exception):
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", pkg], check=False, timeout=600
            )
        importlib.invalidate_caches()
    ok = importlib.util.find_spec(module) is not None
    if not ok:
        log(f"python module {module} not available (pip {pkg}); skipping it")
    return ok


def nginx_path() -> str | None:
    """nginx lives in /usr/sbin, which is not on every user's PATH."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    found = shutil.which("nginx", path=path)
    if found is None:
        ensure_command("nginx", "nginx")
        found = shutil.which("nginx", path=path)
    return found


# --------------------------------------------------------------------------- fetcher as installed

VENV_NAME = "venv-fetcher"
_SNAPSHOT_EXTRAS = ("pyproject.toml", "README.md", "LICENSE", "LICENSE.txt", "setup.py",
                    "setup.cfg", "MANIFEST.in")


@dataclasses.dataclass(frozen=True)
class FetcherCommand:
    """How the benchmarks start fetcher, and what that is."""

    argv: tuple[str, ...]
    kind: str  # "installed" | "fallback" | "override"
    python: str  # the interpreter fetcher runs on (for `python -c pass`, the version)
    note: str  # one line for the suite notes

    def as_dict(self) -> dict[str, Any]:
        return {"argv": list(self.argv), "kind": self.kind, "python": self.python,
                "note": self.note}


_FETCHER: list[FetcherCommand] = []


def _source_files(root: Path) -> list[Path]:
    """fetcher's files under ``root`` that an install takes: ``fetcher/**`` minus bytecode."""
    files = [p for p in (root / "fetcher").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")]
    return sorted(files)


def fetcher_source_hash(root: Path = REPO_ROOT) -> str:
    """SHA-256 over fetcher/** (bytecode excluded) and pyproject.toml, names and contents."""
    h = hashlib.sha256()
    for p in [*_source_files(root), root / "pyproject.toml"]:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes() if p.exists() else b"")
        h.update(b"\0")
    return h.hexdigest()


def _dependencies_key(root: Path) -> str:
    """The [project] dependencies of pyproject.toml, as a comparable string."""
    import tomllib

    with contextlib.suppress(OSError, ValueError):
        project = tomllib.loads((root / "pyproject.toml").read_text()).get("project", {})
        return json.dumps(project.get("dependencies", []))
    return ""


def _snapshot(dest: Path) -> Path:
    """Copy what ``pip install`` needs into ``dest``: others may edit the repo meanwhile,
    and pip builds in the source tree (build/, *.egg-info), which stays out of the repo."""
    remove_tree(dest)
    dest.mkdir(parents=True)
    shutil.copytree(REPO_ROOT / "fetcher", dest / "fetcher",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo"))
    for name in _SNAPSHOT_EXTRAS:
        if (REPO_ROOT / name).is_file():
            shutil.copy2(REPO_ROOT / name, dest / name)
    return dest


def _constraints(path: Path) -> Path:
    """Pin fetcher's dependencies to the versions the harness's environment has."""
    pins = set()
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() != "fetcher":
            pins.add(f"{name}=={dist.version}")
    return write_lines(path, sorted(pins))


def _pip(python: Path, *args: str) -> None:
    cmd = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--timeout", "30", "--retries", "2", *args]
    log("  " + " ".join(cmd))
    env = dict(clean_env(), PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # pip compiles bytecode either way; be sure
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if p.returncode != 0:
        lines = [x for x in (p.stderr + p.stdout).splitlines()
                 if x.strip() and "is ignored: it is neither a file nor a directory" not in x]
        errors = [x.strip() for x in lines if x.lstrip().startswith("ERROR")]
        excerpt = " | ".join((errors or lines)[-4:])
        raise RuntimeError(f"pip install exit {p.returncode}: {excerpt}")


def _install_fetcher(venv: Path) -> str:
    """Create ``venv`` (once) and (re)install fetcher into it, non-editable, when needed.

    Dependencies are installed the first time, and again only when the dependency
    list in pyproject.toml changes; otherwise a change to fetcher's sources
    reinstalls fetcher alone (``--no-deps --force-reinstall``). Returns what was done.
    """
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.with_name(venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two harnesses at once build it once
        marker = venv / "fetcher-bench.json"
        try:
            state = json.loads(marker.read_text())
        except (OSError, ValueError):
            state = {}
        base = f"{getattr(sys, '_base_executable', sys.executable)} {platform.python_version()}"
        python = venv / "bin" / "python"
        if state.get("base_python") != base or not python.exists():
            log(f"creating {venv} (a virtualenv fetcher is installed into, not editable)")
            remove_tree(venv)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                           capture_output=True, timeout=300)
            state = {"base_python": base}
            marker.write_text(json.dumps(state))
        wanted = fetcher_source_hash()
        deps = _dependencies_key(REPO_ROOT)
        if (state.get("src_hash") == wanted and state.get("deps") == deps
                and (venv / "bin" / "fetcher").exists()):
            return f"up to date (sources {wanted[:12]})"
        src = _snapshot(venv.with_name(venv.name + "-src"))
        got = fetcher_source_hash(src)
        if state.get("deps") != deps:
            log(f"installing fetcher and its dependencies into {venv}")
            try:  # pip always reinstalls a local directory, so fetcher is replaced too
                _pip(python, "-c", str(_constraints(venv / "constraints.txt")), str(src))
            except RuntimeError as exc:  # the harness's versions may not fit: unpinned
                log(f"  with the harness's versions pinned: {exc}; trying unpinned")
                _pip(python, str(src))
            what = "installed with dependencies"
        else:
            log(f"fetcher's sources changed: reinstalling fetcher alone into {venv}")
            _pip(python, "--no-deps", "--force-reinstall", str(src))
            what = "reinstalled (sources changed)"
        check = subprocess.run([str(venv / "bin" / "fetcher"), "--help"], capture_output=True,
                               text=True, timeout=120, env=clean_env())
        if check.returncode != 0:
            raise RuntimeError(f"installed `fetcher --help` exit {check.returncode}: "
                               f"{check.stderr.strip()[-300:]}")
        state.update(src_hash=got, deps=deps, installed=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        marker.write_text(json.dumps(state))
        return f"{what} (sources {got[:12]})"


def prepare_fetcher(work: Path | None = None) -> FetcherCommand:
    """Decide (once per process) how fetcher is started; build its venv if needed.

    Default: ``WORK/venv-fetcher/bin/fetcher``, the console script of a virtualenv
    into which the repository is ``pip install``-ed (a wheel, not editable, so
    bytecode is compiled at install time), as a user runs fetcher after
    ``pip install .``. The development venv's editable install would add its
    import hook (~20 ms at every interpreter start) and ``-m`` runpy, which no user
    pays. ``FETCHER_BENCH_CMD`` overrides the command. If the venv cannot be built
    (no network, say), fetcher runs as ``python -m fetcher`` on this interpreter,
    with its bytecode precompiled, and the notes say so.
    """
    if _FETCHER:
        return _FETCHER[0]
    override = os.environ.get("FETCHER_BENCH_CMD")
    if override:
        precompile_fetcher()  # the override may run the repo's sources
        argv = tuple(shlex.split(override))
        found = shutil.which(argv[0]) or argv[0]
        python = sys.executable
        with contextlib.suppress(OSError, UnicodeDecodeError):
            first = Path(found).read_text(errors="strict").splitlines()[0]
            if first.startswith("#!") and "python" in first:
                python = first[2:].strip().split()[0]
        cmd = FetcherCommand(argv, "override", python,
                             f"fetcher ran as FETCHER_BENCH_CMD={override!r}")
    else:
        venv = (work or DEFAULT_WORK) / VENV_NAME
        try:
            what = _install_fetcher(venv)
            script = venv / "bin" / "fetcher"
            cmd = FetcherCommand(
                (str(script),), "installed", str(venv / "bin" / "python"),
                f"fetcher ran as the console script of a non-editable install ({script}); "
                f"{what}",
            )
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            reason = str(exc).strip()[-400:]
            log(f"NOTE: could not build {venv} ({reason}); falling back to "
                f"`{sys.executable} -m fetcher` (the development install)")
            precompile_fetcher()
            cmd = FetcherCommand(
                (sys.executable, "-m", "fetcher"), "fallback", sys.executable,
                f"FALLBACK: fetcher ran as `{sys.executable} -m fetcher` from the development "
                f"install, because the benchmark venv could not be built ({reason[:160]}); "
                "an editable install adds its import hook (~20 ms per start) and -m adds runpy",
            )
    log(cmd.note)
    _FETCHER.append(cmd)
    return cmd


def fetcher_cmd() -> list[str]:
    """The command that starts fetcher (see ``prepare_fetcher``)."""
    return list(prepare_fetcher().argv)


def precompile_fetcher() -> None:
    """Write the repo's fetcher bytecode, as ``pip install .`` does at install time.

    Needed only when fetcher runs from the repository's sources (the fallback, or
    a ``FETCHER_BENCH_CMD`` that may): an editable install under
    ``PYTHONDONTWRITEBYTECODE=1`` (set on some machines) would otherwise recompile
    every module on every run, ~50 ms that no installed copy pays.
    """
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO_ROOT / "fetcher")],
                   capture_output=True, check=False)


def fetcher_get_help() -> str | None:
    """``fetcher get --help`` text, or ``None`` when ``fetcher get`` does not work yet."""
    try:
        p = subprocess.run(
            [*fetcher_cmd(), "get", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(clean_env(), COLUMNS="200", NO_COLOR="1", TERM="dumb"),
            cwd=REPO_ROOT,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout if p.returncode == 0 else None


def tool_version(cmd: Sequence[str]) -> str:
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (p.stdout or p.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def machine_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _busy_cpu_s() -> float:
    """CPU seconds all CPUs spent not idle since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _session_cpu_s(sid: int) -> float:
    """CPU seconds of the live processes in session ``sid`` (our nginx)."""
    total = 0
    tck = os.sysconf("SC_CLK_TCK")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(entry.path, "stat").read_text()
            rest = stat[stat.rindex(")") + 2 :].split()
            if int(rest[3]) == sid:  # field 6: session
                total += int(rest[11]) + int(rest[12])  # fields 14, 15: utime, stime
    return total / tck


class CpuMeter:
    """How much CPU *other* work on the machine used while we measured.

    Benchmarks on a shared machine are noisy. This takes all-CPU busy time from
    /proc/stat and subtracts our own (this process, every child we reaped, the
    private nginx); the remainder, as a share of the machine's capacity, says how
    busy the neighbours were.
    """

    def __init__(self, nginx_sid: int | None = None) -> None:
        self.sid = nginx_sid
        self.start = self._snap()

    def _snap(self) -> tuple[float, float, float]:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
        if self.sid:
            own += _session_cpu_s(self.sid)
        return time.monotonic(), _busy_cpu_s(), own

    def report(self) -> dict[str, Any]:
        t1, busy1, own1 = self._snap()
        t0, busy0, own0 = self.start
        cpus = os.cpu_count() or 1
        foreign = max(0.0, (busy1 - busy0) - (own1 - own0))
        share = foreign / max(1e-9, (t1 - t0) * cpus)
        return {
            "wall_s": round(t1 - t0, 1),
            "cpus": cpus,
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "foreign_cpu_s": round(foreign, 1),
            "foreign_cpu_share": round(share, 3),
            # a quarter of the machine taken by others is enough to move wall times
            "busy": share > 0.25,
        }


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- self-check

_BUSY = ("import time\ndef busy(s):\n    t = time.process_time()\n"
         "    while time.process_time() - t < s: pass\n")
_CHECKS = {
    # a child forked and waited for: its CPU is in the parent's wait4 rusage
    "fork + wait": _BUSY + "import os\npid = os.fork()\nif pid == 0:\n    busy(0.5)\n"
    "    os._exit(0)\nos.waitpid(pid, 0)\n",
    # multiprocessing forkserver: Python never waits for the server, which reaped the worker
    "forkserver worker": _BUSY + "import multiprocessing as mp\nif __name__ == '__main__':\n"
    "    p = mp.get_context('forkserver').Process(target=busy, args=(0.5,))\n"
    "    p.start()\n    p.join()\n",
    # a child left running when the parent exits
    "orphan": _BUSY + "import os\nif os.fork() == 0:\n    busy(0.5)\n    os._exit(0)\n",
    # 200 MiB touched, then fork: RSS per process 200, tree PSS must stay ~200, not 400
    "fork after 200 MiB": "import os, time\nb = bytearray(200 << 20)\n"
    "for i in range(0, len(b), 4096): b[i] = 1\npid = os.fork()\ntime.sleep(0.5)\n"
    "if pid == 0: os._exit(0)\nos.waitpid(pid, 0)\n",
}


def accounting_check() -> bool:
    """Show that run_timed's CPU and tree PSS cover forked processes (bench/README.md)."""
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name, code in _CHECKS.items():
            script = Path(tmp) / "check.py"
            script.write_text(code)
            t = run_timed([sys.executable, str(script)], timeout=60, log_dir=Path(tmp))
            if name.startswith("fork after"):
                good = t.tree_pss_mib is not None and 150 < t.tree_pss_mib < 300
            else:
                good = t.cpu_s >= 0.45
            ok &= good and t.returncode == 0
            print(f"{name:<19} cpu {t.cpu_s:5.2f} s (of which {t.orphan_cpu_s:4.2f} s from "
                  f"{t.orphans} orphans reaped)  peak RSS {t.peak_rss_mib:6.1f} MiB  "
                  f"tree PSS {t.tree_pss_mib or 0:6.1f} MiB  {'ok' if good else 'WRONG'}")
    return ok


if __name__ == "__main__":
    sys.exit(0 if accounting_check() else 1)
