"""fetcher: concurrent downloads, process-pool post-processing and parallel writes.

>>> from fetcher import fetch
>>> report = fetch("urls.txt", "out", threads=16)
>>> report.ok, len(report.failures)

Names are imported lazily (PEP 562), so ``import fetcher`` and ``fetcher --help``
stay fast and optional extras load only when used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"


_EXPORTS: dict[str, str] = {
    "fetch": "fetcher.downloader",
    "Fetcher": "fetcher.downloader",
    "FetchConfig": "fetcher.config",
    "Job": "fetcher.models",
    "Result": "fetcher.models",
    "Report": "fetcher.models",
    "Progress": "fetcher.progress",
    "NullProgress": "fetcher.progress",
    "TqdmProgress": "fetcher.progress",
    "parallel_map": "fetcher.executors",
    "parallel_imap": "fetcher.executors",
    "ParallelWriter": "fetcher.writers",
    "open_sink": "fetcher.writers",
    "FetcherError": "fetcher.errors",
    "ConfigError": "fetcher.errors",
    "UrlListError": "fetcher.errors",
    "ItemError": "fetcher.errors",
    "HTTPStatusError": "fetcher.errors",
    "TransportError": "fetcher.errors",
    "ChecksumError": "fetcher.errors",
    "UnsafePathError": "fetcher.errors",
    "ProcessingError": "fetcher.errors",
    "BatchFailedError": "fetcher.errors",
    "TaskError": "fetcher.errors",
    "WorkerLostError": "fetcher.errors",
    "SinkError": "fetcher.errors",
}

__all__ = [
    "BatchFailedError", "ChecksumError", "ConfigError", "FetchConfig", "Fetcher",
    "FetcherError", "HTTPStatusError", "ItemError", "Job", "NullProgress", "ParallelWriter",
    "ProcessingError", "Progress", "Report", "Result", "SinkError", "TaskError",
    "TqdmProgress", "TransportError", "UnsafePathError", "UrlListError", "WorkerLostError",
    "__version__", "fetch", "open_sink", "parallel_imap", "parallel_map",
]

if TYPE_CHECKING:
    from fetcher.config import FetchConfig
    from fetcher.downloader import Fetcher, fetch
    from fetcher.errors import (
        BatchFailedError,
        ChecksumError,
        ConfigError,
        FetcherError,
        HTTPStatusError,
        ItemError,
        ProcessingError,
        SinkError,
        TaskError,
        TransportError,
        UnsafePathError,
        UrlListError,
        WorkerLostError,
    )
    from fetcher.executors import parallel_imap, parallel_map
    from fetcher.models import Job, Report, Result
    from fetcher.progress import NullProgress, Progress, TqdmProgress
    from fetcher.writers import ParallelWriter, open_sink


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fetcher' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
