"""The ``Progress`` protocol (``fetcher.progress.Progress``), on its own because it needs
typing at run time and runs never do."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["Progress"]


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


Progress.__module__ = "fetcher.progress"  # where users import it from
