"""Output names: URL or header -> safe relative path, collisions, and joining under DEST.

Pure functions plus :class:`NameAllocator`; nothing here touches the network, and only
:func:`safe_join` and :meth:`NameAllocator.reserve_free` (through its callback) look at
the disk.

Rules shared by every function that returns a path:

- relative, ``/``-separated, never empty, never absolute, no ``..`` component, no NUL
  or other control character; a backslash counts as a separator;
- each component at most 255 bytes of UTF-8 (longer ones are shortened, keeping the
  extension and adding a short hash so distinct names stay distinct);
- the first component is never ``.fetcher`` (any case): that is our bookkeeping dir.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import threading
from array import array
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

from .errors import UnsafePathError

__all__ = [
    "MAX_COMPONENT_BYTES",
    "MAX_PATH_BYTES",
    "RESERVED_DIR",
    "NameAllocator",
    "filename_from_content_disposition",
    "path_from_url",
    "safe_join",
    "sanitize_relpath",
    "variant",
]

MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096
RESERVED_DIR = ".fetcher"
DEFAULT_NAME = "index.html"

# C0 and C1 controls, DEL, and lone surrogates (undecodable bytes / broken UTF-16).
# Patterns are compiled on first use (re caches them): this one alone costs ~0.75 ms,
# and str.isprintable() rules all of them out for almost every name.
_BAD_CHARS = "[\x00-\x1f\x7f-\x9f\ud800-\udfff]"
_EXT = r"\.[A-Za-z0-9_-]{1,15}\Z"
_COMPOUND_EXTS = (".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tar.lz", ".tar.lzma",
                  ".tar.z")


def _has_bad_chars(text: str) -> bool:
    """Whether ``text`` holds a character of ``_BAD_CHARS``; all of them are unprintable."""
    return not text.isprintable() and re.search(_BAD_CHARS, text) is not None


def _is_drive(name: str) -> bool:
    """Whether ``name`` starts like a Windows drive: an ASCII letter, then ``:``."""
    return name[1:2] == ":" and name[0].isascii() and name[0].isalpha()


_blake2b = hashlib.blake2b
_from_bytes = int.from_bytes


def _digest(text: str) -> int:
    """A 64-bit digest of ``text``, never 0 (0 marks an empty slot)."""
    data = text.encode("utf-8", "surrogatepass")
    return _from_bytes(_blake2b(data, digest_size=8).digest(), "little") or 1


def _split_ext(name: str) -> tuple[str, str]:
    """``name`` as (stem, extension); ``archive.tar.gz`` -> (``archive``, ``.tar.gz``).

    A leading dot does not start an extension (``.bashrc`` has none), and only short
    alphanumeric suffixes count, so ``Mr. Smith goes`` has none either.
    """
    lower = name.lower()
    for ext in _COMPOUND_EXTS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext):]
    m = re.search(_EXT, name)
    if m is None or m.start() == 0:
        return name, ""
    return name[: m.start()], name[m.start():]


def _fit_component(name: str) -> str:
    """Shorten ``name`` to MAX_COMPONENT_BYTES, keeping the extension and adding a hash."""
    if len(name) * 4 <= MAX_COMPONENT_BYTES:  # fast path: cannot be too long
        return name
    raw = name.encode("utf-8")
    if len(raw) <= MAX_COMPONENT_BYTES:
        return name
    stem, ext = _split_ext(name)
    tag = f"~{_digest(name) & 0xFFFFFFFF:08x}"
    room = MAX_COMPONENT_BYTES - len(ext.encode("utf-8")) - len(tag)
    short = stem.encode("utf-8")[:room].decode("utf-8", "ignore")
    return f"{short}{tag}{ext}"


def _components(path: str, *, url: str) -> list[str]:
    """Split and check ``path`` for traversal; collapse ``.`` and empty components."""
    def unsafe(reason: str) -> UnsafePathError:
        return UnsafePathError(reason, path=path, url=url)

    if not path:
        raise unsafe("empty path")
    if _has_bad_chars(path):
        raise unsafe("contains a NUL, control or undecodable character")
    if path[0] in "/\\":
        raise unsafe("absolute path")
    if _is_drive(path):
        raise unsafe("Windows drive prefix")
    parts = [p for p in path.replace("\\", "/").split("/") if p and p != "."]
    if ".." in parts:
        raise unsafe("'..' component")
    if not parts:
        raise unsafe("empty path")
    return parts


def _join_checked(parts: list[str], *, path: str, url: str) -> str:
    result = "/".join(_fit_component(p) for p in parts)
    if len(result) > MAX_PATH_BYTES // 4 and len(result.encode("utf-8")) > MAX_PATH_BYTES:
        raise UnsafePathError(f"longer than {MAX_PATH_BYTES} bytes", path=path, url=url)
    return result


def sanitize_relpath(path: str, *, url: str = "") -> str:
    """Check and normalise an output path given explicitly by the URL list.

    Returns the path ``/``-joined with ``.`` and empty components collapsed and
    overlong components shortened. Raises UnsafePathError for an empty or absolute
    path, a ``..`` component, a NUL or control character, a Windows drive prefix, a
    trailing separator (a directory, not a file name), a first component ``.fetcher``,
    or more than 4096 bytes in all. ``url`` is only used in the error.
    """
    parts = _components(path, url=url)
    if path[-1] in "/\\":
        raise UnsafePathError("names a directory (ends with a separator)", path=path, url=url)
    if parts[0].casefold() == RESERVED_DIR:
        raise UnsafePathError(f"{RESERVED_DIR!r} is reserved for fetcher's own files",
                              path=path, url=url)
    return _join_checked(parts, path=path, url=url)


def _clean_segment(segment: str) -> str:
    """Percent-decode one URL path segment into a harmless file name component."""
    name = unquote(segment, errors="replace") if "%" in segment else segment
    name = name.replace("/", "_").replace("\\", "_")
    if _has_bad_chars(name):
        name = re.sub(_BAD_CHARS, "_", name)
    return name


def path_from_url(url: str) -> str:
    """The output path for ``url``: its path with the host dropped (like ``wget -nH -x``).

    Percent-decoded (``%2F`` inside a segment becomes ``_``, never a separator), query
    and fragment stripped, ``index.html`` for an empty last segment. ``.`` and ``..``
    segments are resolved like a browser does, clamped at the root, so the result never
    escapes; control characters become ``_``; a first component ``.fetcher`` becomes
    ``_.fetcher``. Never raises for a URL that :func:`~fetcher.sources.validate_url`
    accepts.
    """
    rest = url.partition("://")[2] if "://" in url else url
    if "?" in rest or "#" in rest:
        end = len(rest)
        for ch in "?#":
            i = rest.find(ch)
            if i != -1 and i < end:
                end = i
        rest = rest[:end]
    slash = rest.find("/")
    if slash == -1:
        raw = [""]
    else:
        path = rest[slash + 1:]
        # The common case: nothing to decode, resolve, replace or shorten, so the
        # general steps below would return ``path`` itself.
        if (path and len(path) <= MAX_COMPONENT_BYTES and path.isascii()
                and path.isprintable() and "%" not in path and "\\" not in path
                and "//" not in path and "/." not in path and path[0] not in "./"
                and path[-1] != "/" and path[1:2] != ":"):
            return path
        raw = path.split("/")
    parts: list[str] = []
    name = ""
    for segment in raw:
        name = _clean_segment(segment)
        if name == "..":
            if parts:
                parts.pop()
        elif name and name != ".":
            parts.append(name)
    if name in ("", ".", ".."):  # the last segment names no file
        parts.append(DEFAULT_NAME)
    if parts[0].casefold() == RESERVED_DIR:
        parts[0] = "_" + parts[0]
    if _is_drive(parts[0]):
        parts[0] = parts[0][0] + "_" + parts[0][2:]
    try:
        return _join_checked(parts, path=url, url=url)
    except UnsafePathError:
        # Too long in all: keep the file name under a directory named by a hash.
        return f"_long/{_digest(url):016x}/{_fit_component(parts[-1])}"


_CD_PARAM = r""";\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"?|[^;]*)"""


def filename_from_content_disposition(header: str | None) -> str | None:
    """The file name a Content-Disposition header suggests, as a safe basename, or None.

    ``filename*=`` (RFC 5987/6266, UTF-8 or ISO-8859-1) is preferred over ``filename=``.
    Directory parts (``/`` or ``\\``) are stripped. None when there is no usable name:
    absent, empty, ``.``/``..``/``.fetcher``, a control character, a drive prefix, or
    longer than 255 bytes, so the caller falls back to the URL's name.
    """
    if not header:
        return None
    params: dict[str, str] = {}
    for m in re.finditer(_CD_PARAM, ";" + header.partition(";")[2]):
        key = m.group(1).lower()
        if key not in params:
            params[key] = m.group(2).strip()
    name: str | None = None
    extended = params.get("filename*")
    if extended:
        charset, _, rest = extended.strip('"').partition("'")
        _, _, encoded = rest.partition("'")
        if charset.lower() in ("utf-8", "iso-8859-1") and encoded:
            try:
                name = unquote(encoded, encoding=charset.lower(), errors="strict")
            except UnicodeDecodeError:
                name = None
    if name is None and "filename" in params:
        value = params["filename"]
        if value.startswith('"'):
            value = value[1:-1] if value.endswith('"') and len(value) > 1 else value[1:]
            # Only \" and \\ are unescaped: senders put raw Windows paths in here.
            value = re.sub(r'\\(["\\])', r"\1", value)
        # Servers often send raw UTF-8, which HTTP libraries decode as Latin-1.
        with contextlib.suppress(UnicodeEncodeError, UnicodeDecodeError):
            value = value.encode("latin-1").decode("utf-8")
        name = value
    if name is None:
        return None
    name = name.replace("\\", "/").rpartition("/")[2].strip()
    if (
        not name
        or name in (".", "..")
        or name.casefold() == RESERVED_DIR
        or _has_bad_chars(name)
        or _is_drive(name)
        or len(name.encode("utf-8")) > MAX_COMPONENT_BYTES
    ):
        return None
    return name


def variant(path: str, n: int) -> str:
    """The ``n``-th alternative name for ``path``: ``dir/name.ext`` -> ``dir/name.{n}.ext``.

    ``archive.tar.gz`` -> ``archive.1.tar.gz``; ``README`` -> ``README.1``;
    ``.bashrc`` -> ``.bashrc.1``. ``variant(path, 0)`` is ``path`` itself.
    """
    if n == 0:
        return path
    head, sep, base = path.rpartition("/")
    stem, ext = _split_ext(base)
    return f"{head}{sep}{_fit_component(f'{stem}.{n}{ext}')}"


class DigestTable:
    """An open-addressing map from nonzero 64-bit ints to 64-bit ints in two arrays.

    About 16 bytes per slot at a load of 3/8 to 3/4, against ~150 bytes per entry for a
    dict of Python ints: what keeps a million names in a few tens of MB.
    """

    __slots__ = ("_keys", "_mask", "_used", "_vals")

    def __init__(self, capacity: int = 1024) -> None:
        self._keys = array("Q", [0]) * capacity
        self._vals = array("Q", [0]) * capacity
        self._mask = capacity - 1
        self._used = 0

    def __len__(self) -> int:
        return self._used

    def get(self, key: int) -> int | None:
        keys, mask = self._keys, self._mask
        i = key & mask
        while True:
            k = keys[i]
            if k == key:
                return self._vals[i]
            if k == 0:
                return None
            i = (i + 1) & mask

    def put_new(self, key: int, value: int) -> int | None:
        """Store ``value`` under ``key`` unless ``key`` is present; return the value it
        already had, else None (``get`` then ``put`` in one probe)."""
        keys, mask = self._keys, self._mask
        i = key & mask
        while True:
            k = keys[i]
            if k == key:
                return self._vals[i]
            if k == 0:
                keys[i] = key
                self._vals[i] = value
                self._used += 1
                if self._used * 4 > 3 * len(keys):
                    self._grow()
                return None
            i = (i + 1) & mask

    def put(self, key: int, value: int) -> None:
        keys, mask = self._keys, self._mask
        i = key & mask
        while True:
            k = keys[i]
            if k == 0:
                keys[i] = key
                self._vals[i] = value
                self._used += 1
                if self._used * 4 > 3 * len(keys):
                    self._grow()
                return
            if k == key:
                self._vals[i] = value
                return
            i = (i + 1) & mask

    def _grow(self) -> None:
        old_keys, old_vals = self._keys, self._vals
        capacity = 2 * len(old_keys)
        keys = array("Q", [0]) * capacity
        vals = array("Q", [0]) * capacity
        mask = capacity - 1
        for k, v in zip(old_keys, old_vals, strict=True):
            if k:
                i = k & mask
                while keys[i]:
                    i = (i + 1) & mask
                keys[i] = k
                vals[i] = v
        self._keys, self._vals, self._mask = keys, vals, mask

    def nbytes(self) -> int:
        return (len(self._keys) + len(self._vals)) * 8


class NameAllocator:
    """Hands out output paths over one run so two URLs never share one (thread-safe).

    Only 64-bit digests are stored (about 20-45 bytes per claimed path), so a
    million-URL list costs tens of MB, not hundreds. Two different names with equal
    digests (odds ~1e-8 for a million names) would be treated as one and the later one
    renamed, never overwritten.

    Results are deterministic in call order: claim in list order and a re-run of the
    same list yields the same names.
    """

    _RESERVED_OWNER = 1  # owner digest of paths taken by reserve_free without a url

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # One table for everything, keys separated by prefix:
        #   "P" + path        -> digest of the url that owns the path
        #   "D" + url + path  -> 1 when url got a variant of path (duplicate detection)
        #   "N"/"R" + path    -> next variant number to try in claim / reserve_free
        self._table = DigestTable()

    def __len__(self) -> int:
        """Entries stored (claimed paths plus collision bookkeeping)."""
        return len(self._table)

    def claim(self, url: str, path: str) -> str | None:
        """The path ``url`` should use, given the ``path`` it asks for.

        ``path`` itself when free; None when this ``url`` already asked for ``path``
        (a duplicate line: fetch it once); otherwise the first ``variant(path, n)``,
        n >= 1, that nobody has claimed.
        """
        owner = _digest("U" + url)
        key = _digest("P" + path)
        with self._lock:
            table = self._table
            current = table.put_new(key, owner)
            if current is None:
                return path
            if current == owner:
                return None
            dup_key = _digest(f"D{url}\0{path}")
            if table.get(dup_key) is not None:
                return None
            hint_key = _digest("N" + path)
            n = table.get(hint_key) or 1
            while True:
                candidate = variant(path, n)
                cand_key = _digest("P" + candidate)
                if table.get(cand_key) is None:
                    table.put(cand_key, owner)
                    table.put(dup_key, 1)
                    table.put(hint_key, n + 1)
                    return candidate
                n += 1

    def reserve_free(self, path: str, exists: Callable[[str], bool], *, url: str = "") -> str:
        """Claim and return the first of ``path``, ``variant(path, 1)``, ... that is
        neither claimed nor ``exists()`` (used by on-exists=rename).

        ``exists`` receives the relative candidate path. ``url`` is recorded as the
        owner when given.
        """
        owner = _digest("U" + url) if url else self._RESERVED_OWNER
        with self._lock:
            table = self._table
            key = _digest("P" + path)
            if table.get(key) is None and not exists(path):
                table.put(key, owner)
                return path
            hint_key = _digest("R" + path)
            n = table.get(hint_key) or 1
            while True:
                candidate = variant(path, n)
                cand_key = _digest("P" + candidate)
                if table.get(cand_key) is None and not exists(candidate):
                    table.put(cand_key, owner)
                    table.put(hint_key, n + 1)
                    return candidate
                n += 1

    def is_claimed(self, path: str) -> bool:
        """True when some URL (or reserve_free) has taken ``path``."""
        key = _digest("P" + path)
        with self._lock:
            return self._table.get(key) is not None

    def memory_bytes(self) -> int:
        """Bytes held by the digest table (for diagnostics and tests)."""
        with self._lock:
            return self._table.nbytes()


def safe_join(dest: Path, rel: str) -> Path:
    """The absolute target path for ``rel`` under ``dest``, refusing to follow symlinks.

    ``rel`` should come from :func:`sanitize_relpath` or :func:`path_from_url` (the
    ``.fetcher`` directory is allowed here, for fetcher's own files). Raises
    UnsafePathError if ``rel`` is absolute or has a ``..`` component, or if any existing
    component below ``dest`` (the target included) is a symlink: a link planted inside
    DEST must never redirect a write outside it. ``dest`` itself may be a symlink.
    Costs one lstat per existing component; no realpath.
    """
    parts = _components(rel, url="")
    base = dest.absolute()
    current = os.fspath(base)
    for i, part in enumerate(parts):
        current = os.path.join(current, part)
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            break  # nothing below a missing component exists either
        except NotADirectoryError:
            raise UnsafePathError(f"{'/'.join(parts[:i])!r} is not a directory",
                                  path=rel) from None
        if stat.S_ISLNK(mode):
            raise UnsafePathError(f"{'/'.join(parts[: i + 1])!r} is a symlink", path=rel)
        if i < len(parts) - 1 and not stat.S_ISDIR(mode):
            raise UnsafePathError(f"{'/'.join(parts[: i + 1])!r} is not a directory",
                                  path=rel)
    return base.joinpath(*parts)
