"""``fetcher demo overhead``: when does a process pool pay for itself?

A process pool costs something before it computes anything: starting the workers,
pickling every argument and result through a pipe, and one round trip per call (per
chunk, when calls are batched). Two sweeps, run sequentially and on a pool of one
worker per core, through the libraries people already use:

``square``  square every number of a list of 10, 100, ... numbers: the work per item
            is tiny, so the pool never wins; sending an item costs more than squaring it;
``spin``    tasks that each keep a core busy for a fixed 10 ms: the pool wins once there
            are enough of them to repay its start-up -- the crossover point.

Backends (``mode``): ``fetcher`` (``parallel_map``, automatic chunks), ``fetcher c=1``
(one item per round trip), ``mp.Pool`` (``multiprocessing.Pool.map``, its default
chunks), ``mp.Pool c=1``, ``futures c=1`` (``ProcessPoolExecutor.map``; 1 is its
default chunksize), ``futures chunked`` (chunksize n / (4 x workers), the Pool.map
rule), ``joblib`` (``Parallel(n_jobs)(delayed(f)(x) for x in items)``, when installed)
and ``fetcher warm`` (``parallel_map`` with its pool already running, as from the
second call on).

Every other run starts its pool inside the measurement, as a script that maps once
does: ``with Pool() as p: p.map(...)``. joblib and fetcher keep workers warm between
calls, so the demo stops them between measurements. The standard-library pools use
the platform's default start method; fetcher uses ``forkserver`` (see
``fetcher.executors``). One-item-per-call runs stop at 10^4 items (10^5 for full runs):
beyond that they only take longer.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..executors import parallel_map, shutdown_pools, start_method, usable_cpu_count
from .common import Log, Record, make_record, quiet
from .io import warm_pool
from .measure import CpuMeter

EXPERIMENT = "overhead"

MODES: tuple[str, ...] = ("fetcher", "fetcher c=1", "fetcher warm", "mp.Pool", "mp.Pool c=1",
                          "futures c=1", "futures chunked", "joblib")
"""Every pooled mode, in legend order (``sequential`` is the baseline)."""

_PER_CALL = frozenset({"fetcher c=1", "mp.Pool c=1", "futures c=1"})


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work one run of the demo does."""

    square_sizes: tuple[int, ...]
    spin_sizes: tuple[int, ...]
    spin_ms: float
    per_call_max: int
    joblib_max: int


def sizes(quick: bool) -> Sizes:
    """The sizes for ``--quick`` or a full run."""
    if quick:
        return Sizes(square_sizes=(100, 10_000, 1_000_000), spin_sizes=(2, 8, 32),
                     spin_ms=10.0, per_call_max=10_000, joblib_max=10_000)
    return Sizes(square_sizes=tuple(10 ** k for k in range(1, 8)),
                 spin_sizes=(1, 4, 16, 64, 256), spin_ms=10.0, per_call_max=100_000,
                 joblib_max=1_000_000)


def square(x: int) -> int:
    """The classic tiny task."""
    return x * x


def spin(ms: float) -> float:
    """Keep one core busy for ``ms`` milliseconds (a CPU-bound task of fixed length)."""
    end = time.perf_counter() + ms / 1000
    n = 0
    while time.perf_counter() < end:
        n += 1
    return ms


def have_joblib() -> bool:
    """True when joblib is installed."""
    try:
        import joblib  # noqa: F401
    except ImportError:
        return False
    return True


def _stop_joblib_workers() -> None:
    """Stop the loky workers joblib keeps warm, so the next call starts cold."""
    try:
        from joblib.externals.loky import reusable_executor
    except ImportError:  # pragma: no cover - joblib missing or reorganised
        return
    ex = getattr(reusable_executor, "_executor", None)
    if ex is not None:
        ex.shutdown(wait=True)


def _map(mode: str, fn: Callable[[Any], Any], items: list[Any], workers: int) -> list[Any]:
    """Run ``fn`` over ``items`` with one backend; the pool starts and stops inside."""
    n = len(items)
    if mode in ("fetcher", "fetcher warm"):
        return parallel_map(fn, items, mode="process", workers=workers, on_error="raise")
    if mode == "fetcher c=1":
        return parallel_map(fn, items, mode="process", workers=workers, chunksize=1,
                            on_error="raise")
    if mode in ("mp.Pool", "mp.Pool c=1"):
        with mp.Pool(workers) as pool:
            return pool.map(fn, items, chunksize=1 if mode == "mp.Pool c=1" else None)
    if mode in ("futures c=1", "futures chunked"):
        chunk = 1 if mode == "futures c=1" else max(1, -(-n // (4 * workers)))
        with ProcessPoolExecutor(workers) as ex:
            return list(ex.map(fn, items, chunksize=chunk))
    if mode == "joblib":
        from joblib import Parallel, delayed

        return list(Parallel(n_jobs=workers)(delayed(fn)(x) for x in items))
    raise ValueError(f"unknown mode {mode!r}")


def run(*, quick: bool = False, log: Log = quiet) -> list[Record]:
    """Run both sweeps; one record per (workload, mode, size)."""
    sz = sizes(quick)
    workers = usable_cpu_count()
    modes = [m for m in MODES if m != "joblib" or have_joblib()]
    records: list[Record] = []
    warm_pool(1)  # start fetcher's fork server once, outside every measurement
    shutdown_pools()
    log(f"overhead/square: lists of {sz.square_sizes[0]:,} to {sz.square_sizes[-1]:,} numbers, "
        f"sequential vs {workers} processes ({len(modes)} ways)")
    for n in sz.square_sizes:
        records += _point("square", square, list(range(n)), n, "numbers", modes, workers, sz,
                          note="x*x")
    log(f"overhead/spin: {sz.spin_sizes[0]} to {sz.spin_sizes[-1]} tasks of {sz.spin_ms:g} ms")
    for n in sz.spin_sizes:
        records += _point("spin", spin, [sz.spin_ms] * n, n, "tasks", modes, workers, sz,
                          note=f"{sz.spin_ms:g} ms of CPU each")
    shutdown_pools()
    return records


def _point(workload: str, fn: Callable[[Any], Any], items: list[Any], size: int, unit: str,
           modes: Sequence[str], workers: int, sz: Sizes, *, note: str) -> list[Record]:
    out: list[Record] = []
    with CpuMeter() as m:
        expected = list(map(fn, items))
    base = m.sample.wall_s
    # Compare results by length and sum: holding a second 10^7-item list per backend
    # would add hundreds of MB to the peak memory of the demo.
    expect = (len(expected), sum(expected))
    del expected
    out.append(make_record(EXPERIMENT, workload, "sequential", 1, size, unit, m.sample, base,
                           note=note))
    for mode in modes:
        if mode in _PER_CALL and size > sz.per_call_max:
            continue
        if mode == "joblib" and size > sz.joblib_max:
            continue
        if mode == "fetcher warm":
            warm_pool(workers)
        else:
            shutdown_pools()
        with CpuMeter(uses_processes=True) as m:
            got = _map(mode, fn, items, workers)
        if mode == "joblib":
            _stop_joblib_workers()
        result = (len(got), sum(got))
        del got
        if result != expect:
            raise RuntimeError(f"overhead/{workload}: {mode} computed a different result")
        start = start_method() if mode.startswith("fetcher") else (
            "loky" if mode == "joblib" else mp.get_start_method())
        out.append(make_record(EXPERIMENT, workload, mode, workers, size, unit, m.sample, base,
                               note=f"{note}; start method {start}"))
    return out


def crossover(records: Sequence[Record], workload: str, mode: str) -> int | None:
    """The smallest size from which ``mode`` beat sequential at every larger size measured.

    None when it never did (or did not at the largest size)."""
    runs = sorted((r for r in records if r["experiment"] == EXPERIMENT
                   and r["workload"] == workload and r["mode"] == mode
                   and r["speedup"] is not None), key=lambda r: r["size"])
    point: int | None = None
    for r in reversed(runs):
        if r["speedup"] > 1.0:
            point = r["size"]
        else:
            break
    return point


def conclude(records: list[Record]) -> str:
    """One sentence, from the numbers, on where the pools pay off."""
    mine = [r for r in records if r["experiment"] == EXPERIMENT]
    if not mine:
        return "overhead: no measurements."
    modes = [m for m in MODES if any(r["mode"] == m for r in mine)]
    parts: list[str] = []
    spin_seq = [r for r in mine if r["workload"] == "spin" and r["mode"] == "sequential"]
    if spin_seq:
        ms = 1000 * sum(r["wall_s"] for r in spin_seq) / sum(r["size"] for r in spin_seq)
        largest = max(r["size"] for r in spin_seq)
        won = sorted((c, m) for m in modes
                     if (c := crossover(mine, "spin", m)) is not None)
        never = [m for m in modes if crossover(mine, "spin", m) is None]
        if won:
            text = (f"{ms:.0f} ms tasks repaid the pool from "
                    + ", ".join(f"{c:,} tasks ({m})" for c, m in won))
            if never:
                text += f", not by {largest:,} tasks for {', '.join(never)}"
        else:
            text = f"{ms:.0f} ms tasks never repaid the pool up to {largest:,} tasks"
        top = max((r for r in mine if r["workload"] == "spin" and r["size"] == largest
                   and r["mode"] != "sequential"), key=lambda r: r["speedup"] or 0.0,
                  default=None)
        if top is not None:
            text += f" (at {largest:,}: {top['mode']} {top['speedup']:.1f}x)"
        parts.append(text)
    sq = [r for r in mine if r["workload"] == "square"]
    if sq:
        largest = max(r["size"] for r in sq)
        winners = [m for m in modes if crossover(mine, "square", m) is not None]
        at_max = [r for r in sq if r["size"] == largest and r["mode"] != "sequential"]
        fastest = max(at_max, key=lambda r: r["speedup"] or 0.0, default=None)
        if winners:
            parts.append(f"squaring numbers paid off only for {', '.join(winners)} at the "
                         "largest sizes")
        elif fastest is not None:
            parts.append(f"squaring lists of up to {largest:,} numbers never did (best at "
                         f"{largest:,}: {fastest['mode']} {fastest['speedup']:.2f}x), as "
                         "sending a number to a worker costs more than squaring it")
        per_call = [r for r in sq if r["mode"] == "mp.Pool c=1"]
        chunked = {r["size"]: r for r in sq if r["mode"] == "mp.Pool"}
        if per_call:
            r1 = max(per_call, key=lambda r: r["size"])
            rc = chunked.get(r1["size"])
            if rc is not None:
                parts.append(f"one round trip per item (chunksize=1) took {r1['wall_s']:.2f} s "
                             f"for {r1['size']:,} numbers against {rc['wall_s']:.2f} s "
                             "chunked")
    return f"Overhead on {mine[0]['cores']} cores: " + "; ".join(parts) + "."
