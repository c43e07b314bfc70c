"""Output names: URL/header -> safe relative path, collisions, safe joins. No sockets."""

from __future__ import annotations

import os
import re
import threading
import tracemalloc
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fetcher import naming
from fetcher.errors import UnsafePathError
from fetcher.naming import (
    NameAllocator,
    filename_from_content_disposition,
    path_from_url,
    safe_join,
    sanitize_relpath,
    variant,
)


def assert_safe(path: str) -> None:
    """The invariant every returned path keeps."""
    assert path and not path.startswith(("/", "\\"))
    parts = path.split("/")
    assert all(parts), path
    assert ".." not in parts and "." not in parts
    assert "\\" not in path and "\x00" not in path
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in path)
    assert all(len(p.encode("utf-8")) <= 255 for p in parts)
    assert len(path.encode("utf-8")) <= 4096
    assert parts[0].casefold() != ".fetcher"


# --- path_from_url ------------------------------------------------------------------

@pytest.mark.parametrize(("url", "expected"), [
    ("http://h/", "index.html"),
    ("http://h", "index.html"),
    ("http://h?x=1", "index.html"),
    ("http://h/a/", "a/index.html"),
    ("http://h/a/b.txt", "a/b.txt"),
    ("http://user:pw@h:8080/a/b.txt?x=1#frag", "a/b.txt"),
    ("http://h/a/b.txt#x/y", "a/b.txt"),
    ("http://h//a///b", "a/b"),
    ("http://h/caf%C3%A9%20menu.pdf", "caf\u00e9 menu.pdf"),
    ("http://h/a%2Fb", "a_b"),
    ("http://h/a%5Cb", "a_b"),
    ("http://h/a/./b", "a/b"),
    ("http://h/a/../b", "b"),
    ("http://h/a/b/..", "a/index.html"),
    ("http://h/../../etc/passwd", "etc/passwd"),
    ("http://h/%2e%2e/%2E%2E/x", "x"),
    ("http://h/..%2f..%2fx", ".._.._x"),
    ("http://h/a%00b%0A", "a_b_"),
    ("http://h/%ff.bin", "\ufffd.bin"),
    ("http://h/.fetcher/manifest.jsonl", "_.fetcher/manifest.jsonl"),
    ("http://h/.FETCHER", "_.FETCHER"),
    ("http://h/c:/x", "c_/x"),
    ("http://h/x/.fetcher", "x/.fetcher"),
])
def test_path_from_url(url: str, expected: str) -> None:
    assert path_from_url(url) == expected


def test_path_from_url_shortens_long_segments_and_paths() -> None:
    long = path_from_url("http://h/" + "a" * 400 + ".tar.gz")
    assert long.endswith(".tar.gz") and len(long.encode()) <= 255
    assert path_from_url("http://h/" + "a" * 400 + ".tar.gz") == long  # deterministic
    deep = path_from_url("http://h/" + "/".join(["d" * 200] * 30) + "/file.txt")
    assert deep.startswith("_long/") and deep.endswith("/file.txt")
    assert_safe(long)
    assert_safe(deep)


# --- sanitize_relpath ---------------------------------------------------------------

@pytest.mark.parametrize(("path", "expected"), [
    ("a.txt", "a.txt"),
    ("a//b/./c.txt", "a/b/c.txt"),
    ("./a", "a"),
    ("a\\b\\c.txt", "a/b/c.txt"),
    ("x/.fetcher", "x/.fetcher"),
    ("..a/b..", "..a/b.."),
    ("sp ace/\u65e5\u672c.txt", "sp ace/\u65e5\u672c.txt"),
])
def test_sanitize_relpath_accepts_and_normalises(path: str, expected: str) -> None:
    assert sanitize_relpath(path) == expected


@pytest.mark.parametrize(("path", "reason"), [
    ("", "empty"),
    ("./", "empty"),
    ("/etc/passwd", "absolute"),
    ("\\\\server\\share\\x", "absolute"),
    ("\\x", "absolute"),
    ("../x", "'..'"),
    ("a/../../x", "'..'"),
    ("a/..", "'..'"),
    ("a\\..\\..\\x", "'..'"),
    ("..\\x", "'..'"),
    ("a\x00b", "NUL"),
    ("a\nb", "control"),
    ("a\x7f", "control"),
    ("a\x85", "control"),
    ("a\udcff", "undecodable"),
    ("C:\\Windows\\x", "drive"),
    ("c:x", "drive"),
    ("dir/", "directory"),
    (".fetcher/manifest.jsonl", "reserved"),
    (".FeTcHeR/x", "reserved"),
    ("./.fetcher", "reserved"),
    ("/".join(["d" * 200] * 25), "4096"),
])
def test_sanitize_relpath_rejects(path: str, reason: str) -> None:
    with pytest.raises(UnsafePathError) as info:
        sanitize_relpath(path, url="http://h/x")
    assert reason in str(info.value)
    assert info.value.path == path and info.value.url == "http://h/x"


def test_long_components_are_shortened_keeping_extension_and_distinct() -> None:
    a = sanitize_relpath("dir/" + "x" * 300 + "A.jpeg")
    b = sanitize_relpath("dir/" + "x" * 300 + "B.jpeg")
    assert a != b
    for p in (a, b):
        assert p.startswith("dir/") and p.endswith(".jpeg")
        assert len(p.split("/")[1].encode()) <= 255
    multibyte = sanitize_relpath("\u00e9" * 200 + ".txt")  # 400 bytes of UTF-8
    assert multibyte.endswith(".txt") and len(multibyte.encode()) <= 255
    multibyte.encode("utf-8")  # no split code point
    assert sanitize_relpath(a) == a  # idempotent


# --- Content-Disposition ------------------------------------------------------------

@pytest.mark.parametrize(("header", "expected"), [
    (None, None),
    ("", None),
    ("attachment", None),
    ('attachment; filename="report.pdf"', "report.pdf"),
    ("attachment; filename=report.pdf", "report.pdf"),
    ("attachment;filename=report.pdf;size=3", "report.pdf"),
    ('inline; filename="a \\"quoted\\" name.txt"', 'a "quoted" name.txt'),
    ('inline; filename="back\\\\slash.txt"', "slash.txt"),
    ('attachment; filename="semi;colon.txt"', "semi;colon.txt"),
    ("attachment; filename*=UTF-8''%E2%82%AC%20rates.csv", "\u20ac rates.csv"),
    ("attachment; filename=\"fallback.csv\"; filename*=utf-8''%E2%82%AC.csv", "\u20ac.csv"),
    ("attachment; filename*=iso-8859-1'en'%A3.txt", "\u00a3.txt"),
    ("attachment; filename*=UTF-8''%FF%FE.txt; filename=plain.txt", "plain.txt"),
    ("attachment; filename*=koi8-r''%C1.txt", None),
    ('attachment; FILENAME="Upper.TXT"', "Upper.TXT"),
    ('attachment; filename="../../etc/passwd"', "passwd"),
    ('attachment; filename="C:\\Users\\x\\evil.exe"', "evil.exe"),
    ('attachment; filename="/abs/path.txt"', "path.txt"),
    ('attachment; filename=".."', None),
    ('attachment; filename="."', None),
    ('attachment; filename="dir/"', None),
    ('attachment; filename=".fetcher"', None),
    ("attachment; filename*=UTF-8''a%00b.txt", None),
    ("attachment; filename*=UTF-8''a%0Ab.txt", None),
    ('attachment; filename="c:evil"', None),
    ('attachment; filename="' + "x" * 300 + '"', None),
    ('attachment; filename="caf\u00c3\u00a9.txt"', "caf\u00e9.txt"),  # UTF-8 read as Latin-1
    ('attachment; filename="unterminated.txt', "unterminated.txt"),
])
def test_filename_from_content_disposition(header: str | None, expected: str | None) -> None:
    assert filename_from_content_disposition(header) == expected


# --- variant ------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "n", "expected"), [
    ("dir/name.ext", 1, "dir/name.1.ext"),
    ("name.ext", 2, "name.2.ext"),
    ("a/b/archive.tar.gz", 1, "a/b/archive.1.tar.gz"),
    ("README", 3, "README.3"),
    (".bashrc", 1, ".bashrc.1"),
    ("dir.d/file", 1, "dir.d/file.1"),
    ("Mr. Smith goes", 1, "Mr. Smith goes.1"),
    ("x.txt", 0, "x.txt"),
])
def test_variant(path: str, n: int, expected: str) -> None:
    assert variant(path, n) == expected


def test_variant_of_a_maximal_name_stays_within_limits() -> None:
    name = sanitize_relpath("y" * 300 + ".bin")
    v = variant(name, 12345)
    assert v != name and v.endswith(".bin") and len(v.encode()) <= 255


# --- NameAllocator ------------------------------------------------------------------

def test_claim_free_duplicate_and_collision() -> None:
    names = NameAllocator()
    assert names.claim("http://a/x", "x.txt") == "x.txt"
    assert names.claim("http://a/x", "x.txt") is None  # duplicate line
    assert names.claim("http://b/x", "x.txt") == "x.1.txt"
    assert names.claim("http://c/x", "x.txt") == "x.2.txt"
    assert names.claim("http://b/x", "x.txt") is None  # duplicate of a renamed one
    assert names.claim("http://d/x", "x.1.txt") == "x.1.1.txt"  # taken by b
    assert names.claim("http://a/x", "other.txt") == "other.txt"  # same URL, new path
    assert names.is_claimed("x.2.txt") and not names.is_claimed("x.3.txt")


def test_claims_are_deterministic_in_list_order() -> None:
    pairs = [(f"http://h/{i}?q", "index.html") for i in range(50)] + [
        ("http://h/z", "index.3.html"), ("http://h/5?q", "index.html")]

    def run() -> list[str | None]:
        names = NameAllocator()
        return [names.claim(u, p) for u, p in pairs]

    first = run()
    assert first == run()
    assert first[:3] == ["index.html", "index.1.html", "index.2.html"]
    assert first[-2:] == ["index.3.1.html", None]


def test_reserve_free_skips_claimed_and_existing() -> None:
    names = NameAllocator()
    assert names.claim("http://a/r", "r.csv") == "r.csv"
    on_disk = {"r.csv", "r.1.csv", "r.2.csv", "new.txt"}
    assert names.reserve_free("r.csv", on_disk.__contains__, url="http://a/r") == "r.3.csv"
    assert names.claim("http://b/r", "r.csv") == "r.1.csv"  # not on disk-aware: claims only
    assert names.reserve_free("r.csv", on_disk.__contains__) == "r.4.csv"
    assert names.reserve_free("free.txt", on_disk.__contains__) == "free.txt"
    assert names.reserve_free("new.txt", on_disk.__contains__) == "new.1.txt"
    assert names.claim("http://c/n", "free.txt") == "free.1.txt"


def test_allocator_is_thread_safe() -> None:
    names = NameAllocator()
    results: list[list[str | None]] = []

    def worker(k: int) -> None:
        results.append([names.claim(f"http://h/{k}/{i}", "same.bin") for i in range(300)])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    given_out = [p for r in results for p in r]
    assert None not in given_out and len(set(given_out)) == 8 * 300


def test_allocator_memory_per_url_is_small() -> None:
    n = 10_000
    urls = [f"https://example.com/dir/{i}/file.bin" for i in range(n)]
    tracemalloc.start()
    try:
        names = NameAllocator()
        for u in urls:
            names.claim(u, u[20:])
        for i in range(n):  # the worst case: every URL collides on one name
            names.claim(f"https://example.com/?id={i}", "index.html")
        current = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert current / (2 * n) < 120, current / (2 * n)


# --- safe_join ----------------------------------------------------------------------

def test_safe_join_plain(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    assert safe_join(tmp_path, "a/b/c.txt") == tmp_path / "a" / "b" / "c.txt"
    assert safe_join(tmp_path, ".fetcher/partial/x.part") == tmp_path / ".fetcher/partial/x.part"
    assert safe_join(tmp_path, "a\\d.txt") == tmp_path / "a" / "d.txt"


def test_safe_join_relative_dest_becomes_absolute(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert safe_join(Path("out"), "x.bin") == tmp_path / "out" / "x.bin"


@pytest.mark.parametrize("rel", ["../x", "/etc/passwd", "a/../../x", "", "a\x00b"])
def test_safe_join_rejects_traversal(tmp_path: Path, rel: str) -> None:
    with pytest.raises(UnsafePathError):
        safe_join(tmp_path, rel)


def test_safe_join_refuses_symlinked_directory(tmp_path: Path) -> None:
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "sub").mkdir()
    os.symlink(outside, dest / "sub" / "link")
    with pytest.raises(UnsafePathError, match="symlink"):
        safe_join(dest, "sub/link/file.txt")


def test_safe_join_refuses_symlinked_target_even_dangling(tmp_path: Path) -> None:
    os.symlink(tmp_path / "elsewhere.txt", tmp_path / "f.txt")
    with pytest.raises(UnsafePathError, match="symlink"):
        safe_join(tmp_path, "f.txt")


def test_safe_join_refuses_a_file_used_as_directory(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("x")
    with pytest.raises(UnsafePathError, match="not a directory"):
        safe_join(tmp_path, "a/b")


def test_safe_join_allows_dest_itself_to_be_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "dest")
    assert safe_join(tmp_path / "dest", "x/y") == tmp_path / "dest" / "x" / "y"


# --- properties ---------------------------------------------------------------------

_path_text = st.text(
    alphabet=st.one_of(st.sampled_from(list("/\\.:%2eEfF0aC \x00\n")),
                       st.characters(codec="utf-8")),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(_path_text)
def test_sanitize_relpath_never_escapes(text: str) -> None:
    try:
        result = sanitize_relpath(text)
    except UnsafePathError:
        return
    assert_safe(result)
    assert sanitize_relpath(result) == result


@settings(max_examples=400, deadline=None)
@given(_path_text)
def test_path_from_url_never_escapes(text: str) -> None:
    for url in (text, "http://h/" + text, "https://h" + text):
        result = path_from_url(url)
        assert_safe(result)
        assert sanitize_relpath(result) == result


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=80),
                 st.builds("attachment; filename={}".format, _path_text),
                 st.builds("attachment; filename*=UTF-8''{}".format, _path_text)))
def test_content_disposition_names_are_safe_basenames(header: str | None) -> None:
    name = filename_from_content_disposition(header)
    if name is not None:
        assert_safe(name)
        assert "/" not in name


@settings(max_examples=200, deadline=None)
@given(st.lists(
    st.tuples(st.sampled_from(["u1", "u2", "u3", "u4"]),
              st.sampled_from(["a.txt", "a.1.txt", "a.2.txt", "a.1.1.txt", "b", "b.1"]),
              st.booleans()),
    max_size=40))
def test_allocator_never_gives_one_path_to_two_urls(ops: list[tuple[str, str, bool]]) -> None:
    names = NameAllocator()
    owner: dict[str, str] = {}
    on_disk = {"a.2.txt", "b.1"}
    for url, path, reserve in ops:
        got = (names.reserve_free(path, on_disk.__contains__, url=url) if reserve
               else names.claim(url, path))
        if got is None:
            assert not reserve
            continue
        assert got not in owner, f"{got} handed to {owner.get(got)} and {url}"
        owner[got] = url
        if reserve:
            assert got not in on_disk


# --- the fast paths return what the general code returned -----------------------------

_OLD_BAD_CHARS_RE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_OLD_DRIVE_RE = re.compile(r"[A-Za-z]:")


def _reference_clean_segment(segment: str) -> str:
    name = unquote(segment, errors="replace") if "%" in segment else segment
    name = name.replace("/", "_").replace("\\", "_")
    if _OLD_BAD_CHARS_RE.search(name):
        name = _OLD_BAD_CHARS_RE.sub("_", name)
    return name


def _reference_path_from_url(url: str) -> str:
    """path_from_url as it was before its fast path (regexes compiled at import)."""
    rest = url.partition("://")[2] if "://" in url else url
    end = len(rest)
    for ch in "?#":
        i = rest.find(ch)
        if i != -1 and i < end:
            end = i
    rest = rest[:end]
    slash = rest.find("/")
    raw = rest[slash + 1:].split("/") if slash != -1 else [""]
    parts: list[str] = []
    for segment in raw:
        name = _reference_clean_segment(segment)
        if name == "..":
            if parts:
                parts.pop()
        elif name and name != ".":
            parts.append(name)
    if _reference_clean_segment(raw[-1]) in ("", ".", ".."):
        parts.append("index.html")
    if parts[0].casefold() == ".fetcher":
        parts[0] = "_" + parts[0]
    if _OLD_DRIVE_RE.match(parts[0]):
        parts[0] = parts[0][0] + "_" + parts[0][2:]
    try:
        return naming._join_checked(parts, path=url, url=url)
    except UnsafePathError:
        return f"_long/{naming._digest(url):016x}/{naming._fit_component(parts[-1])}"


_url_segment = st.one_of(
    st.sampled_from(["", ".", "..", ".x", "a", "b.txt", "%2e", "%2E%2e", "%2F", "%41", "%",
                     "%zz", "c:", ".fetcher", "a\\b", "\x00", "\x7f", "\u00e9", "?q", "#f"]),
    st.text(alphabet=st.one_of(st.sampled_from(list("/\\.:%2eEfFaC?#_- \x00\x9f\u0130")),
                               st.characters(codec="utf-8")), max_size=8),
)
_url_path_text = st.lists(_url_segment, max_size=6).map("/".join)


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(["http://h", "https://h:8080", "HTTP://u@h", "", "h"]),
       st.sampled_from(["/", "//", "/c:", "/.fetcher", "/.FETCHER/", "?/", "/a"]),
       st.integers(0, 300), _url_path_text)
def test_path_from_url_equals_the_general_code(base: str, head: str, n: int,
                                               text: str) -> None:
    for url in (base + head + text, base + "/" + "x" * n + text, base + "/" + text,
                base + "/" + "\u00e9" * (n // 2) + text):
        assert path_from_url(url) == _reference_path_from_url(url), url


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.one_of(st.sampled_from(list("aZ:\x00\x1f\x7f\x9f\xa0")),
                                  st.characters()), max_size=6))
def test_character_checks_equal_the_regexes(text: str) -> None:
    assert naming._has_bad_chars(text) == bool(_OLD_BAD_CHARS_RE.search(text))
    assert naming._is_drive(text) == bool(_OLD_DRIVE_RE.match(text))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 9), st.booleans()),
                max_size=60))
def test_digest_table_put_new_is_get_then_put(ops: list[tuple[int, int, bool]]) -> None:
    table, model = naming.DigestTable(8), {}
    for key, value, new in ops:
        if new:
            assert table.put_new(key, value) == model.get(key)
            model.setdefault(key, value)
        else:
            table.put(key, value)
            model[key] = value
        assert len(table) == len(model)
    assert all(table.get(k) == v for k, v in model.items())


def _context(dest: Path) -> object:
    from fetcher.config import FetchConfig
    from fetcher.download import HostGate, RunContext

    cancel = threading.Event()
    return RunContext(config=FetchConfig(), dest=dest, cancel=cancel,
                      gate=HostGate(limit=None, rate=None, cancel=cancel))


def test_run_directories_are_made_and_checked_once_links_never_followed(
        tmp_path: Path) -> None:
    """ensure_parent makes a new directory below a checked one with one mkdir; whatever
    is already at that name goes through the full check, so a link planted there (after
    planning, before publishing) or a file is refused and nothing lands outside."""
    from fetcher.errors import UnsafePathError

    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    ctx: Any = _context(dest)
    ctx.ensure_parent("d/a/f.bin")  # neither checked yet: the full check, then both known
    assert (dest / "d" / "a").is_dir() and {"d", "d/a"} <= ctx._dirs
    for i in range(3):
        ctx.ensure_parent(f"d/n{i}/f.bin")  # below the checked "d": one mkdir each
        assert (dest / "d" / f"n{i}").is_dir() and f"d/n{i}" in ctx._dirs
    assert not ctx.exists("d/later/f.bin")  # missing below a checked directory
    (dest / "d" / "link").symlink_to(outside)
    (dest / "d" / "file").write_bytes(b"x")
    for planted in ("d/link/f.bin", "d/file/f.bin"):
        with pytest.raises(UnsafePathError):
            ctx.ensure_parent(planted)
        with pytest.raises(UnsafePathError):
            ctx.exists(planted)
    assert list(outside.iterdir()) == []
    (dest / "top").symlink_to(outside)
    with pytest.raises(UnsafePathError):
        ctx.ensure_parent("top/f.bin")  # directly below DEST
    assert list(outside.iterdir()) == []
