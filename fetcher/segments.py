"""``--split N``: one large file over N connections, each fetching a byte range.

Used only when it can gain and stay correct: the first answer is a 200 with a
Content-Length of at least ``split_min_size``, ``Accept-Ranges: bytes`` and a strong
validator (ETag or Last-Modified) for ``If-Range``. The first response keeps
streaming segment 0 (no request is wasted); the other segments are fetched in
parallel with ``Range`` + ``If-Range`` and written in place with ``pwrite`` into one
preallocated partial file. Every segment is checked (206, the Content-Range it asked
for, its exact length) and retried from where it stopped. The sidecar records which
segments are complete, so a later run fetches only the rest. SHA-256 is computed over
the assembled file before it is published, like any other download.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from typing import Any

from .config import FetchConfig
from .errors import CancelledError, ItemError, TransportError, TruncatedError
from .http import HttpClient, Response, raise_for_status

_READ_BUF = 1024 * 1024


def split_validator(cfg: FetchConfig, resp: Response, total: int | None) -> str | None:
    """The If-Range validator when this response may be split, else None."""
    if cfg.split < 2 or resp.status != 200 or total is None or total < cfg.split_min_size:
        return None
    if resp.headers.get("Accept-Ranges", "").strip().lower() != "bytes":
        return None
    validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified") or ""
    return None if not validator or validator.startswith("W/") else validator


def plan(total: int, parts: int) -> list[list[int]]:
    """``parts`` contiguous [start, end, done] ranges covering ``total`` bytes."""
    step = -(-total // parts)
    return [[start, min(start + step, total) - 1, 0] for start in range(0, total, step)]


class SplitDownload:
    """One segmented transfer into ``part``; ``run`` returns (size, sha256)."""

    def __init__(self, ctx: Any, url: str, shown: str, part: str, meta: str, total: int,
                 validator: str, segments: list[list[int]]) -> None:
        self.ctx, self.cfg = ctx, ctx.config
        self.url, self.shown = url, shown
        self.part, self.meta = part, meta
        self.total, self.validator = total, validator
        self.segments = segments
        self._lock = threading.Lock()
        self._failed = threading.Event()  # one segment gave up: the others stop too
        self._changed = threading.Event()  # a 200 to a ranged request: the file changed

    @classmethod
    def resumable(cls, ctx: Any, url: str, shown: str, part: str,
                  meta: str) -> SplitDownload | None:
        """A split transfer to continue from an earlier run's sidecar, if there is one."""
        import json  # resume sidecars only

        try:
            with open(meta, encoding="utf-8") as fh:
                info = json.load(fh)
            size = os.stat(part).st_size
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict) or info.get("url") != url or "segments" not in info:
            return None
        total, validator, segments = info.get("total"), info.get("validator"), info["segments"]
        if not isinstance(total, int) or size != total or not isinstance(validator, str):
            return None
        return cls(ctx, url, shown, part, meta, total, validator, segments)

    def run(self, first: Response | None = None) -> tuple[int, str]:
        """Fetch every unfinished segment; ``first`` streams segment 0 if given."""
        fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if os.fstat(fd).st_size != self.total:
                os.ftruncate(fd, self.total)
            self._save()
            pending = [i for i, seg in enumerate(self.segments) if not seg[2]]
            here = pending[0] if first is not None and pending and pending[0] == 0 else None
            others = [i for i in pending if i != here]
            errors: list[BaseException] = []
            from concurrent.futures import ThreadPoolExecutor  # split runs only

            with ThreadPoolExecutor(max(1, len(others)),
                                    thread_name_prefix="fetcher-seg") as pool:
                futures = [pool.submit(self._segment, fd, i, None) for i in others]
                if here is not None:
                    try:
                        self._segment(fd, here, first)
                    except BaseException as exc:
                        errors.append(exc)
                for fut in futures:
                    if (failure := fut.exception()) is not None:
                        errors.append(failure)
        finally:
            os.close(fd)
        if self._changed.is_set():  # nothing of the old version may be kept
            for path in (self.part, self.meta):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            raise TransportError(f"{self.shown}: changed while downloading in segments; "
                                 "starting over", url=self.shown)
        if errors:
            raise next((e for e in errors if isinstance(e, ItemError)), errors[0])
        hasher = hashlib.sha256()
        with open(self.part, "rb") as fh:
            while buf := fh.read(_READ_BUF):
                hasher.update(buf)
        return self.total, hasher.hexdigest()

    def _segment(self, fd: int, index: int, first: Response | None) -> None:
        try:
            self._segment_with_retries(fd, index, first)
        except BaseException:
            self._failed.set()
            raise

    def _segment_with_retries(self, fd: int, index: int, first: Response | None) -> None:
        start, end, _ = self.segments[index]
        pos, tries = start, 0
        client = None
        try:
            while True:
                try:
                    if first is not None:
                        resp, first = first, None
                        pos = self._copy(fd, resp, pos, end)
                    else:
                        if client is None:
                            client = HttpClient(self.cfg, cancel=self.ctx.cancel)
                            self.ctx.clients.append(client)
                        pos = self._fetch(client, fd, pos, end)
                    if pos > end:
                        self._done(index)
                        return
                    raise TruncatedError(f"{self.shown}: segment {start}-{end} ended at {pos}",
                                         url=self.shown)
                except TransportError:
                    tries += 1
                    if tries > self.cfg.retries or self.ctx.cancel.is_set() or \
                            self._failed.is_set() or self._changed.is_set():
                        raise
                    from .download import backoff_delay

                    if self.ctx.cancel.wait(backoff_delay(self.cfg, tries)):
                        raise CancelledError(f"cancelled: {self.shown}",
                                             url=self.shown) from None
        finally:
            if client is not None:
                client.close()
                with contextlib.suppress(ValueError):
                    self.ctx.clients.remove(client)

    def _fetch(self, client: HttpClient, fd: int, pos: int, end: int) -> int:
        resp = client.get(self.url, {"Range": f"bytes={pos}-{end}",
                                     "If-Range": self.validator})
        self.ctx.track(resp, add=True)
        try:
            raise_for_status(resp, url=self.shown)
            if resp.status != 206:  # the resource changed under us: start the file over
                self._changed.set()
                raise TransportError(f"{self.shown}: changed while downloading in segments",
                                     url=self.shown)
            got = resp.headers.get("Content-Range", "")
            if not got.startswith(f"bytes {pos}-"):
                raise TransportError(f"{self.shown}: asked for bytes {pos}-{end}, got {got!r}",
                                     url=self.shown)
            return self._copy(fd, resp, pos, end)
        finally:
            self.ctx.track(resp, add=False)
            resp.release()

    def _copy(self, fd: int, resp: Response, pos: int, end: int) -> int:
        """Write the body at ``pos`` until ``end`` (inclusive); returns the next position."""
        cancel, failed = self.ctx.cancel, self._failed
        for chunk in resp.chunks(self.cfg.chunk_size):
            if cancel.is_set() or failed.is_set():
                raise CancelledError(f"cancelled: {self.shown}", url=self.shown)
            view = memoryview(chunk)[: end + 1 - pos]
            while view:
                written = os.pwrite(fd, view, pos)
                pos += written
                view = view[written:]
            if pos > end:
                break
        return pos

    def _done(self, index: int) -> None:
        with self._lock:
            self.segments[index][2] = 1
            self._save()

    def _save(self) -> None:
        import json

        data = {"url": self.url, "validator": self.validator, "total": self.total,
                "segments": self.segments}
        with open(self.meta, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data))
