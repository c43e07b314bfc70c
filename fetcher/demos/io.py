"""``fetcher demo io``: I/O-bound work scales with workers, threads or processes alike.

Two jobs, each run one item at a time (``sequential``), on a thread pool and on a
process pool, for a range of worker counts:

``sleep``     tasks that only wait (``time.sleep``), the blog-post classic;
``download``  real HTTP downloads of generated files from a local server that this
              demo starts in its own process; every response is delayed by 20 ms so
              that the network wait exists even on loopback. Sequential and process
              runs call a plain urllib3 GET per file; the thread runs are
              ``fetcher.fetch(urls, dest, threads=N)`` (which also hashes, verifies
              and journals every file).

Process pools are started before the clock starts (their start-up cost is the subject
of ``fetcher demo overhead``). What to look for: both pools get faster roughly in
proportion to the workers while the CPU stays nearly idle.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3  # at import time, so warm workers have it loaded before the clock starts

from ..executors import parallel_map, shutdown_pools
from .common import Log, Record, best, make_record, pct, powers_of_two, quiet
from .measure import CpuMeter
from .server import DEFAULT_LATENCY_S, LocalServer

EXPERIMENT = "io"


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work one run of the demo does."""

    sleep_tasks: int
    sleep_s: float
    files: int
    file_bytes: int
    thread_workers: tuple[int, ...]
    process_workers: tuple[int, ...]


def sizes(quick: bool) -> Sizes:
    """The sizes for ``--quick`` (seconds) or a full run (convincing)."""
    if quick:
        return Sizes(sleep_tasks=16, sleep_s=0.05, files=32, file_bytes=32 * 1024,
                     thread_workers=(1, 4, 16), process_workers=(1, 4, 16))
    return Sizes(sleep_tasks=64, sleep_s=0.05, files=160, file_bytes=64 * 1024,
                 thread_workers=tuple(powers_of_two(64)),
                 process_workers=tuple(powers_of_two(32)))


def sleep_task(seconds: float) -> float:
    """An I/O-bound task with nothing to compute: wait, then return."""
    time.sleep(seconds)
    return seconds


def _noop(x: int) -> int:
    return x


_HTTP: Any = None


def download_file(job: tuple[str, str]) -> int:
    """GET ``url`` into ``path`` with one keep-alive connection per process; bytes."""
    global _HTTP
    url, path = job
    if _HTTP is None:
        _HTTP = urllib3.PoolManager(maxsize=1, retries=False,
                                    timeout=urllib3.Timeout(connect=10, read=30))
    resp = _HTTP.request("GET", url)
    if resp.status != 200:
        raise OSError(f"GET {url}: HTTP {resp.status}")
    data: bytes = resp.data
    with open(path, "wb") as fh:
        fh.write(data)
    return len(data)


def warm_pool(workers: int) -> None:
    """Start ``workers`` worker processes of parallel_map now, outside any timing."""
    parallel_map(_noop, range(workers), mode="process", workers=workers, chunksize=1)


def run(*, quick: bool = False, log: Log = quiet) -> list[Record]:
    """Run the experiment; one record per (workload, mode, workers)."""
    sz = sizes(quick)
    records: list[Record] = []
    records += _sleep_runs(sz, log)
    records += _download_runs(sz, log)
    return records


def _sleep_runs(sz: Sizes, log: Log) -> list[Record]:
    items = [sz.sleep_s] * sz.sleep_tasks
    out: list[Record] = []

    def rec(mode: str, workers: int, meter: CpuMeter, base: float | None) -> Record:
        return make_record(EXPERIMENT, "sleep", mode, workers, sz.sleep_tasks, "tasks",
                           meter.sample, base, note=f"{sz.sleep_s * 1000:.0f} ms each")

    log(f"io/sleep: {sz.sleep_tasks} tasks of {sz.sleep_s * 1000:.0f} ms")
    with CpuMeter() as m:
        for x in items:
            sleep_task(x)
    base = m.sample.wall_s
    out.append(rec("sequential", 1, m, base))
    for w in sz.thread_workers:
        with CpuMeter() as m:
            parallel_map(sleep_task, items, mode="thread", workers=w, chunksize=1,
                         on_error="raise")
        out.append(rec("threads", w, m, base))
    for w in sz.process_workers:
        warm_pool(w)
        with CpuMeter(uses_processes=True) as m:
            parallel_map(sleep_task, items, mode="process", workers=w, chunksize=1,
                         on_error="raise")
        out.append(rec("processes", w, m, base))
        shutdown_pools()
    return out


def _download_runs(sz: Sizes, log: Log) -> list[Record]:
    from ..downloader import fetch

    out: list[Record] = []
    with tempfile.TemporaryDirectory(prefix="fetcher-demo-io-") as tmp:
        site = Path(tmp) / "site"
        (site / "files").mkdir(parents=True)
        rels = [f"files/f{i:05d}.bin" for i in range(sz.files)]
        for rel in rels:
            (site / rel).write_bytes(os.urandom(sz.file_bytes))
        with LocalServer(site, latency=DEFAULT_LATENCY_S) as srv:
            urls = [srv.url(rel) for rel in rels]
            log(f"io/download: {sz.files} files of {sz.file_bytes // 1024} KiB from "
                f"127.0.0.1 (+{DEFAULT_LATENCY_S * 1000:.0f} ms per request)")
            note = f"{sz.file_bytes // 1024} KiB, +{DEFAULT_LATENCY_S * 1000:.0f} ms/request"
            runs = iter(range(1_000_000))

            def fresh_jobs() -> tuple[Path, list[tuple[str, str]]]:
                dest = Path(tmp) / f"run{next(runs)}"
                dest.mkdir()
                return dest, [(u, str(dest / f"f{i:05d}.bin")) for i, u in enumerate(urls)]

            def rec(mode: str, workers: int, meter: CpuMeter, base: float | None) -> Record:
                return make_record(EXPERIMENT, "download", mode, workers, sz.files, "files",
                                   meter.sample, base, note=note)

            _, jobs = fresh_jobs()
            download_file(jobs[0])  # open the parent's connection outside the timing
            _, jobs = fresh_jobs()
            with CpuMeter(exclude={srv.pid}) as m:
                for job in jobs:
                    download_file(job)
            base = m.sample.wall_s
            out.append(rec("sequential", 1, m, base))
            for w in sz.thread_workers:
                dest, _ = fresh_jobs()
                with CpuMeter(exclude={srv.pid}) as m:
                    report = fetch(urls, dest, threads=w, retries=0)
                if not report.ok:
                    raise RuntimeError(f"demo downloads failed: {report.failures[:1]}")
                out.append(rec("threads", w, m, base))
            for w in sz.process_workers:
                warm_pool(w)
                _, jobs = fresh_jobs()
                with CpuMeter(exclude={srv.pid}, uses_processes=True) as m:
                    parallel_map(download_file, jobs, mode="process", workers=w, chunksize=1,
                                 on_error="raise")
                out.append(rec("processes", w, m, base))
                shutdown_pools()
    return out


def conclude(records: list[Record]) -> str:
    """One sentence, from the numbers, on what the experiment shows."""
    mine = [r for r in records if r["experiment"] == EXPERIMENT]
    parts: list[str] = []
    busy: list[str] = []
    utils: list[float] = []
    speedups: list[float] = []
    for workload, what in (("sleep", "sleeping tasks"), ("download", "downloads")):
        t = best(mine, workload=workload, mode="threads")
        p = best(mine, workload=workload, mode="processes")
        if t is None or p is None:
            continue
        parts.append(f"{what} {t['speedup']:.1f}x faster with {t['workers']} threads and "
                     f"{p['speedup']:.1f}x with {p['workers']} processes")
        busy.append(f"{pct(t['cpu_util'])} / {pct(p['cpu_util'])} for the {what}")
        utils += [r["cpu_util"] for r in (t, p) if r["cpu_util"] is not None]
        speedups += [t["speedup"], p["speedup"]]
    if not parts:
        return "io: no measurements."
    cores = mine[0]["cores"]
    cpu = ("the CPU mostly idle" if utils and max(utils) < 0.5
           else "the CPU not the limit" if utils else "CPU use unknown")
    lesson = f"up to {max(speedups):.0f}x on {cores} cores: " + (
        "waiting needs workers, not cores" if max(speedups) > cores else
        "no more than the core count here, so something besides waiting limited it")
    return (f"I/O-bound: {'; '.join(parts)} than one at a time, with {cpu} (busy with "
            f"threads / processes: {', '.join(busy)}); {lesson} (each request waited "
            f"{DEFAULT_LATENCY_S * 1000:.0f} ms at the local server).")
