"""DEST's directories during one run: which are checked (no symlink on the way), and
which are the run's own, where a file needs no lstat before it is planned.

``RunContext`` (``download.py``) is a ``DestDirs``; the downloads, the small-file loop
and the fan-out and cluster planners ask it through ``target``, ``exists``,
``ensure_parent`` and ``forget``.
"""

from __future__ import annotations

import functools
import os
import stat
import threading
from pathlib import Path

from .naming import RESERVED_DIR, safe_join


class DestDirs:
    """What one run knows of the directories below DEST (thread-safe)."""

    def __init__(self, dest: Path, dirs: set[str] | None = None) -> None:
        self.dest = dest
        self._dirs_lock = threading.Lock()
        self._dirs: set[str] = dirs if dirs is not None else set()
        """Directories below DEST checked (no symlink on the way) during this run."""
        self.trust_fresh = False
        """Whether ``exists`` may skip the lstat in directories this run made (see
        there): set by a run in which nothing but its downloads writes into DEST (no
        --post, whose own functions may write anywhere; no sink, whose shards may)."""
        self._fresh: dict[str, bool] = {}
        """Directories (``""``: DEST) by ``_classify``: whether they are this run's."""
        self._dest_cs = False

    @functools.cached_property
    def dest_str(self) -> str:
        return os.fspath(self.dest)

    def target(self, rel: str) -> tuple[Path, bool]:
        """The checked absolute path for ``rel`` and whether something is there already.

        Directories verified once (no symlink on the way) are remembered for the run, so
        the per-file cost is one lstat instead of one per path component.
        """
        parent = rel.rpartition("/")[0]
        if parent and parent not in self._dirs:
            path = safe_join(self.dest, rel)
            exists = os.path.lexists(path)
            if os.path.isdir(path.parent):
                self._checked(parent)
            return path, exists
        path = self.dest / rel
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return path, False
        if stat.S_ISLNK(mode):
            return safe_join(self.dest, rel), True  # raises UnsafePathError
        return path, True

    def exists(self, rel: str, *, look: bool = False) -> bool:
        """Whether something is at ``rel`` (``target`` without building a Path).

        With ``trust_fresh``, an ASCII file name in a directory that is this run's
        (``_classify``) needs no lstat: every entry there is then one of the run's files,
        whose names its name table keeps apart, or one of the directories its items need,
        which are known (``planned``) and looked up. Anywhere else one lstat a file, since
        an earlier run's or someone else's files are there; so for other names, which a
        file system may fold together by Unicode normalisation; and with ``look``.
        """
        parent = rel.rpartition("/")[0]
        if self.trust_fresh and not look:
            fresh = self._fresh.get(parent)
            if fresh is None:
                fresh = self._classify(parent)
            if fresh and rel.isascii() and rel not in self._fresh and rel not in self._dirs:
                return False
        if parent and parent not in self._dirs:
            # The first directory below the deepest checked one: when it is missing,
            # nothing below it exists and no link is on the way. The common case while
            # a run plans ahead of its first file in a new directory.
            known = parent.rpartition("/")[0]
            while known and known not in self._dirs:
                known = known.rpartition("/")[0]
            first = parent[len(known) + 1 if known else 0:].partition("/")[0]
            try:
                os.lstat(f"{self.dest_str}/{known}/{first}" if known
                         else f"{self.dest_str}/{first}")
            except FileNotFoundError:
                return False
            except NotADirectoryError:
                return self._recheck(rel)
            return self.target(rel)[1]
        try:
            mode = os.lstat(self.dest_str + "/" + rel).st_mode
        except FileNotFoundError:
            return False
        except NotADirectoryError:
            return self._recheck(rel)
        if stat.S_ISLNK(mode):
            safe_join(self.dest, rel)  # raises UnsafePathError
        return True

    def planned(self, rel: str) -> None:
        """``rel`` will be published without ``exists`` asked (an item the manifest says
        its URL owns): its directories are noted all the same, so that a later file
        named like one of them is looked up."""
        if self.trust_fresh:
            parent = rel.rpartition("/")[0]
            if parent not in self._fresh:
                self._classify(parent)

    def _classify(self, parent: str) -> bool:
        """Whether directory ``parent`` (``""``: DEST) is this run's, decided when the
        run first plans a file into it or below it, before any of its files is there,
        and remembered for the run: DEST when it holds only ``.fetcher``; a directory
        in one that is; a directory directly in DEST that is missing then. DEST's file
        system must tell names apart by case (``A.bin`` and ``a.bin`` are one file
        elsewhere, though two names to the name table); directories below one that
        already existed are never the run's (it may be another file system)."""
        chain = []
        d = parent
        while d not in self._fresh:
            chain.append(d)
            if not d:
                break
            d = d.rpartition("/")[0]
        if d in self._fresh:
            fresh = self._fresh[d]
        else:
            chain.pop()
            fresh = self._fresh[""] = self._new_dest()
        for d in reversed(chain):
            if not fresh and self._dest_cs and "/" not in d:
                try:
                    os.lstat(f"{self.dest_str}/{d}")
                except FileNotFoundError:
                    fresh = True
                except OSError:
                    pass
            self._fresh[d] = fresh
        return fresh

    def _new_dest(self) -> bool:
        """Whether DEST holds nothing but fetcher's own ``.fetcher`` (a manifest or sink
        the user put in DEST makes it not empty, so files named like them are seen); also
        notes whether its file system tells names apart by case."""
        try:
            cased = RESERVED_DIR.upper()
            self._dest_cs = os.path.isdir(f"{self.dest_str}/{RESERVED_DIR}") \
                and not os.path.lexists(f"{self.dest_str}/{cased}")
            with os.scandir(self.dest_str) as entries:
                return self._dest_cs and all(e.name == RESERVED_DIR for e in entries)
        except OSError:
            return False

    def ensure_parent(self, rel: str) -> None:
        """Create (and check, once per run) the directories above ``rel``."""
        parent = rel.rpartition("/")[0]
        if parent and parent not in self._dirs:
            above = parent.rpartition("/")[0]
            if not above or above in self._dirs:
                # One new directory below a checked one: made here, it is no link.
                try:
                    os.mkdir(f"{self.dest_str}/{parent}")
                except (FileExistsError, FileNotFoundError, NotADirectoryError):
                    pass  # made meanwhile, something else there, or the one above
                    # removed or replaced: the full check, which makes what is missing
                else:
                    self._checked(parent)
                    return
            path = safe_join(self.dest, rel)  # re-check: the directory may have appeared
            path.parent.mkdir(parents=True, exist_ok=True)
            self._checked(parent)

    def forget(self, rel: str) -> None:
        """Check the directories above ``rel`` again (one was removed or replaced). What
        ``_classify`` decided stays: those above it are still there, and their names
        are still the run's directories, which ``exists`` must keep looking up."""
        parent = rel.rpartition("/")[0]
        with self._dirs_lock:
            while parent:
                self._dirs.discard(parent)
                parent = parent.rpartition("/")[0]

    def _recheck(self, rel: str) -> bool:
        """A file where a checked directory was: the full check (UnsafePathError)."""
        self.forget(rel)
        return self.target(rel)[1]

    def _checked(self, parent: str) -> None:
        """Remember ``parent`` and the directories above it (safe_join checked them all)."""
        with self._dirs_lock:
            while parent and parent not in self._dirs:
                self._dirs.add(parent)
                parent = parent.rpartition("/")[0]
