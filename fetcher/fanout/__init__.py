"""A long list of small files on every core: one run's transfers shared by forked processes.

On one core the small-file loop (``multiplex.py``) spends ~50 us of interpreter time
per file, so a run of thousands of small files is bound by one CPU while the others
idle. Threads cannot help (the GIL), so a run of ``width`` processes forks
``width - 1`` workers; each process, this one included, runs the same loop with its
own thread pool behind it on its share of the ``--threads`` connections. (A parent
that only planned and dispatched cost more: four busy processes on two cores meant
~900 preemptions and 30% more CPU per run for 6% less wall time, against 14% and 17%
with this one taking its share.)

What must be decided in one place stays in this (the parent) process: reading the list,
naming every item (collision-free names in list order), skips and ``--on-exists``, the
Report, the progress bar and the sink. Planned items go to its own loop when it has a
free connection, and in batches of its share to every worker with that much room free
(at most four times its share queued or running, within the run's window: items queued
behind a slow one cannot move to another process). A worker downloads, verifies and publishes
exactly as a single-process run does and appends each item's manifest line itself, right
after publishing, on the descriptor it inherited (``O_APPEND``, one ``write`` a line, so
lines of several processes never interleave and a crash leaves no published file
unjournaled). It reports back only what the parent counts: sequence numbers of items
that ended ok, and whole Results for failures, or for every item when the sink or
``keep_results`` needs them.

Run-wide state crosses over as messages: Retry-After pauses (met in any process, they
hold the host in all), a stop (full disk, a failed sink) and cancellation. Workers
ignore SIGINT; the parent's Ctrl-C cancels them, and a parent that dies (EOF on the
link) cancels them too. A worker that dies fails its unfinished items with
``DownloadProcessError`` (those it had journaled are taken from the manifest), and
the others, this process included, go on with the rest of the list.

Messages are marshal data (pickles when they hold objects) with a 4-byte length, over
one socketpair per worker. The parent never blocks on a worker (non-blocking sends,
buffered); a worker's sends block only while the parent is busy, which its read
timeouts forgive (``Multiplexer._excuse``).
"""

from __future__ import annotations

import os
import threading

from ..config import FANOUT_MIN_ITEMS, FetchConfig

# This module holds the policy only: runs that stay in one process never import the
# machinery (``_parent``, ``_worker``, ``_link`` and pickle), which the downloader
# imports from ``._parent`` once a run fans out.
__all__ = ["FANOUT_MAX", "fanout_width"]

FANOUT_MAX = 4
"""Most processes chosen automatically: past this the parent's planning (~15 us an item)
limits the run, not the workers (``download_processes`` can ask for more)."""


def fanout_width(cfg: FetchConfig, total: int | None, *, done: int = 0) -> int:
    """How many processes share a run's transfers, this one included (1: it alone).

    ``download_processes`` decides when set. Otherwise: one per available core (up to
    ``FANOUT_MAX``) for lists of at least ``FANOUT_MIN_ITEMS`` of which fewer than all
    are ``done`` (the manifest's complete records: a re-run that will mostly skip is
    bound by planning, which stays here anyway), and only while this process runs no
    other thread (forking a threaded program is safe only for code that takes none of
    their locks, which a library cannot promise for its caller).
    """
    if not hasattr(os, "fork"):
        return 1
    wanted = cfg.download_processes
    if wanted is None:
        if total is None or total < FANOUT_MIN_ITEMS or done >= total \
                or threading.active_count() > 1:
            return 1
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        wanted = min(cores, FANOUT_MAX)
    return max(1, min(wanted, cfg.threads))


