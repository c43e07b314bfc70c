"""One file: stream to a partial, resume, verify, publish atomically, retry the whole file.

A download never appears under its final name unless complete and verified: bytes go
to ``DEST/.fetcher/partial/<key>.part`` with a ``.json`` sidecar holding the resume
validator (ETag, else Last-Modified). Retries wrap the whole file, because transport
retries cannot cover a body that breaks mid-stream.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .config import FetchConfig
from .destdirs import DestDirs
from .errors import (
    CancelledError,
    ChecksumError,
    ContentTypeError,
    HTTPStatusError,
    ItemError,
    StorageError,
    TransportError,
    TruncatedError,
)
from .http import HttpClient, Prefetched, Response, host_of, raise_for_status, redact
from .models import Result
from .segments import SplitDownload, plan, split_validator

PARTIAL_DIR = Path(".fetcher") / "partial"
_READ_BUF = 1024 * 1024
RESUME_MIN_BYTES = 64 * 1024
BACKGROUND_HASH_BYTES = 8 * 1024 * 1024
_HASH_QUEUE = 4
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


class HostGate:
    """Per-host politeness shared by all threads: connection cap, request rate, pauses."""

    def __init__(self, *, limit: int | None, rate: float | None,
                 cancel: threading.Event) -> None:
        self._limit = limit
        self._interval = 1.0 / rate if rate else 0.0
        self._cancel = cancel
        self._lock = threading.Lock()
        self._sems: dict[str, threading.BoundedSemaphore] = {}
        self._next: dict[str, float] = {}
        self._paused: dict[str, float] = {}
        self.on_pause: Callable[[str, float], None] | None = None
        """Told of every pause this gate starts (host, until on the monotonic clock):
        a fan-out worker passes pauses on to the other processes of the run."""

    @contextlib.contextmanager
    def slot(self, host: str) -> Iterator[None]:
        """Hold one of the host's connections for the duration of a request."""
        sem = None
        if self._limit is not None:
            with self._lock:
                sem = self._sems.get(host)
                if sem is None:
                    sem = self._sems[host] = threading.BoundedSemaphore(self._limit)
            while not sem.acquire(timeout=0.2):
                if self._cancel.is_set():
                    raise CancelledError("cancelled while waiting for a connection slot")
        try:
            self._wait_turn(host)
            yield
        finally:
            if sem is not None:
                sem.release()

    def _wait_turn(self, host: str) -> None:
        if not self._interval and not self._paused:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._paused.get(host, 0.0), self._next.get(host, 0.0))
            if self._interval:
                self._next[host] = start + self._interval
        if start > now and self._cancel.wait(start - now):
            raise CancelledError("cancelled while waiting for the host")

    def paused(self, url: str) -> bool:
        """Whether requests to ``url``'s host must wait (a Retry-After pause is running)."""
        return bool(self._paused) and self._paused.get(host_of(url), 0.0) > time.monotonic()

    def pause(self, host: str, seconds: float) -> None:
        """Hold every thread's next request to ``host`` for ``seconds`` (Retry-After)."""
        self.pause_until(host, time.monotonic() + seconds)

    def pause_until(self, host: str, until: float, *, announce: bool = True) -> None:
        """Hold requests to ``host`` until ``until`` (``time.monotonic()``, which every
        process of the machine shares); ``announce`` tells ``on_pause`` if it grew."""
        with self._lock:
            grew = until > self._paused.get(host, 0.0)
            if grew:
                self._paused[host] = until
        if grew and announce and self.on_pause is not None:
            self.on_pause(host, until)


class RunContext(DestDirs):
    """State shared by every download of one run, DEST's directories included
    (``DestDirs``: what is checked, what is the run's own).

    A plain class, not a dataclass: generating a dataclass's methods costs ~1 ms of
    every start, and this one is internal (the cluster's attempts subclass it).
    """

    def __init__(self, *, config: FetchConfig, dest: Path, gate: HostGate,
                 cancel: threading.Event | None = None,
                 stop_new: threading.Event | None = None,
                 clients: list[HttpClient] | None = None,
                 dirs: set[str] | None = None) -> None:
        super().__init__(dest, dirs)
        self.config, self.gate = config, gate
        self.cancel = cancel if cancel is not None else threading.Event()
        self.stop_new = stop_new if stop_new is not None else threading.Event()
        self.stop_reason: str | None = None
        self.partials: set[str] = set()
        """Partial file names present when the run started (resume candidates)."""
        self.clients: list[HttpClient] = clients if clients is not None else []
        """Every thread's client, so an interrupt can break requests not yet answered."""
        self.on_stop: Callable[[str], None] | None = None
        """Told the reason when ``stop`` first takes effect (a fan-out worker tells its
        parent, which stops the others)."""
        self._active: set[Response] = set()
        self._lock = threading.Lock()

    @property
    def partial_dir(self) -> Path:
        return self.dest / PARTIAL_DIR

    @functools.cached_property
    def partial_str(self) -> str:
        return os.fspath(self.dest / PARTIAL_DIR)

    def track(self, resp: Response | None, *, add: bool) -> None:
        if resp is None:
            return
        with self._lock:
            if add:
                self._active.add(resp)
            else:
                self._active.discard(resp)

    def stop(self, reason: str) -> None:
        """Start no new items (the first reason is kept); in-flight items finish."""
        with self._lock:
            first = self.stop_reason is None
            if first:
                self.stop_reason = reason
        self.stop_new.set()
        if first and self.on_stop is not None:
            self.on_stop(reason)

    def abort_all(self) -> None:
        """Break every in-flight transfer so threads notice cancellation at once."""
        with self._lock:
            active = list(self._active)
            clients = list(self.clients)
        for resp in active:
            resp.abort()
        for client in clients:  # requests still connecting or waiting for a response
            client.abort()


def partial_name(url: str, rel: str) -> str:
    """Deterministic partial file name for (url, rel), so a later run can resume."""
    return hashlib.blake2b(f"{url}\0{rel}".encode(), digest_size=12).hexdigest() + ".part"


def backoff_delay(config: FetchConfig, attempt: int) -> float:
    """Exponential backoff, capped, with jitter: a random delay between half the cap and
    the cap. (os.urandom rather than random: importing random costs ~1.5 ms of every
    start, and may fail for want of a file descriptor when a retry is for that.)"""
    cap: float = min(config.backoff_max, config.backoff_base * 2.0 ** (attempt - 1))
    return cap * (0.5 + int.from_bytes(os.urandom(2), "big") / 131070)


class SkipExisting(Exception):
    """Raised by a retarget hook: the server-named target exists and --on-exists is skip."""

    def __init__(self, rel: str) -> None:
        super().__init__(rel)
        self.rel = rel


Retarget = Callable[[str | None], str]
"""Maps a Content-Disposition header (or None) to the relative path to publish at."""


def download_one(ctx: RunContext, client: HttpClient, url: str, rel: str,
                 expected_sha: str | None, retarget: Retarget | None = None, *,
                 first: Prefetched | ItemError | None = None) -> Result:
    """Download ``url`` to ``DEST/rel``. Never raises for per-item failures.

    ``first`` is what ``multiplex.py`` got from attempt 1 before handing the item over:
    the open response (hop 0) to carry on with, or the error that attempt ended with.
    """
    cfg = ctx.config
    shown = redact(url)
    result = Result(url=shown, path=rel, status="failed")
    started = time.monotonic()
    name = partial_name(url, rel)
    part = os.path.join(ctx.partial_str, name)
    meta = part[:-5] + ".json"
    maybe_partial = name in ctx.partials
    mismatches = 0
    host = host_of(url)
    last: ItemError | None = None
    while result.attempts <= cfg.retries:
        if ctx.cancel.is_set():
            if isinstance(first, Prefetched):
                first.conn.close()
            last = CancelledError(f"cancelled: {shown}", url=shown)
            break
        result.attempts += 1
        pending, first = first, None
        try:
            if isinstance(pending, ItemError):
                raise pending
            got = _attempt(ctx, client, url, shown, host, part, meta, rel, retarget,
                           maybe_partial or result.attempts > 1, pending)
            size, digest, rel = got.size, got.sha256, got.rel
            result.path = rel
            if expected_sha and digest != expected_sha:
                _remove(part, meta)
                raise ChecksumError(url=shown, expected=expected_sha, actual=digest)
            _publish(ctx, part, meta, rel, shown, got.sidecar)
            result.status, result.bytes, result.sha256 = "ok", size, digest
            result.http_status = got.status
            result.elapsed_s = time.monotonic() - started
            return result
        except SkipExisting as skip:
            _remove(part, meta)
            result.path, result.status = skip.rel, "skipped"
            result.elapsed_s = time.monotonic() - started
            return result
        except ItemError as exc:
            last = exc
            if isinstance(exc, ChecksumError):
                mismatches += 1
            if isinstance(exc, HTTPStatusError):
                result.http_status = exc.status
                if exc.retry_after is not None and exc.status in (429, 503):
                    if exc.retry_after > cfg.retry_after_max:
                        break  # asked to come back later than we are willing to wait
                    ctx.gate.pause(host, exc.retry_after)
            if isinstance(exc, StorageError) and exc.disk_full:
                ctx.stop(str(exc))  # keep what is complete, start nothing new
            retry = exc.retryable and not (isinstance(exc, ChecksumError) and mismatches >= 2)
            if not retry or result.attempts > cfg.retries or ctx.cancel.is_set():
                break
            wait = backoff_delay(cfg, result.attempts)
            if isinstance(exc, HTTPStatusError) and exc.retry_after is not None:
                wait = max(wait, min(exc.retry_after, cfg.retry_after_max))
            if ctx.cancel.wait(wait):
                last = CancelledError(f"cancelled: {shown}", url=shown)
                break
    result.elapsed_s = time.monotonic() - started
    assert last is not None
    return result.fail(last)


class _Transfer:
    """What one successful attempt got. ``rel``: where to publish (Content-Disposition
    may have changed it); ``sidecar``: whether a resume sidecar may need removing."""

    __slots__ = ("rel", "sha256", "sidecar", "size", "status")

    def __init__(self, size: int, sha256: str, status: int, rel: str, *,
                 sidecar: bool) -> None:
        self.size, self.sha256, self.status, self.rel = size, sha256, status, rel
        self.sidecar = sidecar


def _attempt(ctx: RunContext, client: HttpClient, url: str, shown: str, host: str,
             part: str, meta: str, rel: str, retarget: Retarget | None,
             maybe_partial: bool, first: Prefetched | None = None) -> _Transfer:
    """One GET: resume if possible, stream, verify length."""
    cfg = ctx.config
    offset, validator = 0, ""
    if maybe_partial:
        resumed = SplitDownload.resumable(ctx, url, shown, part, meta)
        if resumed is not None:  # an earlier run's segmented transfer: finish its segments
            with ctx.gate.slot(host):
                size, digest = resumed.run()
            return _Transfer(size, digest, 206, rel, sidecar=True)
        offset, validator = _resume_point(part, meta, url)
    headers: dict[str, str] = {}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = validator
    with ctx.gate.slot(host):
        if first is not None and offset:  # cannot happen today: the loop never resumes
            first.conn.close()
            first = None
        resp = client.get(url, headers, first=first)
        ctx.track(resp, add=True)
        try:
            if resp.status == 416 and offset:
                _remove(part, meta)  # our partial does not fit the resource any more
                raise TransportError(f"range not satisfiable for {shown}; restarting", url=shown)
            raise_for_status(resp, url=shown)
            if cfg.expect_type:
                _check_type(resp, cfg.expect_type, shown)
            total = resp.content_length
            if resp.status == 206 and offset:
                start, total = _content_range(resp)
                if start != offset:
                    _remove(part, meta)
                    raise TransportError(
                        f"{shown}: server resumed at byte {start}, expected {offset}", url=shown)
            elif resp.status == 206:
                raise TransportError(f"{shown}: unexpected 206 without a Range", url=shown)
            else:
                offset = 0  # 200: server ignored Range or the resource changed
            if resp.status not in (200, 206):
                raise TransportError(f"{shown}: unexpected HTTP {resp.status}", url=shown)
            if retarget is not None:
                rel = retarget(resp.headers.get("Content-Disposition"))
            if not offset and total and (strong := split_validator(cfg, resp, total)):
                segments = plan(total, cfg.split)
                split = SplitDownload(ctx, url, shown, part, meta, total, strong, segments)
                size, digest = split.run(first=resp)
                return _Transfer(size, digest, resp.status, rel, sidecar=True)
            # Small bodies get no resume sidecar: re-fetching them is cheaper than the
            # extra file writes, which dominate the cost of many small downloads.
            sidecar = total is None or total > RESUME_MIN_BYTES
            if sidecar:
                _write_meta(meta, url, resp, total)
            size, digest = _stream(ctx, resp, part, offset, shown, total)
        finally:
            ctx.track(resp, add=False)
            resp.release()
    if total is not None and size != total:
        raise TruncatedError(f"{shown}: got {size} of {total} bytes", url=shown)
    return _Transfer(size, digest, resp.status, rel, sidecar=bool(offset or sidecar))


class _BackgroundHash:
    """SHA-256 on another thread: hashlib releases the GIL on large buffers, so hashing
    a big body runs on the second core while this thread receives and writes.

    At ~1 GB/s, hashing inline would cost as much as the transfer itself.
    """

    def __init__(self, hasher: Any) -> None:
        self._hasher = hasher
        # Bounded: when hashing falls behind, the transfer waits instead of buffering.
        self._queue: queue.Queue[bytes | memoryview | None] = queue.Queue(maxsize=_HASH_QUEUE)
        self._thread = threading.Thread(target=self._run, name="fetcher-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        get, update = self._queue.get, self._hasher.update
        while (chunk := get()) is not None:
            update(chunk)

    def update(self, chunk: bytes | memoryview) -> None:
        self._queue.put(chunk)

    def hexdigest(self) -> str:
        self._queue.put(None)
        self._thread.join()
        digest: str = self._hasher.hexdigest()
        return digest


def _stream(ctx: RunContext, resp: Response, part: str, offset: int,
            shown: str, total: int | None = None) -> tuple[int, str]:
    """Append the body to ``part`` while hashing it; returns (total size, sha256)."""
    hasher: Any = hashlib.sha256()
    flags = os.O_WRONLY | os.O_CREAT
    try:
        if offset:
            with open(part, "rb") as fh:  # hash what we already have
                while buf := fh.read(_READ_BUF):
                    hasher.update(buf)
            fd = os.open(part, flags | os.O_APPEND, 0o666)
        else:
            fd = os.open(part, flags | os.O_TRUNC, 0o666)
    except OSError as exc:
        raise _storage_error(exc, shown) from exc
    if total is None or total - offset >= BACKGROUND_HASH_BYTES:
        hasher = _BackgroundHash(hasher)
    size = offset
    cancel = ctx.cancel
    try:
        step = ctx.config.chunk_size
        if resp.fills_buffers:  # one buffer, or a ring while a thread hashes behind us
            ring = _RING if isinstance(hasher, _BackgroundHash) else 1
            pieces: Iterator[bytes | memoryview] = _filled(
                resp, min(step, total - offset) if total else step, ring)
        else:
            pieces = resp.chunks(step)
        for chunk in pieces:
            if cancel.is_set():
                raise CancelledError(f"cancelled: {shown}", url=shown)
            hasher.update(chunk)
            view = memoryview(chunk)
            while view:
                try:
                    n = os.write(fd, view)
                except OSError as exc:
                    raise _storage_error(exc, shown, part) from exc
                view = view[n:]
            size += len(chunk)
    except TransportError:
        if cancel.is_set():  # a transfer we aborted on purpose
            raise CancelledError(f"cancelled: {shown}", url=shown) from None
        raise
    finally:
        os.close(fd)
        digest = hasher.hexdigest()  # also stops a background hasher on failure
    return size, digest


_RING = _HASH_QUEUE + 2
"""Buffers a body is read into in turn. A buffer is refilled only after the hash thread
is done with it: at most _HASH_QUEUE pieces wait in its queue and one is being hashed."""


def _filled(resp: Response, size: int, count: int) -> Iterator[memoryview]:
    """The body as views of ``count`` reused buffers: recv_into, no allocation per read.

    A fresh ``bytes`` per read cost an mmap, page faults and a munmap each: on a 1 GiB
    file, 15,000-57,000 page faults against 4,700 this way.
    """
    ring = [memoryview(bytearray(max(size, 1))) for _ in range(count)]
    i = 0
    while n := resp.readinto(ring[i]):
        yield ring[i][:n]
        i = (i + 1) % count


def _publish(ctx: RunContext, part: str, meta: str, rel: str, shown: str,
             resumable: bool) -> None:
    # No lstat of the target here: os.replace never follows a symlink at the final
    # name, and the parent directories were checked (ensure_parent) for this run.
    final = ctx.dest_str + "/" + rel
    try:
        ctx.ensure_parent(rel)
        try:
            os.replace(part, final)
        except (FileNotFoundError, NotADirectoryError):
            if not os.path.lexists(part):
                raise
            ctx.forget(rel)  # a checked directory was removed or replaced meanwhile
            ctx.ensure_parent(rel)
            os.replace(part, final)
    except OSError as exc:
        raise _storage_error(exc, shown) from exc
    if resumable:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(meta)


def _resume_point(part: str, meta: str, url: str) -> tuple[int, str]:
    try:
        size = os.stat(part).st_size
    except FileNotFoundError:
        return 0, ""
    import json  # resume sidecars only: most runs never read one

    try:
        with open(meta, encoding="utf-8") as fh:
            info = json.load(fh)
    except (OSError, ValueError):
        info = {}
    validator = info.get("validator") if isinstance(info, dict) else None
    if size and isinstance(validator, str) and validator and info.get("url") == url:
        return size, validator
    return 0, ""  # nothing safe to resume from: If-Range needs a validator


def _write_meta(meta: str, url: str, resp: Response, total: int | None) -> None:
    validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified") or ""
    if validator.startswith("W/"):
        validator = ""  # weak ETags are not allowed in If-Range
    import json  # bodies over 64 KiB only

    data = json.dumps({"url": url, "validator": validator, "total": total})
    try:
        with open(meta, "w", encoding="utf-8") as fh:
            fh.write(data)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(meta)  # no empty sidecar left behind
        raise _storage_error(exc, redact(url), meta) from exc


def _content_range(resp: Response) -> tuple[int, int | None]:
    value = resp.headers.get("Content-Range", "")
    try:
        unit, _, spec = value.partition(" ")
        span, _, total = spec.partition("/")
        start = int(span.partition("-")[0])
        if unit.strip().lower() != "bytes":
            raise ValueError(unit)
        return start, (int(total) if total.strip().isdigit() else None)
    except ValueError as exc:
        raise TransportError(f"{redact(resp.url)}: bad Content-Range {value!r}",
                             url=redact(resp.url)) from exc


def type_matches(content_type: str | None, pattern: str) -> bool:
    """Whether a Content-Type value matches ``--expect-type`` (comma-separated globs)."""
    got = (content_type or "").split(";")[0].strip().lower()
    wanted = [p.strip().lower() for p in pattern.split(",") if p.strip()]
    return any(fnmatch.fnmatchcase(got, p) for p in wanted)


def _check_type(resp: Response, pattern: str, shown: str) -> None:
    value = resp.headers.get("Content-Type")
    if not type_matches(value, pattern):
        got = (value or "").split(";")[0].strip().lower()
        raise ContentTypeError(url=shown, got=got, expected=pattern)


def _storage_error(exc: OSError, shown: str, path: str = "") -> StorageError:
    why = os.strerror(exc.errno) if exc.errno else str(exc)
    where = exc.filename or path or "the file"
    return StorageError(f"{shown}: cannot write {where}: {why}", url=shown,
                        disk_full=exc.errno in _DISK_ERRNOS)


def _remove(*paths: str) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
