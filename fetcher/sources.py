"""URL lists: text, CSV/TSV, JSONL, stdin and in-memory iterables, streamed into Jobs.

Every format is read lazily, one line (or record) at a time, so a list of any size
iterates in constant memory. Every problem raises :class:`~fetcher.errors.UrlListError`
naming the source and the 1-based line, at the moment the bad line is reached.

Formats (chosen by ``fmt``, else by the file extension, else text):

- text (``.txt`` and anything else): ``URL [PATH]`` per line; blank lines and lines
  starting with ``#`` are skipped, and a later field starting with ``#`` begins a
  trailing comment (so a PATH cannot start with ``#``; use CSV for that).
- CSV (``.csv``) and TSV (``.tsv``): a header row with a ``url`` column (any case);
  ``path`` and ``sha256`` are optional; other columns are carried in ``Job.extra``.
- JSONL (``.jsonl``, ``.ndjson``): one JSON object per line with the same keys.

A trailing ``.gz``, ``.bz2`` or ``.xz`` is decompressed on the fly (``urls.csv.gz``).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, TYPE_CHECKING, Any, TypeAlias, cast

from .errors import ConfigError, UrlListError
from .models import Job

if TYPE_CHECKING:
    import csv

__all__ = ["FORMATS", "UrlSource", "detect_format", "iter_jobs", "validate_sha256", "validate_url"]

UrlSource: TypeAlias = "str | os.PathLike[str] | IO[Any] | Iterable[str | Mapping[str, Any] | Job]"
"""What :func:`iter_jobs` accepts."""

FORMATS: tuple[str, ...] = ("text", "csv", "tsv", "jsonl")
_FORMAT_ALIASES = {"txt": "text", "ndjson": "jsonl"}
_EXT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_COMPRESSED = (".gz", ".bz2", ".xz")

MAX_LINE = 1 << 20
"""Longest accepted line, in characters; longer ones are an error, not a memory spike."""

_RESERVED_KEYS = frozenset({"url", "path", "sha256"})

# The authority part of an http(s) URL, then the end or one of "/?#": userinfo (RFC 3986
# characters; a raw "@" is tolerated, the last one ends it), a host (dot-separated
# labels of letters, digits, "-", "_" or non-ASCII; or an [IPv6] literal, checked with
# ipaddress afterwards) and an optional port.
# The classes are written negated (every ASCII character not allowed): the same sets as
# [A-Za-z0-9_\-\u0080-\U0010ffff] and [A-Za-z0-9._~!$&'()*+,;=:%@\-\u0080-\U0010ffff], but
# compiled in well under a millisecond instead of 11 ms, which every run paid at start.
# Plain URLs (lowercase scheme, ASCII host name, port) never need it: see validate_url.
_LABEL = r"[^\x00-\x2c./\x3a-\x40\x5b-\x5e\x60\x7b-\x7f]+"
_URL_PATTERN = (
    r"[hH][tT][tT][pP][sS]?://"
    r"(?:[^\x00-\x20\"#/<>?\x5b-\x5e\x60\x7b-\x7d\x7f]*@)?"
    rf"(\[[0-9A-Fa-f:.]+(?:%25[A-Za-z0-9._~%\-]+)?\]|{_LABEL}(?:\.{_LABEL})*\.?)"
    r"(?::(\d{0,5}))?"
    r"(?=[/?#]|\Z)"
)
_SHA256_PATTERN = r"[0-9a-fA-F]{64}"
# Lone surrogates are what surrogateescape makes of bytes that are not UTF-8.
_UNDECODABLE_PATTERN = "[\udc80-\udcff]"


# Compiled on first use: a plain-text list of plain URLs needs none of them.
@functools.cache
def _url_re() -> re.Pattern[str]:
    return re.compile(_URL_PATTERN)


@functools.cache
def _sha256_re() -> re.Pattern[str]:
    return re.compile(_SHA256_PATTERN)


@functools.cache
def _undecodable_re() -> re.Pattern[str]:
    return re.compile(_UNDECODABLE_PATTERN)


_PLAIN_AUTHORITIES: set[str] = set()
"""Authorities ``_plain_authority`` accepted (a list names few hosts); bounded."""


def _plain_authority(authority: str) -> bool:
    """Whether ``_URL_PATTERN`` accepts ``authority`` (ASCII, after ``scheme://``, up to
    ``/``) with no userinfo: dot-separated labels of letters, digits, ``-`` and ``_``
    (optionally a final dot), then an optional port of at most 5 digits up to 65535
    (``?`` and ``#`` are in no label). False means "ask the regex", not "invalid"."""
    host, _, port = authority.partition(":")
    if port and not (len(port) <= 5 and port.isdigit() and int(port) <= 65535):
        return False
    if host[-1:] == ".":
        host = host[:-1]
    for label in host.split("."):
        if not (label.isalnum() or label.replace("-", "a").replace("_", "a").isalnum()):
            return False
    return True


def _short(value: str, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_url(url: str, *, source: str = "<list>", line: int | None = None) -> str:
    """Check that ``url`` is an absolute http(s) URL and return it normalised.

    The scheme must be ``http`` or ``https`` (any case; lowercased in the result), a
    host must be present, a port (if any) must be 0-65535, and the URL must not contain
    whitespace, control or undecodable characters. Raises UrlListError naming
    ``source`` and ``line``.
    """
    if url.isprintable() and " " not in url:
        start = 7 if url.startswith("http://") else 8 if url.startswith("https://") else 0
        if start and url.isascii():
            end = url.find("/", start)
            authority = url[start:end] if end >= 0 else url[start:]
            if authority in _PLAIN_AUTHORITIES:
                return url
            if _plain_authority(authority):
                if len(_PLAIN_AUTHORITIES) < 1024:
                    _PLAIN_AUTHORITIES.add(authority)
                return url
        m = _url_re().match(url)
        if (
            m is not None
            and (not m.group(2) or int(m.group(2)) <= 65535)
            and (m.group(1)[0] != "[" or _is_ipv6(m.group(1)))
        ):
            if url.startswith(("http://", "https://")):
                return url
            colon = url.index(":")
            return url[:colon].lower() + url[colon:]
    raise UrlListError(_url_problem(url), source=source, line=line)


def _is_ipv6(bracketed: str) -> bool:
    import ipaddress  # ~6 M instructions, for the rare [IPv6] literal

    try:
        ipaddress.IPv6Address(bracketed[1:-1].partition("%25")[0])
    except ValueError:
        return False
    return True


def _url_problem(url: str) -> str:
    """Explain why ``url`` failed :func:`validate_url` (the slow path, errors only)."""
    if not url:
        return "empty URL"
    if _undecodable_re().search(url):
        return f"URL is not valid UTF-8: {_short(url)}"
    if not url.isprintable() or " " in url:
        return f"URL contains whitespace or a control character: {_short(url)}"
    scheme, sep, rest = url.partition(":")
    if not sep or not scheme.isascii() or not scheme.replace("+", "").replace("-", "").replace(
        ".", ""
    ).isalnum():
        return f"not an absolute URL (expected http:// or https://): {_short(url)}"
    if scheme.lower() not in ("http", "https"):
        return f"unsupported URL scheme {scheme!r} (only http and https): {_short(url)}"
    if not rest.startswith("//"):
        return f"expected '//' and a host after '{scheme}:': {_short(url)}"
    authority = re.split(r"[/?#]", rest[2:], maxsplit=1)[0]
    hostport = authority.rpartition("@")[2]
    host = hostport if hostport.startswith("[") else hostport.partition(":")[0]
    if not host:
        return f"URL has no host: {_short(url)}"
    return f"invalid host or port in URL: {_short(url)}"


def validate_sha256(value: str, *, source: str = "<list>", line: int | None = None) -> str:
    """Check a hex SHA-256 digest (64 hex digits) and return it lowercased."""
    if _sha256_re().fullmatch(value):
        return value.lower()
    raise UrlListError(f"sha256 must be 64 hex digits, got {_short(value)}", source=source,
                       line=line)


def detect_format(name: str) -> str:
    """The list format implied by a file name: ``csv``, ``tsv``, ``jsonl`` or ``text``."""
    base = name.lower()
    for ext in _COMPRESSED:
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    return _EXT_FORMATS.get(os.path.splitext(base)[1], "text")


def _canonical_format(fmt: str) -> str:
    name = fmt.strip().lower()
    name = _FORMAT_ALIASES.get(name, name)
    if name not in FORMATS:
        raise ConfigError(f"unknown URL list format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return name


def iter_jobs(source: UrlSource, *, fmt: str | None = None) -> Iterator[Job]:
    """Stream the Jobs of a URL list.

    ``source`` is a path, ``"-"`` for stdin, an open text (or binary) stream, or an
    iterable of URL strings, record mappings (``{"url": ..., "path": ...}``) or Jobs.
    ``fmt`` (``text``, ``csv``, ``tsv``, ``jsonl``) overrides the extension; it is
    ignored for in-memory iterables. The result is lazy: nothing is opened until the
    first item is requested, and a bad line raises UrlListError when it is reached.
    Streams passed in are not closed.
    """
    canonical = _canonical_format(fmt) if fmt is not None else None
    if isinstance(source, Job | Mapping | bytes | bytearray):
        raise TypeError(
            f"iter_jobs() takes a path, '-', a stream or an iterable of URLs, "
            f"not {type(source).__name__}; wrap a single item in a list"
        )
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        if path == "-":
            return _iter_stream(sys.stdin, "<stdin>", canonical or "text")
        return _iter_path(path, canonical)
    if isinstance(source, io.IOBase) or hasattr(source, "read"):
        stream = cast("IO[Any]", source)
        name = getattr(stream, "name", None)
        return _iter_stream(stream, name if isinstance(name, str) else "<stream>",
                            canonical or "text")
    return _iter_items(source)


def _iter_path(path: str, fmt: str | None) -> Iterator[Job]:
    fmt = fmt or detect_format(path)
    opener: Callable[..., IO[str]] = open
    lower = path.lower()
    try:
        if lower.endswith(".gz"):
            import gzip

            opener = gzip.open
        elif lower.endswith(".bz2"):
            import bz2

            opener = bz2.open
        elif lower.endswith(".xz"):
            import lzma

            opener = lzma.open
    except ImportError as exc:  # a Python built without zlib/bz2/lzma
        raise UrlListError(f"cannot decompress: {exc}", source=path) from exc
    try:
        # utf-8-sig drops the byte-order mark spreadsheets write; surrogateescape lets a
        # non-UTF-8 byte be reported on its own line instead of failing a whole chunk.
        f = opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape",
                   newline="" if fmt in ("csv", "tsv") else None)
    except OSError as exc:
        hint = ""
        if lower.startswith(("http://", "https://")) and not os.path.exists(path):
            hint = " (to fetch a single URL, pass a list: fetch([url]))"
        raise UrlListError(f"cannot open URL list: {exc.strerror or exc}{hint}",
                           source=path) from exc
    with f:
        yield from _parse(f, path, fmt)


def _iter_stream(stream: IO[Any], name: str, fmt: str) -> Iterator[Job]:
    binary = isinstance(stream, io.RawIOBase | io.BufferedIOBase) or "b" in str(
        getattr(stream, "mode", "")
    )
    if not binary:
        yield from _parse(stream, name, fmt)
        return
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape",
                            newline="" if fmt in ("csv", "tsv") else None)
    try:
        yield from _parse(text, name, fmt)
    finally:
        text.detach()  # the caller owns the stream: do not close it with the wrapper


def _parse(f: IO[str], name: str, fmt: str) -> Iterator[Job]:
    if fmt == "text":
        return _parse_text(f, name)
    if fmt == "jsonl":
        return _parse_jsonl(f, name)
    return _parse_csv(f, name, "\t" if fmt == "tsv" else ",")


def _read_error(exc: BaseException, name: str, line: int) -> UrlListError:
    if isinstance(exc, UnicodeDecodeError):
        return UrlListError("not valid UTF-8 text", source=name, line=line)
    if isinstance(exc, OSError) and exc.strerror:
        return UrlListError(f"cannot read: {exc.strerror}", source=name, line=line)
    return UrlListError(f"cannot read: {exc}", source=name, line=line)


def _lines(f: IO[str], name: str) -> Iterator[str]:
    """The lines of ``f``, bounded in length, with read errors turned into UrlListError."""
    readline = f.readline
    lineno = 0
    while True:
        try:
            line = readline(MAX_LINE)
        except (OSError, EOFError, ValueError) as exc:
            # UnicodeDecodeError is a ValueError; so is reading a closed file.
            raise _read_error(exc, name, lineno + 1) from exc
        except Exception as exc:
            # A corrupt .gz: gzip imported zlib (plain lists do not import it at all).
            zlib = sys.modules.get("zlib")
            if zlib is None or not isinstance(exc, zlib.error):
                raise
            raise _read_error(exc, name, lineno + 1) from exc
        if not line:
            return
        lineno += 1
        if len(line) >= MAX_LINE and line[-1] != "\n" and line[-1] != "\r":
            raise UrlListError(f"line longer than {MAX_LINE} characters", source=name,
                               line=lineno)
        if lineno == 1 and line.startswith("\ufeff"):
            line = line[1:]
        yield line


def _undecodable(name: str, line: int) -> UrlListError:
    return UrlListError("not valid UTF-8 text", source=name, line=line)


def _parse_text(f: IO[str], name: str) -> Iterator[Job]:
    for lineno, raw in enumerate(_lines(f, name), 1):
        s = raw.strip()
        if not s or s[0] == "#":
            continue
        if not s.isascii() and _undecodable_re().search(s):
            raise _undecodable(name, lineno)
        fields = s.split()
        if len(fields) > 1 and any(f[0] == "#" for f in fields):
            # "URL [PATH] # note": a field starting with "#" begins a trailing comment.
            fields = fields[: next(i for i, f in enumerate(fields) if f[0] == "#")]
            s = fields[0]
        if len(fields) == 1:
            yield Job(validate_url(s, source=name, line=lineno), source=name, line=lineno)
        elif len(fields) == 2:
            yield Job(validate_url(fields[0], source=name, line=lineno), fields[1],
                      source=name, line=lineno)
        else:
            raise UrlListError(
                f"expected 'URL [PATH]', got {len(fields)} fields (use CSV for paths with "
                "spaces)", source=name, line=lineno)


def _reject_constant(value: str) -> Any:
    raise ValueError(f"{value} is not valid JSON")


def _parse_jsonl(f: IO[str], name: str) -> Iterator[Job]:
    import json  # JSONL lists only

    decode = json.JSONDecoder(parse_constant=_reject_constant).decode
    for lineno, raw in enumerate(_lines(f, name), 1):
        s = raw.strip()
        if not s:
            continue
        if not s.isascii() and _undecodable_re().search(s):
            raise _undecodable(name, lineno)
        try:
            rec = decode(s)
        except (ValueError, RecursionError) as exc:
            raise UrlListError(f"invalid JSON: {exc}", source=name, line=lineno) from None
        if not isinstance(rec, dict):
            raise UrlListError(f"expected a JSON object, got {type(rec).__name__}",
                               source=name, line=lineno)
        yield _job_from_record(rec, name, lineno)


def _optional_str(rec: Mapping[Any, Any], key: str, name: str, line: int) -> str | None:
    value = rec.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise UrlListError(f"{key!r} must be a string, got {type(value).__name__}",
                           source=name, line=line)
    value = value.strip()
    return value or None


def _job_from_record(rec: Mapping[Any, Any], name: str, line: int) -> Job:
    url = _optional_str(rec, "url", name, line)
    if url is None:
        raise UrlListError("missing 'url'", source=name, line=line)
    sha = _optional_str(rec, "sha256", name, line)
    return Job(
        validate_url(url, source=name, line=line),
        _optional_str(rec, "path", name, line),
        validate_sha256(sha, source=name, line=line) if sha is not None else None,
        {k: v for k, v in rec.items() if k not in _RESERVED_KEYS},
        source=name, line=line,
    )


def _csv_rows(reader: Any, name: str) -> Iterator[tuple[int, list[str]]]:
    """Non-blank rows of ``reader`` with the line each starts on; csv errors converted."""
    import csv
    while True:
        start = reader.line_num + 1
        try:
            row: list[str] = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise _csv_error(exc, name, start, reader.line_num) from None
        if not any(cell.strip() for cell in row):
            continue
        for cell in row:
            if not cell.isascii() and _undecodable_re().search(cell):
                raise _undecodable(name, start)
        yield start, row


def _parse_csv(f: IO[str], name: str, delimiter: str) -> Iterator[Job]:
    import csv  # CSV/TSV lists only

    rows = _csv_rows(csv.reader(_lines(f, name), delimiter=delimiter, strict=True), name)
    first = next(rows, None)
    if first is None:
        raise UrlListError("empty list: a header row with a 'url' column is required",
                           source=name)
    header_line, header = first
    columns = _csv_columns(header, name, header_line)
    url_i, path_i, sha_i = columns["url"], columns.get("path"), columns.get("sha256")
    carried = [(i, h) for i, h in enumerate(header) if i not in columns.values()]
    width = len(header)
    for line, row in rows:
        n = len(row)
        if n > width:
            raise UrlListError(f"{n} fields but the header has {width}", source=name,
                               line=line)
        url = row[url_i].strip() if url_i < n else ""
        if not url:
            raise UrlListError("empty url", source=name, line=line)
        path = row[path_i].strip() if path_i is not None and path_i < n else ""
        sha = row[sha_i].strip() if sha_i is not None and sha_i < n else ""
        extra: dict[str, str] = {}
        for i, column in carried:
            value = row[i] if i < n else ""
            if column:
                extra[column] = value
            elif value.strip():
                raise UrlListError(f"a value in column {i + 1}, which has no header name",
                                   source=name, line=line)
        yield Job(
            validate_url(url, source=name, line=line),
            path or None,
            validate_sha256(sha, source=name, line=line) if sha else None,
            extra,
            source=name, line=line,
        )


def _csv_error(exc: csv.Error, name: str, start: int, current: int) -> UrlListError:
    msg = str(exc)
    if "unexpected end of data" in msg or "field larger than field limit" in msg:
        # A quote opened and never closed swallows everything after it: blame the
        # line where the record started, not the end of the file.
        return UrlListError(f"unbalanced quote: a quoted field starting here is not closed "
                            f"({msg})", source=name, line=start)
    return UrlListError(f"malformed CSV: {msg}", source=name, line=current)


def _csv_columns(header: list[str], name: str, line: int) -> dict[str, int]:
    """Map the reserved columns (url, path, sha256) to their index; strip header names."""
    columns: dict[str, int] = {}
    seen: set[str] = set()
    for i, raw in enumerate(header):
        column = raw.strip()
        header[i] = column
        key = column.lower() if column.lower() in _RESERVED_KEYS else column
        if key and key in seen:
            raise UrlListError(f"duplicate column {column!r} in the header", source=name,
                               line=line)
        seen.add(key)
        if key in _RESERVED_KEYS:
            columns[key] = i
    if "url" not in columns:
        hint = ""
        if any(h.lower().startswith(("http://", "https://")) for h in header):
            hint = "; the first row must be a header, not data"
        found = ", ".join(repr(h) for h in header)
        raise UrlListError(f"no 'url' column in the header (found {found}){hint}",
                           source=name, line=line)
    return columns


def _iter_items(items: Iterable[Any]) -> Iterator[Job]:
    name = "<list>"
    for i, item in enumerate(items, 1):
        if isinstance(item, str):
            yield Job(validate_url(item.strip(), source=name, line=i), source=name, line=i)
        elif isinstance(item, Job):
            src = item.source
            line = item.line if item.line is not None else i
            url = validate_url(item.url, source=src, line=line)
            sha = item.sha256
            if sha is not None:
                sha = validate_sha256(sha, source=src, line=line)
            if url != item.url or sha != item.sha256 or line != item.line:
                item = dataclasses.replace(item, url=url, sha256=sha, line=line)
            yield item
        elif isinstance(item, Mapping):
            yield _job_from_record(item, name, i)
        else:
            raise UrlListError(
                f"expected a URL string, a mapping or a Job, got {type(item).__name__}",
                source=name, line=i)
