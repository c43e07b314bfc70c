"""What every experiment shares: the record shape, worker counts, a progress hook."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .measure import Sample

Record = dict[str, Any]
"""One measurement, a flat dict with the keys in ``FIELDS`` (plus ``note`` at times)."""

Log = Callable[[str], None]
"""Receives one line of progress text (the CLI prints it to stderr)."""

FIELDS: tuple[str, ...] = (
    "experiment", "workload", "mode", "workers", "size", "unit", "wall_s", "speedup",
    "cpu_s", "cpu_util", "others_util", "cores",
)
"""Keys every record has, in table order."""


def quiet(_line: str) -> None:
    """The default log: drop progress lines (the library never prints)."""


MIN_WALL_FOR_CPU_S = 0.02
"""Below this wall time, CPU clocks (10 ms ticks for child processes) cannot give a
meaningful utilisation, so ``cpu_util`` is None."""


def make_record(experiment: str, workload: str, mode: str, workers: int, size: int,
                unit: str, sample: Sample, baseline_s: float | None,
                note: str = "") -> Record:
    """Build a record; ``speedup`` is ``baseline_s / wall_s`` (None without a baseline)."""
    short = sample.wall_s < MIN_WALL_FOR_CPU_S
    util = None if short else sample.cpu_util
    others = None if short else sample.others_util
    rec: Record = {
        "experiment": experiment,
        "workload": workload,
        "mode": mode,
        "workers": workers,
        "size": size,
        "unit": unit,
        "wall_s": _sig(sample.wall_s),
        "speedup": (_sig(baseline_s / sample.wall_s)
                    if baseline_s is not None and sample.wall_s > 0 else None),
        "cpu_s": _sig(sample.cpu_s) if sample.cpu_s is not None else None,
        "cpu_util": round(util, 4) if util is not None else None,
        "others_util": round(others, 4) if others is not None else None,
        "cores": sample.cores,
    }
    if note:
        rec["note"] = note
    return rec


def _sig(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant digits (tiny times stay nonzero)."""
    return float(f"{x:.{digits}g}")


def powers_of_two(limit: int, *, extra: Iterable[int] = ()) -> list[int]:
    """1, 2, 4, ... up to ``limit``, plus ``extra`` values, sorted and unique."""
    out = {1, *extra}
    n = 2
    while n <= limit:
        out.add(n)
        n *= 2
    return sorted(x for x in out if x >= 1)


def best(records: Sequence[Record], *, min_workers: int = 1, **match: Any) -> Record | None:
    """The record with the highest speedup among those whose fields equal ``match``
    and that ran on at least ``min_workers`` workers."""
    hits = [r for r in records if all(r.get(k) == v for k, v in match.items())
            and r.get("speedup") is not None and r["workers"] >= min_workers]
    return max(hits, key=lambda r: r["speedup"]) if hits else None


def pct(util: float | None) -> str:
    """A CPU utilisation as text: ``"37%"``, or ``"n/a"`` when unknown."""
    return "n/a" if util is None else f"{100 * util:.0f}%"
