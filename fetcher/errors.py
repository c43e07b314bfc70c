"""The exception tree of fetcher.

::

    FetcherError                      base of everything fetcher raises
    ├── ConfigError                   bad options; raised before any work starts
    │   └── UrlListError              a bad URL list line (.source, .line)
    ├── ItemError                     one item failed; collected into Report (.url)
    │   ├── HTTPStatusError           4xx/5xx answer (.status, .retry_after)
    │   ├── TransportError            connect/read failure, timeout, reset
    │   │   ├── TruncatedError        body shorter than Content-Length
    │   │   └── RedirectError         loop, too many hops, non-http target
    │   ├── ChecksumError             sha256 mismatch (.expected, .actual)
    │   ├── ContentTypeError          body type not what --expect-type asked
    │   ├── UnsafePathError           a name that would escape DIR (.path)
    │   ├── StorageError              the disk refused (full, read-only)
    │   ├── TargetExistsError         a foreign file is at the target (--on-exists error)
    │   ├── ProcessingError           a --post transform failed (.transform)
    │   ├── CancelledError            the run was interrupted before the item ended
    │   └── DownloadProcessError      the download process running the item died
    ├── BatchFailedError              Report.raise_for_failures() (.failures)
    ├── TaskError                     parallel_map item failed (.item, .original, .traceback_text)
    │   └── WorkerLostError           the worker process died (SIGKILL, OOM)
    └── SinkError                     a writer could not commit (.sink, .batch)

Every error pickles (they cross process boundaries in parallel_map and Dask):
``__reduce__`` rebuilds the instance from its message and attribute dict, so
subclasses may take keyword-only arguments freely.
"""

from __future__ import annotations

from typing import Any


def _rebuild(cls: type[FetcherError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    obj = cls.__new__(cls)
    Exception.__init__(obj, *args)
    obj.__dict__.update(state)
    return obj


class FetcherError(Exception):
    """Base class of every error fetcher raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class ConfigError(FetcherError):
    """Invalid options or configuration; raised before any download starts."""


class UrlListError(ConfigError):
    """A URL list entry is malformed. The message names the file and the line."""

    def __init__(self, reason: str, *, source: str, line: int | None = None) -> None:
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {reason}")
        self.reason = reason
        self.source = source
        self.line = line


class ItemError(FetcherError):
    """One item of a batch failed. Collected into the Report, not raised out of a batch."""

    retryable: bool = False

    def __init__(self, message: str, *, url: str = "") -> None:
        super().__init__(message)
        self.url = url


class HTTPStatusError(ItemError):
    """The server answered with an error status."""

    RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})

    def __init__(self, status: int, *, url: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status} for {url}", url=url)
        self.status = status
        self.retry_after = retry_after
        self.retryable = status in self.RETRYABLE


class TransportError(ItemError):
    """The connection failed: refused, reset, timed out, TLS, protocol errors."""

    retryable = True


class TruncatedError(TransportError):
    """The body ended before Content-Length bytes arrived."""


class RedirectError(TransportError):
    """A redirect loop, too many redirects, or a redirect to a non-http(s) URL."""

    retryable = False


class ChecksumError(ItemError):
    """The downloaded bytes do not match the expected SHA-256."""

    retryable = True  # once: a second clean mismatch is final (see download.py)

    def __init__(self, *, url: str, expected: str, actual: str) -> None:
        super().__init__(f"sha256 mismatch for {url}: expected {expected}, got {actual}", url=url)
        self.expected = expected
        self.actual = actual


class ContentTypeError(ItemError):
    """The response's Content-Type is not what the caller expects (an error page, say)."""

    def __init__(self, *, url: str, got: str, expected: str) -> None:
        super().__init__(f"{url}: Content-Type {got or '(none)'} does not match {expected}",
                         url=url)
        self.got = got
        self.expected = expected


class UnsafePathError(ItemError):
    """An output path would escape the destination directory or is not a valid name."""

    def __init__(self, reason: str, *, path: str, url: str = "") -> None:
        super().__init__(f"unsafe path {path!r}: {reason}", url=url)
        self.path = path
        self.reason = reason


class StorageError(ItemError):
    """Writing to disk failed (disk full, read-only, permission)."""

    def __init__(self, message: str, *, url: str = "", disk_full: bool = False) -> None:
        super().__init__(message, url=url)
        self.disk_full = disk_full


class TargetExistsError(ItemError):
    """A file the manifest does not own is already at the target and ``on_exists='error'``."""


class ProcessingError(ItemError):
    """A post-processing transform failed on a downloaded file."""

    def __init__(
        self, message: str, *, transform: str, path: str, url: str = "", traceback_text: str = ""
    ) -> None:
        super().__init__(f"{transform} on {path}: {message}", url=url)
        self.transform = transform
        self.path = path
        self.traceback_text = traceback_text


class CancelledError(ItemError):
    """The run was interrupted before this item finished."""


class DownloadProcessError(ItemError):
    """The forked download process running the item died (killed, out of memory) before
    reporting it; the file may or may not have been published. A re-run settles it."""


class BatchFailedError(FetcherError):
    """Raised by ``Report.raise_for_failures()`` when some items failed."""

    def __init__(self, message: str, *, failures: list[Any]) -> None:
        super().__init__(message)
        self.failures = failures


class TaskError(FetcherError):
    """An item of ``parallel_map`` raised. Holds the original exception and its traceback."""

    def __init__(
        self, message: str, *, item: Any = None, index: int | None = None,
        original: BaseException | None = None, traceback_text: str = "",
    ) -> None:
        super().__init__(message)
        self.item = item
        self.index = index
        self.original = original
        self.traceback_text = traceback_text


class WorkerLostError(TaskError):
    """A worker process died (killed by a signal, out of memory) while running an item."""


class SinkError(FetcherError):
    """A writer sink failed to commit a batch. Names the sink and the batch."""

    def __init__(self, message: str, *, sink: str, batch: int | None = None,
                 row: int | None = None) -> None:
        where = sink if batch is None else f"{sink} batch {batch}"
        if row is not None:
            where += f" row {row}"
        super().__init__(f"{where}: {message}")
        self.sink = sink
        self.batch = batch
        self.row = row
