"""Archive transforms: ``extract`` (zip; tar, plain or gz/bz2/xz) and ``gunzip``.

``extract`` writes the members to the directory
``DEST/.fetcher/derived/extract/<archive path>/`` and returns every extracted file.
It extracts into a temporary directory beside that one and renames it into place
only when the whole archive passed, so a refused or broken archive leaves nothing.
Refused (ProcessingError, whole archive):

* member names that are absolute, carry a drive letter, or contain ``..``;
* members that would be written through a symbolic link, or over a directory;
* symbolic links with an absolute target or that resolve outside the directory
  (checked on the finished tree, through every link); hard links to anything but a
  regular file extracted before them;
* device files, FIFOs, sockets;
* more than ``max_files`` members (default 100,000), more than ``max_size`` bytes
  in total (default 1 GiB; a zip's declared sizes are checked before anything is
  written, real bytes are counted as they are written), or expansion beyond
  ``max_ratio`` times the archive's size (default 200) once past 16 MiB.

``gunzip`` writes ``DEST/.fetcher/derived/gunzip/<path without .gz>`` (``.tgz`` becomes
``.tar``), under the same ``max_size``/``max_ratio`` limits.

Arguments: ``extract:max_size=200M,max_files=1000,max_ratio=50``, ``gunzip:max_size=2G``.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import shutil
import stat
import tarfile
import uuid
import zipfile
from pathlib import Path
from typing import IO, Protocol

from ..errors import ProcessingError
from .registry import (
    Transform,
    atomic_output,
    derived_path,
    display_path,
    parse_int,
    register,
    take,
)

DEFAULT_MAX_SIZE = 1 << 30
DEFAULT_MAX_FILES = 100_000
DEFAULT_MAX_RATIO = 200
RATIO_FLOOR = 16 << 20
"""Expansion ratios are only judged once this many bytes came out."""
_BLOCK = 1 << 20
_MAX_LINK_TARGET = 4096


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class _Budget:
    """Counts bytes written; raises once a size or ratio limit is crossed."""

    def __init__(self, t: _Limited, path: Path, dest: Path) -> None:
        self.t = t
        self.path = path
        self.dest = dest
        self.total = 0
        self.compressed = max(1, path.stat().st_size)

    def fail(self, message: str) -> ProcessingError:
        return ProcessingError(message, transform=self.t.spec,
                               path=display_path(self.path, self.dest))

    def check(self, total: int) -> None:
        if total > self.t.max_size:
            raise self.fail(f"expands to more than {self.t.max_size:,} bytes "
                            f"(max_size); refused as a possible archive bomb")
        if total > RATIO_FLOOR and total > self.t.max_ratio * self.compressed:
            raise self.fail(f"expands more than {self.t.max_ratio}x its size of "
                            f"{self.compressed:,} bytes (max_ratio); refused as a possible "
                            f"archive bomb")

    def charge(self, n: int) -> None:
        self.total += n
        self.check(self.total)

    def copy(self, src: _Readable, out: IO[bytes]) -> None:
        while block := src.read(_BLOCK):
            self.charge(len(block))
            out.write(block)


class _Limited(Transform):
    options: tuple[str, ...] = ("max_size", "max_ratio")

    def __init__(self, spec: str, args: dict[str, str]) -> None:
        super().__init__(spec, args)
        take(args, spec, self.options)
        self.max_size = parse_int(spec, "max_size", args["max_size"]) \
            if "max_size" in args else DEFAULT_MAX_SIZE
        self.max_ratio = parse_int(spec, "max_ratio", args["max_ratio"]) \
            if "max_ratio" in args else DEFAULT_MAX_RATIO


def _safe_parts(name: str, budget: _Budget) -> tuple[str, ...]:
    """Member name -> path components, refusing anything that could leave the root."""
    n = name.replace("\\", "/")
    if "\x00" in n:
        raise budget.fail(f"member {name!r} has a NUL byte in its name")
    if n.startswith("/") or re.match(r"^[A-Za-z]:", n):
        raise budget.fail(f"member {name!r} has an absolute path")
    parts = tuple(p for p in n.split("/") if p not in ("", "."))
    if ".." in parts:
        raise budget.fail(f"member {name!r} would be written outside the target directory")
    return parts


class _Extractor:
    """Writes members under ``root``, never following a link while doing so."""

    def __init__(self, root: Path, budget: _Budget, max_files: int) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self.budget = budget
        self.max_files = max_files
        self.count = 0
        self.links: list[tuple[str, ...]] = []
        self.outputs: list[tuple[str, ...]] = []

    def member(self, name: str) -> tuple[str, ...]:
        self.count += 1
        if self.count > self.max_files:
            raise self.budget.fail(f"has more than {self.max_files:,} members (max_files)")
        return _safe_parts(name, self.budget)

    def mkdirs(self, parts: tuple[str, ...]) -> Path:
        cur = self.root
        for part in parts:
            cur = cur / part
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                os.mkdir(cur)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise self.budget.fail(f"member path {'/'.join(parts)!r} goes through a "
                                       f"symbolic link")
            if not stat.S_ISDIR(st.st_mode):
                raise self.budget.fail(f"member path {'/'.join(parts)!r} goes through a file")
        return cur

    def _target(self, parts: tuple[str, ...]) -> Path:
        if not parts:
            raise self.budget.fail("a member has an empty name")
        target = self.mkdirs(parts[:-1]) / parts[-1]
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            return target
        if stat.S_ISDIR(st.st_mode):
            raise self.budget.fail(f"member {'/'.join(parts)!r} would replace a directory")
        os.unlink(target)  # a later member of the same name wins; never write through it
        if parts in self.links:
            self.links.remove(parts)
        with contextlib.suppress(ValueError):
            self.outputs.remove(parts)
        return target

    def file(self, parts: tuple[str, ...], src: IO[bytes], executable: bool) -> None:
        target = self._target(parts)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(target, flags, 0o755 if executable else 0o644)
        with os.fdopen(fd, "wb") as out:
            self.budget.copy(src, out)
        self.outputs.append(parts)

    def symlink(self, parts: tuple[str, ...], link: str) -> None:
        where = "/".join(parts)
        if not link or "\x00" in link or len(link) > _MAX_LINK_TARGET:
            raise self.budget.fail(f"symbolic link {where!r} has an invalid target")
        if link.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", link):
            raise self.budget.fail(f"symbolic link {where!r} points to an absolute path "
                                   f"{link!r}")
        lexical = os.path.normpath(os.path.join(os.path.dirname(where), link))
        if lexical == ".." or lexical.startswith(("../", "/")):
            raise self.budget.fail(f"symbolic link {where!r} points outside the target "
                                   f"directory ({link!r})")
        os.symlink(link, self._target(parts))
        self.links.append(parts)
        self.outputs.append(parts)

    def hardlink(self, parts: tuple[str, ...], link: str) -> None:
        where = "/".join(parts)
        src = self.root.joinpath(*_safe_parts(link, self.budget))
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode) or not self._inside(src):
            raise self.budget.fail(f"hard link {where!r} points to {link!r}, which is not a "
                                   f"file extracted before it")
        target = self._target(parts)
        try:
            os.link(src, target)
        except OSError:
            with open(src, "rb") as s, open(target, "xb") as out:
                self.budget.copy(s, out)
        self.outputs.append(parts)

    def _inside(self, p: Path) -> bool:
        real = os.path.realpath(p)
        return real == self.real_root or real.startswith(self.real_root + os.sep)

    def check_links(self) -> None:
        """Every link must resolve inside the root, following all links on the way."""
        for parts in self.links:
            if not self._inside(self.root.joinpath(*parts)):
                raise self.budget.fail(f"symbolic link {'/'.join(parts)!r} resolves outside "
                                       f"the target directory")

    # -- formats
    def zip(self, path: Path) -> None:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > self.max_files:
                raise self.budget.fail(f"has {len(infos):,} members, more than "
                                       f"{self.max_files:,} (max_files)")
            self.budget.check(sum(i.file_size for i in infos))  # declared sizes, up front
            for info in infos:
                parts = self.member(info.filename)
                mode = info.external_attr >> 16
                kind = stat.S_IFMT(mode)
                if info.is_dir():
                    self.mkdirs(parts)
                elif kind == stat.S_IFLNK:
                    if info.file_size > _MAX_LINK_TARGET:
                        raise self.budget.fail(f"symbolic link {info.filename!r} is too long")
                    target = zf.read(info).decode("utf-8", "surrogateescape")
                    self.symlink(parts, target)
                elif kind not in (0, stat.S_IFREG):
                    raise self.budget.fail(f"member {info.filename!r} is a device or special "
                                           f"file")
                else:
                    with zf.open(info) as src:
                        self.file(parts, src, bool(mode & 0o111))

    def tar(self, path: Path) -> None:
        with tarfile.open(path, mode="r:*") as tf:
            for m in tf:  # streamed: a bomb is stopped before it is read to the end
                parts = self.member(m.name)
                if m.isdir():
                    self.mkdirs(parts)
                elif m.isreg():
                    self.budget.check(self.budget.total + m.size)
                    src = tf.extractfile(m)
                    if src is None:  # pragma: no cover - isreg() members always have data
                        raise self.budget.fail(f"member {m.name!r} has no data")
                    with src:
                        self.file(parts, src, bool(m.mode & 0o111))
                elif m.issym():
                    self.symlink(parts, m.linkname)
                elif m.islnk():
                    self.hardlink(parts, m.linkname)
                else:
                    raise self.budget.fail(f"member {m.name!r} is a device, FIFO or other "
                                           f"special file")


@register("extract")
class Extract(_Limited):
    """Unpack a zip or tar archive safely (see the module docstring)."""

    suffixes = (".zip", ".tar", ".tgz", ".tar.gz", ".tbz2", ".tar.bz2", ".txz", ".tar.xz")
    options = ("max_size", "max_ratio", "max_files")

    def __init__(self, spec: str, args: dict[str, str]) -> None:
        super().__init__(spec, args)
        self.max_files = parse_int(spec, "max_files", args["max_files"]) \
            if "max_files" in args else DEFAULT_MAX_FILES

    def apply(self, path: Path, dest: Path) -> list[Path]:
        budget = _Budget(self, path, dest)
        if zipfile.is_zipfile(path):
            kind = "zip"
        elif tarfile.is_tarfile(path):
            kind = "tar"
        else:
            raise budget.fail("not a zip or tar archive")
        final = derived_path(path, dest, self.name)
        final.parent.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:12]
        tmp = final.with_name(f".{final.name}.{tag}.tmp")
        tmp.mkdir()
        try:
            x = _Extractor(tmp, budget, self.max_files)
            if kind == "zip":
                x.zip(path)
            else:
                x.tar(path)
            x.check_links()
            if os.path.lexists(final):
                old = final.with_name(f".{final.name}.{tag}.old")
                os.rename(final, old)
                os.rename(tmp, final)
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink()
            else:
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return [final.joinpath(*parts) for parts in x.outputs]


@register("gunzip")
class Gunzip(_Limited):
    """Decompress a gzip file (size- and ratio-limited)."""

    suffixes = (".gz", ".tgz")

    def apply(self, path: Path, dest: Path) -> list[Path]:
        budget = _Budget(self, path, dest)
        with open(path, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                raise budget.fail("not a gzip file")
        name = path.name
        if name.lower().endswith(".tgz"):
            name = name[:-4] + ".tar"
        elif name.lower().endswith(".gz"):
            name = name[:-3] or "out"
        else:
            name += ".out"
        final = derived_path(path, dest, self.name).with_name(name)
        with gzip.open(path, "rb") as src, atomic_output(final) as tmp, open(tmp, "wb") as out:
            budget.copy(src, out)
        return [final]
