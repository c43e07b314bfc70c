"""Immutable option sets. Derive variants with ``dataclasses.replace`` (validated again)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError
from .models import plain_methods

_set = object.__setattr__  # a frozen dataclass's fields are set this way
_FACTORY: Any = object()
"""Default of ``headers``: a new dict per instance (dataclasses' ``_HAS_DEFAULT_FACTORY``)."""

FANOUT_MIN_ITEMS = 256
"""Shortest list that is shared among download processes when ``download_processes`` is
not set: below it, forking costs more than it saves."""

MAX_PIPELINE = 16
"""Deepest ``pipeline`` accepted: deeper gains nothing and holds more behind a slow
response."""

OnExists = Literal["rename", "skip", "overwrite", "error"]
ON_EXISTS: tuple[str, ...] = ("rename", "skip", "overwrite", "error")


@plain_methods
@dataclass(frozen=True, slots=True, init=False, repr=False, eq=False)
class FetchConfig:
    """Everything that shapes one download run. Every field is documented in place."""

    threads: int = 8
    """Concurrent transfers: connections of the small-file loop plus worker threads
    (large, redirected or failing files), never more than this many at once."""
    retries: int = 5
    """Extra attempts per file after the first (whole-file retries, not just connects)."""
    timeout: float = 30.0
    """Connect timeout and read timeout (silence between bytes), seconds."""
    on_exists: OnExists = "rename"
    """What to do with a file already at the target that the manifest does not own."""
    force: bool = False
    """Download again even what the manifest records as complete."""
    content_disposition: bool = False
    """Take the file name from the Content-Disposition header (sanitised)."""
    per_host: int | None = None
    """Max concurrent connections to one host; None means ``threads``."""
    rate: float | None = None
    """Max requests per second per host; None is unlimited."""
    split: int = 1
    """Segments per large file (Range requests over several connections)."""
    split_min_size: int = 16 * 1024 * 1024
    """Files smaller than this are never split."""
    pipeline: int = 1
    """Requests the small-file loop keeps outstanding on one keep-alive connection
    (HTTP/1.1 pipelining), up to ``MAX_PIPELINE``; 1 sends the next request only after
    the last response. See ``multiplex`` for when a connection pipelines."""
    expect_type: str | None = None
    """Required Content-Type pattern, e.g. ``image/*``; a mismatch fails the item."""
    max_redirects: int = 10
    """Redirect hops followed before giving up."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Extra request headers sent with every request."""
    auth: tuple[str, str] | None = None
    """HTTP basic auth (user, password); never sent to another host after a redirect."""
    proxies: Mapping[str, str] | None = None
    """Proxy URLs by scheme, as requests takes them: {"http": ..., "https": ...}."""
    verify: bool | str = True
    """TLS verification: True, False, or a CA bundle path."""
    cert: str | tuple[str, str] | None = None
    """Client certificate file, or (cert, key)."""
    chunk_size: int = 1024 * 1024
    """Bytes read per call while streaming a body (a large file holds up to 6 buffers
    of this size while its SHA-256 runs on another thread)."""
    backoff_base: float = 0.5
    """First retry delay, seconds; doubles each attempt, with full jitter."""
    backoff_max: float = 30.0
    """Cap for one backoff delay."""
    retry_after_max: float = 300.0
    """Longest Retry-After honoured; a server asking for more fails the item instead."""
    download_processes: int | None = None
    """Processes sharing the transfers, this one included (the others forked; POSIX
    only): the list is still read and named here. None: one per core, up to 4, for runs
    of at least ``FANOUT_MIN_ITEMS`` items whose options allow it; 1: this one alone."""
    window: int | None = None
    """Jobs in flight at most (submitted, not finished); None means ``4 * threads``."""
    manifest: Path | None = None
    """Manifest path; None means ``DEST/.fetcher/manifest.jsonl``."""
    keep_results: bool = True
    """Keep every Result in the Report (set False for huge lists; failures are always kept)."""
    user_agent: str = "fetcher/0.1"
    """User-Agent header value."""

    # Written out, as models.py's classes are: dataclasses compiles a generated
    # __init__, __repr__, __eq__ and __hash__ at every import, ~8 M instructions, 5% of
    # a one-file run. tests/unit/test_models_dataclasses.py holds them to what
    # dataclasses would generate.
    def __init__(
            self,
            threads: int = 8,
            retries: int = 5,
            timeout: float = 30.0,
            on_exists: OnExists = "rename",
            force: bool = False,
            content_disposition: bool = False,
            per_host: int | None = None,
            rate: float | None = None,
            split: int = 1,
            split_min_size: int = 16 * 1024 * 1024,
            pipeline: int = 1,
            expect_type: str | None = None,
            max_redirects: int = 10,
            headers: Mapping[str, str] = _FACTORY,
            auth: tuple[str, str] | None = None,
            proxies: Mapping[str, str] | None = None,
            verify: bool | str = True,
            cert: str | tuple[str, str] | None = None,
            chunk_size: int = 1024 * 1024,
            backoff_base: float = 0.5,
            backoff_max: float = 30.0,
            retry_after_max: float = 300.0,
            download_processes: int | None = None,
            window: int | None = None,
            manifest: Path | None = None,
            keep_results: bool = True,
            user_agent: str = "fetcher/0.1",
    ) -> None:
        _set(self, "threads", threads)
        _set(self, "retries", retries)
        _set(self, "timeout", timeout)
        _set(self, "on_exists", on_exists)
        _set(self, "force", force)
        _set(self, "content_disposition", content_disposition)
        _set(self, "per_host", per_host)
        _set(self, "rate", rate)
        _set(self, "split", split)
        _set(self, "split_min_size", split_min_size)
        _set(self, "pipeline", pipeline)
        _set(self, "expect_type", expect_type)
        _set(self, "max_redirects", max_redirects)
        _set(self, "headers", {} if headers is _FACTORY else headers)
        _set(self, "auth", auth)
        _set(self, "proxies", proxies)
        _set(self, "verify", verify)
        _set(self, "cert", cert)
        _set(self, "chunk_size", chunk_size)
        _set(self, "backoff_base", backoff_base)
        _set(self, "backoff_max", backoff_max)
        _set(self, "retry_after_max", retry_after_max)
        _set(self, "download_processes", download_processes)
        _set(self, "window", window)
        _set(self, "manifest", manifest)
        _set(self, "keep_results", keep_results)
        _set(self, "user_agent", user_agent)
        self.__post_init__()

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"invalid {name}={getattr(self, name)!r}: {why}")

        if self.threads < 1:
            raise bad("threads", "must be at least 1")
        if self.retries < 0:
            raise bad("retries", "must be 0 or more")
        if not self.timeout > 0:
            raise bad("timeout", "must be positive seconds")
        if self.on_exists not in ON_EXISTS:
            raise bad("on_exists", f"choose one of {', '.join(ON_EXISTS)}")
        if self.per_host is not None and self.per_host < 1:
            raise bad("per_host", "must be at least 1")
        if self.rate is not None and not self.rate > 0:
            raise bad("rate", "must be a positive number of requests per second")
        if self.split < 1:
            raise bad("split", "must be at least 1")
        if not 1 <= self.pipeline <= MAX_PIPELINE:
            raise bad("pipeline", f"must be from 1 to {MAX_PIPELINE}")
        if self.max_redirects < 0:
            raise bad("max_redirects", "must be 0 or more")
        if self.chunk_size < 1024:
            raise bad("chunk_size", "must be at least 1024 bytes")
        if self.download_processes is not None and self.download_processes < 1:
            raise bad("download_processes", "must be at least 1")
        if self.window is not None and self.window < 1:
            raise bad("window", "must be at least 1")
        if self.auth is not None and not (
                isinstance(self.auth, tuple) and len(self.auth) == 2
                and all(isinstance(x, str) for x in self.auth)):
            raise bad("auth", "must be a (user, password) tuple of strings")
        for name, value in self.headers.items():
            try:
                f"{name}{value}".encode("latin-1")
            except UnicodeEncodeError:
                raise ConfigError(f"header {name!r}: HTTP header names and values must be "
                                  "Latin-1 text") from None
            if any(c in f"{name}{value}" for c in "\r\n\0") or not name.strip():
                raise ConfigError(f"header {name!r}: empty name or a line break")

    @property
    def host_limit(self) -> int:
        """Effective per-host connection cap."""
        return self.per_host if self.per_host is not None else self.threads

    @property
    def in_flight(self) -> int:
        """Effective bound on submitted-but-unfinished jobs."""
        return self.window if self.window is not None \
            else max(4, self.pipeline) * self.threads

    def replace(self, **changes: Any) -> FetchConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)
