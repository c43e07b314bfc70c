"""The I/O-bound vs CPU-bound experiments, measured on the user's own machine.

``fetcher demo [io|cpu|overhead|pipeline|all] [--quick] [--plot FILE.png|FILE.html]``
runs them from the command line; in a notebook::

    import pandas as pd
    from fetcher.demos import run, conclusions
    records = run("cpu", quick=True)       # list of flat dicts, one per measurement
    df = pd.DataFrame(records)
    print(conclusions(records)["cpu"])

Experiments (one module each): ``io`` (sleeping tasks and real downloads from a local
server, sequential vs threads vs processes), ``cpu`` (pure-Python work vs C code that
releases the GIL), ``overhead`` (where a process pool's start-up and pickling are paid
back, through multiprocessing, concurrent.futures, joblib and fetcher), ``pipeline``
(download + thumbnail, stages sequential or overlapped).

Every record has the keys of ``FIELDS``: ``experiment``, ``workload``, ``mode``,
``workers``, ``size`` (with its ``unit``), ``wall_s``, ``speedup`` (sequential wall
time / this wall time, same workload and size), ``cpu_s`` and ``cpu_util`` (CPU time of
this process and its worker processes / (wall time x usable cores), 0..1; None when
it cannot be measured), ``others_util`` (the same fraction for *other* programs
running meanwhile: a busy machine shows up there) and ``cores``; most also carry a
``note``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, FetcherError
from .common import FIELDS, Log, Record, pct, quiet

__all__ = ["FIELDS", "NAMES", "Record", "cli_demo", "conclusions", "render_table", "run",
           "warnings"]

NAMES: tuple[str, ...] = ("io", "cpu", "overhead", "pipeline")
"""The experiments, in the order ``all`` runs them."""

_HEADINGS = {
    "io": "I/O-bound work: sequential vs threads vs processes",
    "cpu": "CPU-bound work: the GIL, pure Python vs C code",
    "overhead": "Process-pool overhead: when does parallel pay off?",
    "pipeline": "Download + thumbnail: overlapping the stages",
}

# (experiment, workload) pairs whose sequential run is pure-Python computation: it
# should get a whole core, and when it does not, other programs were competing.
_CPU_BOUND = {("cpu", "perfect"), ("cpu", "squares"), ("overhead", "spin")}
_BUSY = 0.25  # other programs' share of the cores above which a measurement is suspect


def _module(name: str) -> Any:
    import importlib

    return importlib.import_module(f"{__name__}.{name}")


def _names(name: str) -> list[str]:
    key = name.strip().lower()
    if key == "all":
        return list(NAMES)
    if key not in NAMES:
        raise ConfigError(f"unknown demo {name!r}: choose one of {', '.join(NAMES)} or all")
    return [key]


def run(name: str = "all", *, quick: bool = False, log: Log = quiet) -> list[Record]:
    """Run one experiment (or ``"all"``) and return its records, ready for a DataFrame.

    ``quick`` uses small sizes (``all`` in under a minute on two cores). ``log``
    receives progress lines. Unknown names raise ConfigError before anything runs.
    """
    records: list[Record] = []
    for n in _names(name):
        records += _module(n).run(quick=quick, log=log)
    return records


def conclusions(records: Sequence[Record]) -> dict[str, str]:
    """One sentence per experiment present in ``records``, computed from the numbers."""
    present = [n for n in NAMES if any(r["experiment"] == n for r in records)]
    return {n: _module(n).conclude(list(records)) for n in present}


def warnings(records: Sequence[Record]) -> list[str]:
    """Caveats the numbers themselves reveal (a busy machine, CPU not measurable)."""
    out: list[str] = []
    busy = [r for r in records if (r.get("others_util") or 0.0) > _BUSY and r["wall_s"] >= 0.1]
    if busy:
        worst = max(busy, key=lambda r: r["others_util"])
        out.append(f"other programs kept the CPU busy during {len(busy)} of {len(records)} "
                   f"measurements (worst: {pct(worst['others_util'])} of the cores during "
                   f"{worst['experiment']}/{worst['workload']} {worst['mode']} x"
                   f"{worst['workers']}): those numbers understate this machine, so run "
                   "again when it is idle")
    elif not any(r.get("others_util") is not None for r in records):
        # Other programs' load is unknown: a single-threaded CPU-bound run that got
        # much less than a whole core reveals them too.
        shares = [(r["cpu_s"] / r["wall_s"], r) for r in records
                  if (r["experiment"], r["workload"]) in _CPU_BOUND
                  and r["mode"] == "sequential" and r["cpu_s"] is not None
                  and r["wall_s"] >= 0.1]
        if shares:
            share, r = min(shares, key=lambda x: x[0])
            if share < 0.8:
                out.append(f"the single-threaded {r['experiment']}/{r['workload']} run got "
                           f"only {100 * share:.0f}% of a core: other programs were using the "
                           "CPU, so these numbers understate this machine (run again when it "
                           "is idle)")
    if any(r["cpu_util"] is None and r["wall_s"] >= 0.02 for r in records):
        out.append("CPU use of worker processes is shown as n/a: install psutil to measure it")
    return out


def render_table(records: Sequence[Record]) -> str:
    """A plain-text table: workload, mode, workers, size, wall time, speedup, CPU util
    (ours), and what other programs used meanwhile."""
    head = ("workload", "mode", "workers", "size", "wall (s)", "speedup", "CPU util",
            "others")
    rows = [head]
    for r in records:
        sp, wall = r["speedup"], r["wall_s"]
        speed = "-" if sp is None else f"{sp:.2f}x" if sp >= 0.1 else f"{sp:.2g}x"
        rows.append((str(r["workload"]), str(r["mode"]), str(r["workers"]),
                     f"{r['size']:,} {r['unit']}",
                     f"{wall:.3f}" if wall >= 0.001 else f"{wall:.1e}", speed,
                     pct(r["cpu_util"]), pct(r.get("others_util"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    left = {0, 1}

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()

    lines = [fmt(head), "  ".join("-" * w for w in widths)]
    lines += [fmt(row) for row in rows[1:]]
    return "\n".join(lines)


def cli_demo(name: str, *, quick: bool, plot: Path | None, as_json: bool) -> int:
    """``fetcher demo``: run, print a table and a conclusion per experiment, plot; exit code.

    Progress goes to stderr. With ``as_json`` stdout gets one JSON object instead of
    the tables: ``{"machine", "quick", "records", "conclusions", "warnings",
    "seconds"}``. Bad names and unusable ``--plot`` targets raise ConfigError before
    anything runs. Returns 1 if an experiment failed (the others still run), else 0.
    """
    names = _names(name)
    if plot is not None:
        from .plot import check_target

        check_target(plot)
    from .measure import describe_cpu

    out: Callable[[str], None] = (lambda s: None) if as_json else print

    def log(line: str) -> None:
        print(f"  ... {line}", file=sys.stderr, flush=True)

    machine = describe_cpu()
    started = time.perf_counter()
    records: list[Record] = []
    failed: list[str] = []
    out(f"fetcher demo {'/'.join(names)}{' (quick)' if quick else ''} on this machine: "
        f"{machine['cores']} usable cores"
        + ("" if machine["psutil"] else " (no psutil: worker CPU not measured)"))
    for n in names:
        try:
            recs = run(n, quick=quick, log=log)
        except (FetcherError, OSError, RuntimeError) as exc:
            print(f"demo {n} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed.append(n)
            continue
        records += recs
        out(f"\n== {n}: {_HEADINGS[n]} ==")
        if recs:
            out(render_table(recs))
        out("Conclusion: " + conclusions(recs).get(n, f"{n}: skipped."))
    notes = warnings(records)
    for note in notes:
        out(f"\nNote: {note}.")
    elapsed = time.perf_counter() - started
    if records:
        out("\nCPU util = CPU time of this process and its workers / (wall time x "
            f"{machine['cores']} cores); others = the same for every other program running "
            "meanwhile (high means a busy machine, and slower numbers).")
    if plot is not None and records:
        from .plot import plot as draw

        path = draw(records, plot)
        print(f"chart written to {path}", file=sys.stderr if as_json else sys.stdout)
    if as_json:
        json.dump({"machine": machine, "quick": quick, "records": records,
                   "conclusions": conclusions(records), "warnings": notes,
                   "seconds": round(elapsed, 2)}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        out(f"({len(records)} measurements in {elapsed:.0f} s)")
    return 1 if failed else 0
