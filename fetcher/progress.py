"""Progress reporting. The library only ever talks to a ``Progress``; the CLI picks one.

``NullProgress`` is the library default (silent). ``TqdmProgress`` draws one bar on
stderr. Calls may come from any thread; implementations must be thread-safe.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any, Protocol, runtime_checkable


@runtime_checkable
class Progress(Protocol):
    """Receives progress events from a run."""

    def start(self, total: int | None, *, unit: str = "file", desc: str = "") -> None:
        """A run begins; ``total`` is None when the input has no known length."""

    def set_total(self, total: int) -> None:
        """The total became known (a streamed list reached its end)."""

    def update(self, n: int = 1, *, nbytes: int = 0) -> None:
        """``n`` items finished, carrying ``nbytes`` bytes."""

    def close(self) -> None:
        """The run ended."""


class NullProgress:
    """Discards every event (the library default)."""

    def start(self, total: int | None, *, unit: str = "file", desc: str = "") -> None:
        pass

    def set_total(self, total: int) -> None:
        pass

    def update(self, n: int = 1, *, nbytes: int = 0) -> None:
        pass

    def close(self) -> None:
        pass


class TqdmProgress:
    """One tqdm bar: items done/total, bytes and byte rate in the postfix, ETA.

    Redraws are rate-limited by tqdm (``mininterval``), so updates stay cheap even at
    thousands of items per second. The bar appears once a run has lasted ``delay``
    seconds (see ``start``); the summary line after it is the CLI's.
    """

    def __init__(self, *, file: IO[str] | None = None, disable: bool | None = None,
                 mininterval: float = 0.2, delay: float = 0.2) -> None:
        self._file = file if file is not None else sys.stderr
        if disable is None:
            disable = not _isatty(self._file)
        self._disable = disable
        self._mininterval = mininterval
        self._delay = delay
        self._bar: Any = None
        self._pending: tuple[int | None, str, str] | None = None
        """(total, unit, desc) of a run whose bar is not drawn yet."""
        self._timer: threading.Timer | None = None
        self._count = 0
        self._bytes = 0
        self._started = self._postfix_at = time.monotonic()
        self._lock = threading.Lock()

    def start(self, total: int | None, *, unit: str = "file", desc: str = "") -> None:
        """Begin a run; the bar is drawn once it has lasted ``delay`` seconds.

        Importing tqdm costs ~140 M instructions (it reads its own version through
        importlib.metadata), nearly a whole one-URL run (~155 M): a run that ends sooner never
        imports it, and one that lasts draws its bar from a timer thread, counts so far
        included.
        """
        if self._disable:
            return  # no bar: skip importing tqdm
        with self._lock:
            self._started = time.monotonic()
            self._pending = (total, unit, desc)
            self._count = self._bytes = 0
            if self._delay <= 0:
                self._draw()
                return
            timer = self._timer = threading.Timer(self._delay, self._draw_pending)
        timer.daemon = True
        timer.start()

    def _draw_pending(self) -> None:
        import tqdm  # noqa: F401  (outside the lock: the run's updates go on meanwhile)

        with self._lock:
            if self._pending is not None:
                self._draw()

    def _draw(self) -> None:
        """Open the bar where the run is (holding the lock)."""
        assert self._pending is not None
        total, unit, desc = self._pending
        self._pending = None
        # miniters=1: each update checks the clock, so the bar never waits for a count
        # that tqdm's monitor thread would otherwise have to correct (our bars run none).
        bar = self._bar = _bar_class()(total=total, unit=unit, desc=desc or None,
                                       file=self._file, mininterval=self._mininterval,
                                       miniters=1, dynamic_ncols=True, leave=True)
        # Its clock starts with the run, not with the bar, for elapsed time and rate.
        late = time.monotonic() - self._started
        bar.start_t -= late
        bar.last_print_t -= late
        if self._bytes:
            self._set_postfix(time.monotonic())
        if self._count:
            bar.update(self._count)
        bar.refresh()  # now, whatever mininterval says: the run so far, at once

    def set_total(self, total: int) -> None:
        with self._lock:
            if self._pending is not None:
                self._pending = (total, *self._pending[1:])
            elif self._bar is not None:
                self._bar.total = total
                self._bar.refresh()

    def update(self, n: int = 1, *, nbytes: int = 0) -> None:
        with self._lock:
            if self._bar is None:
                if self._pending is not None:
                    self._count += n
                    self._bytes += nbytes
                return
            self._bytes += nbytes
            now = time.monotonic()
            # The byte postfix is rebuilt at most as often as tqdm redraws: format_dict
            # alone costs more than the rest of a small file's bookkeeping.
            if nbytes and now - self._postfix_at >= self._mininterval:
                self._postfix_at = now
                self._set_postfix(now)
            self._bar.update(n)

    def _set_postfix(self, now: float) -> None:
        elapsed = now - self._started
        speed = self._bytes / elapsed if elapsed > 0 else 0.0
        self._bar.set_postfix_str(f"{human_bytes(self._bytes)} {human_bytes(speed)}/s",
                                  refresh=False)

    def close(self) -> None:
        with self._lock:
            self._pending = None  # a run that ended before its bar was due shows none
            timer, self._timer = self._timer, None
            if self._bar is not None:
                self._set_postfix(time.monotonic())  # the last bytes, not 0.2 s old ones
                self._bar.close()
                self._bar = None
        # Joined outside the lock, which the timer takes: gone before close returns, as a
        # library caller's next run forks only while it runs no other thread.
        if timer is not None:
            timer.cancel()
            if timer is not threading.current_thread():
                timer.join(5.0)


_BAR_CLASS: Any = None


def _bar_class() -> Any:
    """tqdm without its monitor thread, which outlives every bar: a thread left running
    keeps a library caller's later runs from forking their download processes."""
    global _BAR_CLASS
    if _BAR_CLASS is None:
        from tqdm import tqdm

        _BAR_CLASS = type("_Bar", (tqdm,), {"monitor_interval": 0})
    return _BAR_CLASS


def _isatty(f: IO[str]) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):
        return False


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
