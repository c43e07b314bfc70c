"""Perfect numbers: a loop, one process per number, and a pool -- and why the middle
one is the wrong tool.

A number is perfect when it equals the sum of its proper divisors (6 = 1 + 2 + 3).
Checking n by trial division is pure-Python CPU work, so processes can speed it up.
Three ways to check every number below ``--limit``:

``loop``                 one after another in this process;
``process per number``   ``multiprocessing.Process(target=check, args=(n, queue))`` for
                         each number, run ``cores`` at a time (all at once would start
                         thousands of processes): every number pays for a process
                         start, an interpreter, a queue message and a join. So that the
                         script ends in seconds, this runs on an evenly spaced sample
                         of ``--per-process`` numbers and the total is scaled up from
                         it (the output says so);
``pool``                 ``fetcher.parallel_map(is_perfect, numbers)``: one worker per
                         core, started once, numbers sent in automatically sized chunks.

All three must find the same numbers. The script prints the times and how much each
process start cost per number.

    python examples/perfect_numbers.py [--limit 20000] [--per-process 600] [--workers N]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from typing import Any

from fetcher import parallel_map


def is_perfect(n: int) -> bool:
    """True when n is the sum of its proper divisors (naive trial division, O(n))."""
    return n > 1 and sum(d for d in range(1, n // 2 + 1) if n % d == 0) == n


def _check_into(n: int, queue: Any) -> None:
    queue.put((n, is_perfect(n)))


def process_per_number(numbers: list[int], at_once: int) -> list[int]:
    """One ``multiprocessing.Process`` per number, ``at_once`` alive at a time."""
    queue: Any = mp.Queue()
    found: list[int] = []
    for start in range(0, len(numbers), at_once):
        wave = [mp.Process(target=_check_into, args=(n, queue))
                for n in numbers[start:start + at_once]]
        for p in wave:
            p.start()
        for _ in wave:  # drain before join: a child exits only once its message is sent
            n, ok = queue.get()
            if ok:
                found.append(n)
        for p in wave:
            p.join()
    return sorted(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=20_000, help="check 1 .. limit-1")
    parser.add_argument("--per-process", type=int, default=600,
                        help="numbers in the one-process-per-number sample")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: cores)")
    args = parser.parse_args()
    workers = args.workers or len(os.sched_getaffinity(0))
    numbers = list(range(1, args.limit))

    t0 = time.perf_counter()
    loop = [n for n in numbers if is_perfect(n)]
    t_loop = time.perf_counter() - t0

    step = max(1, len(numbers) // max(1, args.per_process))
    sample = numbers[::step]
    t0 = time.perf_counter()
    per_process = process_per_number(sample, workers)
    t_sample = time.perf_counter() - t0
    t_proc = t_sample * len(numbers) / len(sample)  # scaled up to every number
    t_loop_sample = t_loop * sum(sample) / sum(numbers)  # the loop's share of that work

    t0 = time.perf_counter()
    flags = parallel_map(is_perfect, numbers, workers=workers, on_error="raise")
    pool = [n for n, ok in zip(numbers, flags, strict=True) if ok]
    t_pool = time.perf_counter() - t0

    print(f"perfect numbers below {args.limit:,}: {loop}  ({workers} processes)")
    print(f"  {'loop':<20} {t_loop:7.2f} s")
    overhead_ms = 1000 * (t_sample - t_loop_sample / workers) / len(sample)
    print(f"  {'process per number':<20} {t_proc:7.2f} s  (estimated: {t_sample:.2f} s for "
          f"{len(sample):,} of the {len(numbers):,} numbers, scaled up; "
          f"~{overhead_ms:.1f} ms of overhead per number, {t_proc / t_loop:.1f}x the loop)")
    print(f"  {'pool (parallel_map)':<20} {t_pool:7.2f} s  ({t_loop / t_pool:.2f}x the loop)")
    if loop != pool or per_process != [n for n in loop if n in set(sample)]:
        print(f"MISMATCH: loop {loop}, process per number {per_process}, pool {pool}",
              file=sys.stderr)
        return 1
    print("same answer three ways. A process costs milliseconds to start; a number costs "
          "microseconds to check: start a few workers once and feed them many items.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
