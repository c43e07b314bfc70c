"""``fetcher demo cpu``: pure-Python CPU work needs processes; C code that drops the GIL
can use threads.

Three workloads, each run one task at a time (``sequential``), on a thread pool and on
a process pool (``fetcher.parallel_map``) for 1, 2, 4, ... workers up to twice the
usable cores:

``perfect``  find the perfect numbers below N by trial division, in chunks of numbers
             (pure Python: the interpreter holds the GIL the whole time);
``squares``  sum of i*i for i below K, several times (pure Python);
``resize``   Gaussian blur and Lanczos resize of a 2-megapixel image with Pillow
             (NumPy sorting when Pillow is missing): the heavy loop runs in C with the
             GIL released.

Every parallel result is checked against the sequential one. Process pools are
started before the clock starts (start-up is ``fetcher demo overhead``'s subject).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import isqrt
from typing import Any

from ..executors import parallel_map, shutdown_pools, usable_cpu_count
from .common import Log, Record, best, make_record, pct, powers_of_two, quiet
from .io import warm_pool
from .measure import CpuMeter

EXPERIMENT = "cpu"


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work one run of the demo does."""

    perfect_below: int
    perfect_chunks: int
    squares_k: int
    squares_tasks: int
    images: int
    workers: tuple[int, ...]


def sizes(quick: bool, cores: int | None = None) -> Sizes:
    """The sizes for ``--quick`` or a full run; workers go up to twice ``cores``."""
    n = cores or usable_cpu_count()
    if quick:
        return Sizes(perfect_below=60_000, perfect_chunks=16, squares_k=1_000_000,
                     squares_tasks=8, images=8, workers=tuple(sorted({1, n, 2 * n})))
    return Sizes(perfect_below=160_000, perfect_chunks=64, squares_k=1_000_000,
                 squares_tasks=32, images=32, workers=tuple(powers_of_two(2 * n, extra=[n])))


# --------------------------------------------------------------------------- tasks


def perfect_numbers(bounds: tuple[int, int]) -> list[int]:
    """The perfect numbers n with ``lo <= n < hi`` (sum of proper divisors == n)."""
    lo, hi = bounds
    found = []
    for n in range(max(lo, 2), hi):
        total = 1
        for d in range(2, isqrt(n) + 1):
            if n % d == 0:
                total += d
                q = n // d
                if q != d:
                    total += q
        if total == n:
            found.append(n)
    return found


def sum_of_squares(k: int) -> int:
    """sum(i*i for i < k), the pure-Python loop every benchmark post uses."""
    return sum(i * i for i in range(k))


@functools.cache
def _source_image() -> Any:
    from PIL import Image

    return Image.effect_noise((1600, 1200), 64).convert("RGB")


def blur_and_resize(i: int) -> tuple[int, int]:
    """Blur and resize a 1600x1200 image in Pillow (C code, GIL released); its size."""
    from PIL import ImageFilter

    img = _source_image().filter(ImageFilter.GaussianBlur(2 + i % 3))
    small = img.resize((800 - i % 7, 600), resample=3)  # 3 = LANCZOS
    return (small.width, small.height)


@functools.cache
def _source_array() -> Any:
    import numpy as np

    return np.random.default_rng(0).random(2_000_000)


def numpy_sort(i: int) -> float:
    """Sort two million floats with NumPy (C code, GIL released); the i-th smallest."""
    import numpy as np

    return float(np.sort(_source_array())[i])


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def gil_free_workload() -> tuple[str, Callable[[int], Any]] | None:
    """The GIL-releasing workload available here: Pillow, else NumPy, else None."""
    if _has("PIL"):
        return "resize", blur_and_resize
    if _has("numpy"):
        return "numpy-sort", numpy_sort
    return None


def _warm_resize(_: int) -> int:
    if _has("PIL"):
        _source_image()
    elif _has("numpy"):
        _source_array()
    return 0


# --------------------------------------------------------------------------- runs


def run(*, quick: bool = False, log: Log = quiet) -> list[Record]:
    """Run the experiment; one record per (workload, mode, workers)."""
    sz = sizes(quick)
    step = -(-sz.perfect_below // sz.perfect_chunks)
    chunks = [(lo, min(lo + step, sz.perfect_below)) for lo in range(1, sz.perfect_below, step)]
    records: list[Record] = []
    log(f"cpu/perfect: perfect numbers below {sz.perfect_below:,} in {len(chunks)} chunks")
    records += _sweep("perfect", perfect_numbers, chunks, sz.perfect_below, "numbers",
                      sz.workers, note="pure Python")
    log(f"cpu/squares: {sz.squares_tasks} x sum of squares below {sz.squares_k:,}")
    records += _sweep("squares", sum_of_squares, [sz.squares_k] * sz.squares_tasks,
                      sz.squares_tasks, "tasks", sz.workers, note="pure Python")
    gil_free = gil_free_workload()
    if gil_free is None:
        log("cpu: neither Pillow nor NumPy is installed; skipping the GIL-releasing case")
    else:
        name, fn = gil_free
        log(f"cpu/{name}: {sz.images} tasks in C code that releases the GIL")
        _warm_resize(0)
        records += _sweep(name, fn, list(range(sz.images)), sz.images, "tasks", sz.workers,
                          note="C code, GIL released", warm=_warm_resize)
    return records


def _sweep(workload: str, fn: Callable[[Any], Any], items: Sequence[Any], size: int,
           unit: str, workers: Sequence[int], *, note: str,
           warm: Callable[[int], Any] | None = None) -> list[Record]:
    out: list[Record] = []
    with CpuMeter() as m:
        expected = [fn(x) for x in items]
    base = m.sample.wall_s
    out.append(make_record(EXPERIMENT, workload, "sequential", 1, size, unit, m.sample, base,
                           note=note))
    for mode in ("threads", "processes"):
        for w in workers:
            if mode == "processes":
                warm_pool(w)
                if warm is not None:
                    parallel_map(warm, range(w), mode="process", workers=w, chunksize=1)
            with CpuMeter(uses_processes=mode == "processes") as m:
                got = parallel_map(fn, items, mode="thread" if mode == "threads" else "process",
                                   workers=w, chunksize=1, on_error="raise")
            if got != expected:
                raise RuntimeError(f"cpu/{workload}: {mode} x{w} computed a different result")
            out.append(make_record(EXPERIMENT, workload, mode, w, size, unit, m.sample, base,
                                   note=note))
            if mode == "processes":
                shutdown_pools()
    return out


def conclude(records: list[Record]) -> str:
    """One sentence, from the numbers, on what the experiment shows."""
    mine = [r for r in records if r["experiment"] == EXPERIMENT]
    if not mine:
        return "cpu: no measurements."
    cores = mine[0]["cores"]
    parts: list[str] = []
    for workload in ("perfect", "squares"):
        t = best(mine, workload=workload, mode="threads", min_workers=2)
        p = best(mine, workload=workload, mode="processes", min_workers=2)
        if t is None or p is None:
            continue
        parts.append(f"{workload}: processes {p['speedup']:.1f}x with {p['workers']} workers "
                     f"(CPU {pct(p['cpu_util'])} busy), threads {t['speedup']:.1f}x at best "
                     f"(CPU {pct(t['cpu_util'])})")
    text = f"CPU-bound pure Python on {cores} cores: " + "; ".join(parts)
    pure = [r for r in mine if r["workload"] in ("perfect", "squares") and r["workers"] >= 2]
    t_max = max((r["speedup"] for r in pure if r["mode"] == "threads"), default=None)
    p_max = max((r["speedup"] for r in pure if r["mode"] == "processes"), default=None)
    if t_max is not None and p_max is not None:
        if t_max < 1.2 and p_max >= 1.3:
            text += (" -- the GIL lets one thread compute at a time; processes each have "
                     "their own and use the cores")
        elif t_max < 1.2:
            text += (" -- threads gained nothing (the GIL), and processes did not either "
                     "here: other programs held the cores (see the others column)")
        else:
            text += (" -- threads gained on pure Python, which the GIL should prevent: "
                     "other programs' load probably slowed the sequential run")
    for workload in ("resize", "numpy-sort"):
        t = best(mine, workload=workload, mode="threads", min_workers=2)
        p = best(mine, workload=workload, mode="processes", min_workers=2)
        if t is None or p is None:
            continue
        verdict = ("so threads help when the heavy part runs in C"
                   if t["speedup"] >= 1.2 else
                   "so here threads did not help even in C (a busy machine, or a library "
                   "that holds the GIL for this call)")
        text += (f"; {workload} (C code that releases the GIL): threads "
                 f"{t['speedup']:.1f}x with {t['workers']} workers (CPU "
                 f"{pct(t['cpu_util'])} busy), processes {p['speedup']:.1f}x, {verdict}")
    return text + "."
