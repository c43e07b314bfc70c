"""Job (what to fetch), Result (what happened) and Report (the whole run)."""

from __future__ import annotations

import dataclasses
import operator
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

try:  # what json's ensure_ascii=False uses, without importing the json package
    from _json import encode_basestring as _encode_str
except ImportError:  # pragma: no cover - Pythons without the C accelerator
    from json.encoder import encode_basestring as _encode_str

from .errors import BatchFailedError

Status = Literal["ok", "skipped", "failed"]

MANIFEST_FIELDS: tuple[str, ...] = (
    "url", "path", "status", "bytes", "sha256", "http_status", "attempts",
    "elapsed_s", "error_type", "error", "outputs",
)


_encoder: Callable[[Any], str] | None = None


def encode_record(record: Any) -> str:
    """A record as one line of JSON (one encoder for all: json.dumps with options makes a
    new one per call). json loads on first use: plain manifest lines never need it."""
    global _encoder
    if _encoder is None:
        import json

        _encoder = json.JSONEncoder(ensure_ascii=False, default=str).encode
    return _encoder(record)


_JSON_STATUS = {"ok": '"ok"', "skipped": '"skipped"', "failed": '"failed"'}

FAILURES_KEPT = 1000
"""Failures a Report keeps in memory when it does not keep every result."""


_FACTORY: Any = object()
"""Default of a field whose default is made per instance (what dataclasses' own
``_HAS_DEFAULT_FACTORY`` is to its generated ``__init__``)."""

# The classes below are dataclasses whose __init__ is written out and whose __repr__,
# __eq__ (and Job's __hash__) come from plain_methods, rather than generated:
# dataclasses compiles generated methods at every import, ~3 M instructions a class, a
# few percent of a one-file run. tests/unit/test_models_dataclasses.py holds them to what
# dataclasses generates.

_C = TypeVar("_C", bound=type)


def plain_methods(cls: _C) -> _C:
    """Give a dataclass declared with ``repr=False, eq=False`` the ``__repr__``,
    ``__eq__`` and ``__hash__`` dataclasses would generate from its fields, as closures
    (nothing compiled at import). Apply it above ``@dataclass``."""
    fields = dataclasses.fields(cls)

    def getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
        if not names:
            return lambda obj: ()
        if len(names) == 1:
            name = names[0]
            return lambda obj: (getattr(obj, name),)
        return operator.attrgetter(*names)

    shown = tuple(f.name for f in fields if f.repr)
    compared = getter(tuple(f.name for f in fields if f.compare))
    hashed = getter(tuple(f.name for f in fields if (f.compare if f.hash is None else f.hash)))

    @reprlib.recursive_repr()
    def __repr__(self: Any) -> str:
        return (f"{self.__class__.__qualname__}("
                + ", ".join(f"{name}={getattr(self, name)!r}" for name in shown) + ")")

    def __eq__(self: Any, other: Any) -> bool:
        if other.__class__ is self.__class__:
            return compared(self) == compared(other)
        return NotImplemented

    def __hash__(self: Any) -> int:
        return hash(hashed(self))

    for method in (__repr__, __eq__, __hash__):
        method.__qualname__ = f"{cls.__qualname__}.{method.__name__}"
    cls.__repr__ = __repr__  # type: ignore[assignment]
    cls.__eq__ = __eq__  # type: ignore[assignment]
    # As dataclasses does for eq=True: hashable when frozen, unhashable otherwise.
    cls.__hash__ = __hash__ if cls.__dataclass_params__.frozen else None  # type: ignore[attr-defined,assignment]
    return cls


@plain_methods
@dataclass(frozen=True, slots=True, init=False, repr=False, eq=False)
class Job:
    """One entry of a URL list."""

    url: str
    path: str | None = None
    """Output path relative to DEST, as the list gave it (validated later by naming)."""
    sha256: str | None = None
    """Expected lowercase hex digest, if the list gave one."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Other columns of the list, carried through to the manifest."""
    source: str = "<list>"
    line: int | None = None

    def __init__(self, url: str, path: str | None = None, sha256: str | None = None,
                 extra: Mapping[str, Any] = _FACTORY, source: str = "<list>",
                 line: int | None = None) -> None:
        # Through the slots' own setters: a frozen dataclass's object.__setattr__ per
        # field cost a third of parsing a list line.
        _set_url(self, url)
        _set_path(self, path)
        _set_sha256(self, sha256)
        _set_extra(self, {} if extra is _FACTORY else extra)
        _set_source(self, source)
        _set_line(self, line)



_set_url, _set_path, _set_sha256, _set_extra, _set_source, _set_line = (
    Job.__dict__[name].__set__ for name in ("url", "path", "sha256", "extra", "source", "line"))


@plain_methods
@dataclass(slots=True, init=False, repr=False, eq=False)
class Result:
    """The outcome of one Job: one manifest line."""

    url: str
    path: str | None
    status: Status
    bytes: int = 0
    sha256: str | None = None
    http_status: int | None = None
    attempts: int = 0
    elapsed_s: float = 0.0
    error_type: str | None = None
    error: str | None = None
    outputs: list[str] = field(default_factory=list)
    extra: Mapping[str, Any] = field(default_factory=dict)
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    def __init__(self, url: str, path: str | None, status: Status, bytes: int = 0,
                 sha256: str | None = None, http_status: int | None = None,
                 attempts: int = 0, elapsed_s: float = 0.0, error_type: str | None = None,
                 error: str | None = None, outputs: list[str] = _FACTORY,
                 extra: Mapping[str, Any] = _FACTORY,
                 exception: BaseException | None = None) -> None:
        self.url = url
        self.path = path
        self.status = status
        self.bytes = bytes
        self.sha256 = sha256
        self.http_status = http_status
        self.attempts = attempts
        self.elapsed_s = elapsed_s
        self.error_type = error_type
        self.error = error
        self.outputs = [] if outputs is _FACTORY else outputs
        self.extra = {} if extra is _FACTORY else extra
        self.exception = exception

    @property
    def ok(self) -> bool:
        """True when the item is usable: downloaded or already complete."""
        return self.status != "failed"

    def record(self) -> dict[str, Any]:
        """The manifest record: the fixed fields, then carried columns."""
        rec: dict[str, Any] = {
            "url": self.url, "path": self.path, "status": self.status, "bytes": self.bytes,
            "sha256": self.sha256, "http_status": self.http_status, "attempts": self.attempts,
            "elapsed_s": round(self.elapsed_s, 4), "error_type": self.error_type,
            "error": self.error, "outputs": list(self.outputs),
        }
        for k, v in self.extra.items():
            rec.setdefault(k, v)
        return rec

    def json_line(self) -> str:
        """``record()`` as the manifest's JSON text, built directly for the common case
        (no error, outputs or extra columns): a third of json.dumps's cost per file."""
        if self.extra or self.outputs or self.error is not None or self.error_type is not None:
            return encode_record(self.record())
        q = _encode_str
        path = "null" if self.path is None else q(self.path)
        sha = "null" if self.sha256 is None else q(self.sha256)
        http = "null" if self.http_status is None else str(int(self.http_status))
        status = _JSON_STATUS[self.status] if self.status in _JSON_STATUS else q(self.status)
        elapsed = self.elapsed_s
        if 0.0 <= elapsed < 1e9:
            # The digits of repr(float(round(elapsed, 4))) from one conversion, not three:
            # below 1e9 the 4-place decimal is the shortest repr of the double nearest it.
            secs = f"{elapsed:.4f}".rstrip("0")
            if secs[-1] == ".":
                secs += "0"
        else:
            secs = repr(float(round(elapsed, 4)))
        return (f'{{"url": {q(self.url)}, "path": {path}, "status": {status}, '
                f'"bytes": {int(self.bytes)}, "sha256": {sha}, "http_status": {http}, '
                f'"attempts": {int(self.attempts)}, "elapsed_s": {secs}, '
                f'"error_type": null, "error": null, "outputs": []}}')

    def fail(self, exc: BaseException) -> Result:
        """Mark this result failed with ``exc`` (in place) and return it."""
        self.status = "failed"
        self.error_type = type(exc).__name__
        self.error = str(exc)
        self.exception = exc
        return self


@plain_methods
@dataclass(slots=True, init=False, repr=False, eq=False)
class Report:
    """What a batch produced. Failures are collected here, not raised."""

    results: list[Result] = field(default_factory=list)
    failures: list[Result] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "skipped": 0, "failed": 0})
    bytes: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False
    stopped: str | None = None
    """Why the run stopped starting new items early (a full disk), if it did."""
    manifest: str | None = None
    sink: dict[str, Any] | None = None
    """The sink writer's summary (rows, batches, seconds), when a sink was given."""
    processes: int = 1
    """Processes that shared the transfers (more than one for long lists on several
    cores: ``FetchConfig.download_processes``)."""

    def __init__(self, results: list[Result] = _FACTORY, failures: list[Result] = _FACTORY,
                 counts: dict[str, int] = _FACTORY, bytes: int = 0, elapsed_s: float = 0.0,
                 interrupted: bool = False, stopped: str | None = None,
                 manifest: str | None = None, sink: dict[str, Any] | None = None,
                 processes: int = 1) -> None:
        self.results = [] if results is _FACTORY else results
        self.failures = [] if failures is _FACTORY else failures
        self.counts = {"ok": 0, "skipped": 0, "failed": 0} if counts is _FACTORY else counts
        self.bytes = bytes
        self.elapsed_s = elapsed_s
        self.interrupted = interrupted
        self.stopped = stopped
        self.manifest = manifest
        self.sink = sink
        self.processes = processes

    def add(self, result: Result, *, keep: bool = True) -> None:
        """Count ``result``; keep it in ``results`` when ``keep``.

        Failures are always kept when ``keep``; otherwise (streaming a huge list, where
        the manifest is the record) only the first ``FAILURES_KEPT`` are, so memory stays
        flat even when every item of a million fails. ``counts`` is always complete.
        """
        self.counts[result.status] += 1
        self.bytes += result.bytes if result.status == "ok" else 0
        if keep:
            self.results.append(result)
        if result.status == "failed" and (keep or len(self.failures) < FAILURES_KEPT):
            self.failures.append(result)

    @property
    def ok(self) -> bool:
        """True when no item failed and the run ended normally (not interrupted or stopped)."""
        return not self.failures and not self.interrupted and self.stopped is None

    @property
    def total(self) -> int:
        """Items seen."""
        return sum(self.counts.values())

    def records(self) -> list[dict[str, Any]]:
        """The kept results as manifest dicts, ready for ``pandas.DataFrame``."""
        return [r.record() for r in self.results]

    def summary(self) -> dict[str, Any]:
        """Counts, bytes, time and throughput as a JSON-ready dict."""
        secs = self.elapsed_s
        return {
            "ok": self.counts["ok"], "skipped": self.counts["skipped"],
            "failed": self.counts["failed"], "total": self.total, "bytes": self.bytes,
            "elapsed_s": round(secs, 3),
            "bytes_per_s": round(self.bytes / secs, 1) if secs > 0 else None,
            "files_per_s": round(self.counts["ok"] / secs, 1) if secs > 0 else None,
            "interrupted": self.interrupted, "stopped": self.stopped,
            "manifest": self.manifest, "sink": self.sink, "processes": self.processes,
        }

    def raise_for_failures(self) -> None:
        """Raise BatchFailedError naming the failed URLs, if any item failed."""
        if self.failures:
            failed = self.counts["failed"]
            head = "; ".join(f"{r.url}: {r.error}" for r in self.failures[:5])
            more = f" (and {failed - 5} more)" if failed > 5 else ""
            raise BatchFailedError(
                f"{failed} of {self.total} items failed: {head}{more}",
                failures=list(self.failures),
            )
