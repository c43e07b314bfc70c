"""The CLI's progress bar."""

from __future__ import annotations

import io

from fetcher.progress import NullProgress, Progress, TqdmProgress


def test_the_last_bar_shows_every_byte() -> None:
    """Byte counts are redrawn at most every mininterval; closing shows the final one."""
    out = io.StringIO()
    bar = TqdmProgress(file=out, disable=False, mininterval=60.0)
    bar.start(3, unit="file", desc="fetch")
    for _ in range(3):
        bar.update(1, nbytes=1024)
    bar.close()
    last = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert "3/3" in last and "3.0 KiB" in last, last


def test_both_progress_kinds_meet_the_protocol() -> None:
    assert isinstance(NullProgress(), Progress)
    assert isinstance(TqdmProgress(disable=True), Progress)
