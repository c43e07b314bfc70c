"""The run journal: one JSON object per item, appended and flushed as each item ends.

The manifest is append-only across runs; when a URL appears more than once, the
latest line wins. ``CompletedIndex`` reads it back so a re-run skips complete files
without a request. It keeps 64-bit digests of (url, path) and the size, not the
strings, so a million-line manifest costs tens of MiB, not hundreds.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .models import encode_record
from .naming import DigestTable

MANIFEST_NAME = "manifest.jsonl"
PUBLISHED_NAME = "published.jsonl"


_blake2b = hashlib.blake2b
_from_bytes = int.from_bytes


def item_key(url: str, path: str) -> int:
    """Nonzero 64-bit digest identifying one (url, path) pair."""
    return _from_bytes(_blake2b(f"{url}\0{path}".encode(), digest_size=8).digest(), "big") or 1


class ManifestWriter:
    """Thread-safe JSONL appender; every line is flushed to the OS as it is written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # One os.write per line on an O_APPEND descriptor: a line lands whole or, on a
        # full disk, fails; nothing sits in a userspace buffer to be torn at exit.
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        self._lock = threading.Lock()
        self.failed = False
        _end_with_newline(path, self._fd)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (raises OSError when the disk refuses it)."""
        self.write_json(encode_record(record))

    def write_json(self, text: str) -> None:
        """Append one record already encoded as a JSON object on one line."""
        line = (text + "\n").encode()
        with self._lock:
            if self._fd is None:
                raise ValueError(f"manifest {self.path} is closed")
            if self.failed:
                raise OSError(f"manifest {self.path}: an earlier write failed")
            try:
                written = os.write(self._fd, line)
                if written != len(line):  # short write: disk full mid-line
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                self.failed = True  # the next run repairs a torn last line
                raise

    def sync(self) -> None:
        """fsync the journal (at the end of a run); a refusing disk is not an error here."""
        with self._lock:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.fsync(self._fd)

    def close(self) -> None:
        """fsync and close."""
        self.sync()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _end_with_newline(path: Path, fd: int) -> None:
    """Terminate a torn last line (a killed or disk-full run) so new lines parse."""
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    os.write(fd, b"\n")
    except OSError:
        pass


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a manifest; a torn last line (killed mid-write) is ignored."""
    try:
        fh = open(path, encoding="utf-8")  # noqa: SIM115
    except FileNotFoundError:
        return
    import json  # only runs that find a manifest read one

    with fh:
        for line in fh:
            if not line.endswith("\n"):
                break  # torn write from a killed run (repaired when next opened)
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                yield rec


class CompletedIndex:
    """Which (url, path) pairs earlier runs completed, and their sizes."""

    def __init__(self, *, by_url: bool = False) -> None:
        self._sizes = DigestTable()  # two flat arrays: ~16 bytes a slot, not ~150
        # Server-chosen names (Content-Disposition) are unknown before the request, so
        # that mode also finds completed items by URL alone, at the cost of their paths.
        self._by_url: dict[str, tuple[str, int]] | None = {} if by_url else None

    def __len__(self) -> int:
        return len(self._sizes)

    def load(self, path: Path) -> CompletedIndex:
        """Fold in a journal (manifest or published log); later lines win."""
        for rec in iter_records(path):
            url, rel = rec.get("url"), rec.get("path")
            if not isinstance(url, str) or not isinstance(rel, str):
                continue
            key = item_key(url, rel)
            # A failed line does not erase an earlier success: a failed --force re-run
            # never touched the complete file, which is still there and still ours.
            if rec.get("status") in ("ok", "skipped") and isinstance(rec.get("bytes"), int) \
                    and rec["bytes"] >= 0:
                self._sizes.put(key, rec["bytes"])
                if self._by_url is not None:
                    self._by_url[url] = (rel, rec["bytes"])
        return self

    def find_url(self, url: str) -> tuple[str, int] | None:
        """(path, size) of the URL's latest complete download, when built ``by_url``."""
        return None if self._by_url is None else self._by_url.get(url)

    def size(self, url: str, path: str) -> int | None:
        """Recorded size of the pair's complete download, or None."""
        return self._sizes.get(item_key(url, path))
