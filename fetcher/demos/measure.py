"""Wall time and CPU time of a block of code, worker processes included.

CPU utilisation is ``cpu_s / (wall_s * cores)``: 100% means every usable core was busy
for the whole run. ``cpu_s`` is the user + system time, over the measured block, of

* this process (``RUSAGE_SELF``: its own threads),
* children it reaped during the block (``RUSAGE_CHILDREN``: ``multiprocessing.Pool``
  and ``concurrent.futures`` workers joined at shutdown), and
* every live descendant, read with psutil at both ends: a worker's own time plus the
  time of the children *it* reaped. That covers pools that stay warm after the block
  (fetcher's ``parallel_map``, joblib/loky) and workers forked by a ``forkserver``,
  which are reaped by the fork server rather than by us.

Without psutil the last part is missing, so blocks that ran worker processes report
``cpu_s`` and ``cpu_util`` as ``None`` instead of a number that looks too low.
Processes passed in ``exclude`` (the demo's HTTP server) are not counted.

``others_s`` is the CPU time the usable CPUs spent on *other* programs during the
block (system-wide busy time, hypervisor steal included, minus ours and the excluded
processes'); a shared or busy machine shows up there, so a slow result can be told
apart from a slow method. It needs psutil and CPUs pinned by affinity (not only a
cgroup quota); otherwise it is ``None``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from ..executors import usable_cpu_count

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

try:
    import psutil  # type: ignore[import-untyped, unused-ignore]
except ImportError:  # pragma: no cover - exercised only without psutil
    psutil = None


def have_psutil() -> bool:
    """True when descendants' CPU time can be read (psutil is installed)."""
    return psutil is not None


def _own_and_reaped() -> tuple[float, float]:
    """CPU seconds of this process, and of the children it has reaped."""
    if resource is not None:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime
    t = os.times()  # pragma: no cover - Windows
    return t.user + t.system, t.children_user + t.children_system  # pragma: no cover


def _descendants(exclude: Collection[int]) -> dict[int, float]:
    """CPU seconds (own + reaped children) of every live descendant, by pid."""
    if psutil is None:
        return {}
    out: dict[int, float] = {}
    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:  # pragma: no cover - /proc unreadable
        return out
    for p in kids:
        if p.pid in exclude:
            continue
        try:
            t = p.cpu_times()
        except psutil.Error:  # exited between listing and reading
            continue
        out[p.pid] = t.user + t.system + t.children_user + t.children_system
    return out


def _system_busy() -> float | None:
    """Busy seconds (steal included) summed over the CPUs this process may use."""
    if psutil is None:
        return None
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return None
    if len(cpus) != usable_cpu_count():
        return None  # a cgroup quota, not pinned CPUs: other tenants are not ours to see
    per_cpu = psutil.cpu_times(percpu=True)
    busy = 0.0
    for i in cpus:
        if i >= len(per_cpu):
            return None
        t = per_cpu[i]
        busy += sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) \
            - getattr(t, "guest_nice", 0.0)  # guest time is already inside user/nice
    return busy


def _cpu_of(pids: Collection[int]) -> float:
    """CPU seconds used so far by ``pids`` (and the children they reaped)."""
    total = 0.0
    if psutil is None:
        return total
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


@dataclass(frozen=True, slots=True)
class Sample:
    """One measured block: wall seconds, CPU seconds (None if unknown), usable cores,
    and CPU seconds other programs used meanwhile (None if unknown)."""

    wall_s: float
    cpu_s: float | None
    cores: int
    others_s: float | None = None

    @property
    def others_util(self) -> float | None:
        """Fraction of the usable cores other programs kept busy (0..1), or None."""
        if self.others_s is None or self.wall_s <= 0:
            return None
        return self.others_s / (self.wall_s * self.cores)

    @property
    def cpu_util(self) -> float | None:
        """Fraction of all usable cores kept busy (0..1), None when CPU is unknown."""
        if self.cpu_s is None or self.wall_s <= 0:
            return None
        return self.cpu_s / (self.wall_s * self.cores)


class CpuMeter:
    """Measure a ``with`` block: ``with CpuMeter() as m: work()`` then ``m.sample``.

    ``uses_processes`` tells the meter that the block ran worker processes, so that
    without psutil it reports unknown CPU rather than only the parent's share.
    """

    def __init__(self, *, exclude: Collection[int] = (), uses_processes: bool = False) -> None:
        self.exclude = frozenset(exclude)
        self.uses_processes = uses_processes
        self._cores = usable_cpu_count()
        self._t0 = 0.0
        self._own0 = self._reaped0 = 0.0
        self._desc0: dict[int, float] = {}
        self._excl0 = 0.0
        self._busy0: float | None = None
        self._sample: Sample | None = None

    def __enter__(self) -> CpuMeter:
        self._busy0 = _system_busy()
        self._excl0 = _cpu_of(self.exclude)
        self._desc0 = _descendants(self.exclude)
        self._own0, self._reaped0 = _own_and_reaped()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        wall = time.perf_counter() - self._t0
        own, reaped = _own_and_reaped()
        desc = _descendants(self.exclude)
        excl = _cpu_of(self.exclude)
        busy = _system_busy()
        cpu: float | None = (own - self._own0) + (reaped - self._reaped0)
        if psutil is not None:
            # A descendant alive at the start and reaped during the block appears in
            # the reaper's total at the end and in our start sum: the difference of
            # the sums counts only what it used inside the block.
            cpu = max(0.0, (own - self._own0) + (reaped - self._reaped0)
                      + sum(desc.values()) - sum(self._desc0.values()))
        elif self.uses_processes:
            cpu = None
        others: float | None = None
        if busy is not None and self._busy0 is not None and cpu is not None:
            others = max(0.0, busy - self._busy0 - cpu - (excl - self._excl0))
        self._sample = Sample(wall_s=wall, cpu_s=cpu, cores=self._cores, others_s=others)

    @property
    def sample(self) -> Sample:
        """The measurement; available after the ``with`` block."""
        if self._sample is None:
            raise RuntimeError("CpuMeter.sample is read after the with block ends")
        return self._sample


def describe_cpu() -> dict[str, Any]:
    """What the measurements ran on: usable cores and whether CPU time is complete."""
    return {"cores": usable_cpu_count(), "logical_cpus": os.cpu_count(),
            "psutil": have_psutil()}
