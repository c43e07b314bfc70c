"""The CLI's progress bar."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time

from fetcher.progress import NullProgress, Progress, TqdmProgress


def test_the_last_bar_shows_every_byte() -> None:
    """Byte counts are redrawn at most every mininterval; closing shows the final one."""
    out = io.StringIO()
    bar = TqdmProgress(file=out, disable=False, mininterval=60.0, delay=0.0)
    bar.start(3, unit="file", desc="fetch")
    for _ in range(3):
        bar.update(1, nbytes=1024)
    bar.close()
    last = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert "3/3" in last and "3.0 KiB" in last, last


def test_both_progress_kinds_meet_the_protocol() -> None:
    assert isinstance(NullProgress(), Progress)
    assert isinstance(TqdmProgress(disable=True), Progress)


def test_a_run_shorter_than_the_delay_draws_no_bar_and_needs_no_tqdm() -> None:
    probe = ("import io, sys\n"
             "from fetcher.progress import TqdmProgress\n"
             "out = io.StringIO()\n"
             "bar = TqdmProgress(file=out, disable=False, delay=5.0)\n"
             "bar.start(2)\n"
             "bar.update(1, nbytes=10)\n"
             "bar.update(1, nbytes=10)\n"
             "bar.close()\n"
             "print(repr(out.getvalue()), 'tqdm' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.split() == ["''", "False"]


def test_a_bar_drawn_late_starts_where_the_run_is() -> None:
    """Items and bytes that ended before the bar was due are on it when it appears,
    without another update (a single large file may not end for minutes)."""
    out = io.StringIO()
    bar = TqdmProgress(file=out, disable=False, mininterval=0.0, delay=0.2)
    bar.start(5, unit="file")
    bar.update(2, nbytes=2048)
    bar.set_total(6)
    deadline = time.monotonic() + 5
    while "2/6" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.02)
    shown = out.getvalue().replace("\r", "\n")
    assert "2/6" in shown and "2.0 KiB" in shown, shown
    bar.update(1, nbytes=1024)
    bar.close()
    last = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert "3/6" in last and "3.0 KiB" in last, last


def test_a_drawn_bar_leaves_no_thread_behind() -> None:
    """Neither the timer nor tqdm's monitor outlives close(): a library caller's next
    run forks its download processes only while it runs no other thread."""
    before = threading.active_count()
    bar = TqdmProgress(file=io.StringIO(), disable=False, delay=0.01)
    bar.start(3)
    deadline = time.monotonic() + 5
    while bar._bar is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bar._bar is not None
    bar.update(3)
    bar.close()
    assert threading.active_count() == before
