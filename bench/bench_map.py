"""parallel_map overhead against the usual process-pool maps, and its memory bound.

Run from the repository root::

    python bench/bench_map.py            # 1,000,000 items, 5 rounds
    python bench/bench_map.py --quick    # 200,000 items, 3 rounds

Every contender maps the same trivial top-level function (``x + 1``) on all usable
CPUs, in one run, and the table shows medians and ratios:

* ``fetcher.parallel_map`` in process mode over a *generator* (consumed lazily),
  with a Progress object counting items, chunksize "auto". Its pool is warm (the
  first, untimed round starts it; that cold time is reported separately).
* ``multiprocessing.Pool.map`` with default chunking and the input list materialised
  up front (``list(range(N))`` is inside the timing). Pool creation is *outside* the
  timing, so the ratio is the strict one; the time including pool creation is shown
  too.
* ``tqdm.contrib.concurrent.process_map`` with its defaults (chunksize 1). It costs
  tens of microseconds per item, so it runs on ``--tqdm-items`` (20,000) items and its
  time for N items is extrapolated from the measured per-item cost (said so in the
  table).
* ``joblib.Parallel(n_jobs=-1)`` with ``delayed`` calls and ``mpire.WorkerPool.map``
  with their defaults, when installed (joblib on ``--joblib-items``, extrapolated).

First, in a fresh subprocess (started before this process grows, because a child
inherits its parent's ``ru_maxrss`` across fork+exec), the growth of the parent's peak
RSS while ``parallel_imap`` maps a 10,000,000-item generator whose results are
consumed and dropped (``parallel_map`` would have to hold ten million results in its
list, which is the caller's memory, not the pool's). Reported as ``ru_maxrss`` growth
and as ``VmHWM`` growth (reset just before the run); the larger one is checked.

Exit status 1 when a target is missed: parallel_map <= 2x Pool.map, >= 100x faster
than process_map, RSS growth < 100 MiB. JSON goes to ``bench/results/map.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import common

from fetcher.executors import parallel_imap, parallel_map, shutdown_pools, usable_cpu_count


def trivial(x: int) -> int:
    return x + 1


class CountingProgress:
    """A Progress that counts items (what a progress bar needs, minus the drawing)."""

    def __init__(self) -> None:
        self.n = 0
        self.total: int | None = None

    def start(self, total: int | None, *, unit: str = "file", desc: str = "") -> None:
        self.total = total

    def set_total(self, total: int) -> None:
        self.total = total

    def update(self, n: int = 1, *, nbytes: int = 0) -> None:
        self.n += n

    def close(self) -> None:
        pass


def run_fetcher(n: int) -> float:
    progress = CountingProgress()
    t0 = time.perf_counter()
    out = parallel_map(trivial, (i for i in range(n)), mode="process", progress=progress)
    elapsed = time.perf_counter() - t0
    assert len(out) == n and out[-1] == n and progress.n == n, "wrong result"
    return elapsed


def run_pool(n: int, pool: Any) -> float:
    t0 = time.perf_counter()
    out = pool.map(trivial, list(range(n)))
    elapsed = time.perf_counter() - t0
    assert len(out) == n and out[-1] == n
    return elapsed


def run_pool_with_creation(n: int) -> float:
    t0 = time.perf_counter()
    with multiprocessing.Pool() as pool:
        out = pool.map(trivial, list(range(n)))
    elapsed = time.perf_counter() - t0
    assert len(out) == n
    return elapsed


def run_process_map(n: int) -> float:
    from tqdm.contrib.concurrent import process_map

    with open(os.devnull, "w") as sink:
        t0 = time.perf_counter()
        out = process_map(trivial, range(n), file=sink)
        elapsed = time.perf_counter() - t0
    assert len(out) == n
    return elapsed


def run_joblib(n: int) -> float:
    from joblib import Parallel, delayed

    t0 = time.perf_counter()
    out = Parallel(n_jobs=-1)(delayed(trivial)(i) for i in range(n))
    elapsed = time.perf_counter() - t0
    assert len(out) == n
    return elapsed


def run_mpire(n: int) -> float:
    from mpire import WorkerPool

    t0 = time.perf_counter()
    with WorkerPool(n_jobs=usable_cpu_count()) as pool:
        out = pool.map(trivial, range(n), progress_bar=False)
    elapsed = time.perf_counter() - t0
    assert len(out) == n
    return elapsed


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def memory_child(n: int) -> None:
    """Runs in a fresh interpreter: print peak-RSS growth while mapping n items.

    Two measures: ``ru_maxrss`` (the process's peak, as getrusage reports it) and the
    memory map's own high-water mark ``VmHWM``, reset to the current RSS just before
    the run (``/proc/self/clear_refs``), which is immune to anything that happened
    before this interpreter started.
    """
    progress = CountingProgress()
    # warm the pool and the code paths first, so the baseline includes them
    for _ in parallel_imap(trivial, (i for i in range(1000)), mode="process"):
        pass
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_reset = False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        hwm_reset = True
    except OSError:
        pass
    hwm_base = _status_kib("VmRSS") if hwm_reset else _status_kib("VmHWM")
    t0 = time.perf_counter()
    count = 0
    for _ in parallel_imap(trivial, (i for i in range(n)), mode="process", progress=progress):
        count += 1
    elapsed = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm = _status_kib("VmHWM")
    assert count == n and progress.n == n
    print(json.dumps({"items": n, "baseline_mib": base_kib / 1024, "peak_mib": peak_kib / 1024,
                      "growth_mib": (peak_kib - base_kib) / 1024,
                      "hwm_growth_mib": (hwm - hwm_base) / 1024, "hwm_reset": hwm_reset,
                      "elapsed_s": elapsed}))


def timed_rounds(fn: Callable[[], float], rounds: int) -> list[float]:
    return [fn() for _ in range(rounds)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="200,000 items, 3 rounds")
    ap.add_argument("--items", type=int, default=None, help="items per map (default 1,000,000)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5)")
    ap.add_argument("--tqdm-items", type=int, default=20_000)
    ap.add_argument("--joblib-items", type=int, default=200_000)
    ap.add_argument("--memory-items", type=int, default=10_000_000)
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return 0
    n = args.items or (200_000 if args.quick else 1_000_000)
    rounds = args.rounds or (3 if args.quick else 5)
    tqdm_n = min(args.tqdm_items, n)
    joblib_n = min(args.joblib_items, n)
    workers = usable_cpu_count()
    common.log(f"{n:,} items, {rounds} rounds, {workers} workers, start method "
               f"{multiprocessing.get_context().get_start_method()} (Pool) / fetcher's own")

    # first, while this process is still small: a child inherits its parent's peak
    # RSS across fork+exec, which would mask the growth being measured
    common.log(f"memory: parallel_imap over a {args.memory_items:,}-item generator")
    child = subprocess.run([sys.executable, __file__, "--memory-child", str(args.memory_items)],
                           capture_output=True, text=True, cwd=common.REPO_ROOT, timeout=900)
    if child.returncode != 0:
        print(child.stderr, file=sys.stderr)
        return 1
    mem = json.loads(child.stdout.strip().splitlines()[-1])

    t0 = time.perf_counter()
    run_fetcher(1000)
    cold_s = time.perf_counter() - t0
    run_fetcher(n)  # untimed warm-up of the code paths at full size

    results: dict[str, list[float]] = {"fetcher": [], "pool": []}
    with multiprocessing.Pool() as pool:
        run_pool(1000, pool)
        for r in range(rounds):  # alternate the order between rounds
            order = [("fetcher", lambda: run_fetcher(n)), ("pool", lambda: run_pool(n, pool))]
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                results[name].append(fn())
    common.log("Pool.map including pool creation")
    results["pool+create"] = timed_rounds(lambda: run_pool_with_creation(n), rounds)
    common.log(f"process_map on {tqdm_n:,} items")
    results["process_map"] = timed_rounds(lambda: run_process_map(tqdm_n), 2)
    if installed("joblib"):
        common.log(f"joblib on {joblib_n:,} items")
        results["joblib"] = timed_rounds(lambda: run_joblib(joblib_n), 2)
    if installed("mpire"):
        common.log("mpire")
        results["mpire"] = timed_rounds(lambda: run_mpire(n), rounds)
    shutdown_pools()

    measured_n = {"process_map": tqdm_n, "joblib": joblib_n}
    med = {k: statistics.median(v) for k, v in results.items()}
    per_item = {k: med[k] / measured_n.get(k, n) for k in med}  # seconds per item
    est = {k: per_item[k] * n for k in med}  # time for n items
    fetcher_s = est["fetcher"]
    labels = {
        "fetcher": "fetcher parallel_map (generator, progress, warm pool)",
        "pool": "multiprocessing.Pool.map (list, warm pool)",
        "pool+create": "multiprocessing.Pool.map (list, incl. pool creation)",
        "process_map": f"tqdm process_map defaults (measured on {tqdm_n:,}, extrapolated)",
        "joblib": f"joblib Parallel(n_jobs=-1) (measured on {joblib_n:,}, extrapolated)",
        "mpire": "mpire WorkerPool.map defaults (incl. pool creation)",
    }
    print(f"\n== parallel_map: {n:,} trivial items, {workers} workers, median of {rounds} "
          f"rounds (process_map/joblib: 2)")
    rows = []
    for key in ("fetcher", "pool", "pool+create", "process_map", "joblib", "mpire"):
        if key not in med:
            continue
        rows.append([labels[key], f"{est[key]:.3f}", f"{per_item[key] * 1e6:.3f}",
                     f"{est[key] / fetcher_s:.2f}x"])
    widths = [max(len(r[i]) for r in [["contender", "s for N", "us/item", "vs fetcher"], *rows])
              for i in range(4)]
    for r in [["contender", "s for N", "us/item", "vs fetcher"], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print(f"fetcher cold start (forkserver + {workers} workers, 1,000 items): {cold_s:.3f} s")

    ratio_pool = fetcher_s / est["pool"]
    ratio_pm = est["process_map"] / fetcher_s
    growth = max(mem["growth_mib"], mem["hwm_growth_mib"])
    checks = [
        (f"fetcher / Pool.map = {ratio_pool:.2f} (target <= 2.0)", ratio_pool <= 2.0),
        (f"process_map / fetcher = {ratio_pm:.0f}x (target >= 100x)", ratio_pm >= 100),
        (f"peak RSS growth mapping {mem['items']:,} items = {growth:.1f} MiB (ru_maxrss "
         f"{mem['growth_mib']:.1f}, VmHWM {mem['hwm_growth_mib']:.1f}; baseline "
         f"{mem['baseline_mib']:.1f} MiB; {mem['elapsed_s']:.2f} s; target < 100 MiB)",
         growth < 100),
    ]
    print()
    for text, ok in checks:
        print(f"[{'ok' if ok else 'MISSED'}] {text}")

    tools = [{"tool": labels[k], "status": "ok", "median_wall_s": est[k],
              "fetcher_speedup": est[k] / fetcher_s, "measured_items": measured_n.get(k, n),
              "rounds_s": results[k], "us_per_item": per_item[k] * 1e6} for k in med]
    common.write_json(common.RESULTS_DIR / "map.json", {
        "machine": common.machine_info(), "items": n, "workers": workers, "tools": tools,
        "cold_start_s": cold_s, "memory": mem,
        "checks": [{"check": t, "ok": ok} for t, ok in checks],
    })
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
