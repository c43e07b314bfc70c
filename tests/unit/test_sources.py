"""URL lists: formats, validation, error locations, streaming. No sockets."""

from __future__ import annotations

import bz2
import gzip
import io
import re
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fetcher import sources
from fetcher.errors import ConfigError, UrlListError
from fetcher.models import Job
from fetcher.sources import detect_format, iter_jobs, validate_sha256, validate_url

SHA = "0123456789abcdef" * 4


@pytest.fixture()
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in tmp_path so error messages name the file as given (``urls.txt:3``)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(name: str, text: str) -> str:
    with open(name, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return name


def error_of(source: object, **kw: str) -> UrlListError:
    with pytest.raises(UrlListError) as info:
        list(iter_jobs(source, **kw))  # type: ignore[arg-type]
    return info.value


# --- validate_url -------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "http://example.com",
    "https://example.com/",
    "http://example.com:8080/a/b?c=d#e",
    "http://user:pw@example.com/x",
    "http://127.0.0.1:0/",
    "http://[::1]:65535/x",
    "http://[fe80::1%25eth0]/x",
    "http://example.com?q",
    "http://example.com#frag",
    "http://h/caf\u00e9/\u65e5\u672c",
    "http://h:/x",
    "http://int_host.example./x",
    "http://p%40ss:w@rd@h/",
    "http://\u4f8b\u3048.jp/",
])
def test_valid_urls_are_returned_unchanged(url: str) -> None:
    assert validate_url(url, source="s", line=1) == url


@pytest.mark.parametrize(("url", "expected"), [
    ("HTTP://Example.com/A", "http://Example.com/A"),
    ("HttpS://h/x", "https://h/x"),
])
def test_scheme_is_case_insensitive_and_lowercased(url: str, expected: str) -> None:
    assert validate_url(url, source="s", line=1) == expected


@pytest.mark.parametrize(("url", "reason"), [
    ("", "empty URL"),
    ("ftp://h/x", "unsupported URL scheme 'ftp'"),
    ("file:///etc/passwd", "unsupported URL scheme 'file'"),
    ("javascript:alert(1)", "unsupported URL scheme"),
    ("example.com/x", "not an absolute URL"),
    ("/just/a/path", "not an absolute URL"),
    ("http:/h/x", "expected '//' and a host"),
    ("http:///x", "no host"),
    ("http://", "no host"),
    ("http://user@/x", "no host"),
    ("http://h:99999/", "invalid host or port"),
    ("http://h:12a/", "invalid host or port"),
    ("http://h\\x/", "invalid host or port"),
    ("http://./", "invalid host or port"),
    ("http://a..b/", "invalid host or port"),
    ("http://a&b/", "invalid host or port"),
    ("http://[b]/", "invalid host or port"),
    ("http://[::1/", "invalid host or port"),
    ("http://us[er@h/", "invalid host or port"),
    ("http://h/a b", "whitespace or a control character"),
    ("http://h/a\tb", "whitespace or a control character"),
    ("http://h/a\x00b", "whitespace or a control character"),
    ("http://h/a\x7f", "whitespace or a control character"),
    ("http://h/a\u00a0b", "whitespace or a control character"),
    ("http://h/\udcff", "not valid UTF-8"),
])
def test_invalid_urls_name_the_reason_and_place(url: str, reason: str) -> None:
    with pytest.raises(UrlListError) as info:
        validate_url(url, source="urls.txt", line=7)
    assert reason in str(info.value)
    assert str(info.value).startswith("urls.txt:7: ")
    assert (info.value.source, info.value.line) == ("urls.txt", 7)


def test_validate_sha256_lowercases_and_rejects_bad_digests() -> None:
    assert validate_sha256(SHA.upper(), source="s", line=1) == SHA
    for bad in ("", "abc", SHA + "0", SHA[:-1] + "g", " " + SHA):
        with pytest.raises(UrlListError, match="64 hex digits"):
            validate_sha256(bad, source="s", line=1)


@pytest.mark.parametrize(("name", "fmt"), [
    ("urls.txt", "text"), ("urls", "text"), ("a.csv", "csv"), ("A.CSV", "csv"),
    ("a.tsv", "tsv"), ("a.jsonl", "jsonl"), ("a.ndjson", "jsonl"), ("a.csv.gz", "csv"),
    ("a.jsonl.xz", "jsonl"), ("a.txt.bz2", "text"), ("a.json", "text"),
])
def test_detect_format_by_extension(name: str, fmt: str) -> None:
    assert detect_format(name) == fmt


# --- text ---------------------------------------------------------------------------

def test_text_lines_comments_blanks_and_paths(in_tmp: Path) -> None:
    write("urls.txt", "# a comment\n\n   \nhttp://h/a\n  https://h/b   out/b.bin  \n"
          "\t# indented comment\nhttp://h/c#frag\n")
    jobs = list(iter_jobs("urls.txt"))
    assert [(j.url, j.path, j.line) for j in jobs] == [
        ("http://h/a", None, 4), ("https://h/b", "out/b.bin", 5), ("http://h/c#frag", None, 7),
    ]
    assert all(j.source == "urls.txt" and j.sha256 is None and j.extra == {} for j in jobs)


def test_text_crlf_bom_and_no_final_newline(in_tmp: Path) -> None:
    Path("urls.txt").write_bytes(b"\xef\xbb\xbfhttp://h/a\r\nhttp://h/b")
    assert [j.url for j in iter_jobs("urls.txt")] == ["http://h/a", "http://h/b"]


def test_text_error_names_file_and_line(in_tmp: Path) -> None:
    write("urls.txt", "http://h/a\n# fine\nnot-a-url\nhttp://h/b\n")
    err = error_of("urls.txt")
    assert str(err).startswith("urls.txt:3: ")
    assert (err.source, err.line) == ("urls.txt", 3)


def test_text_trailing_comments(in_tmp: Path) -> None:
    write("urls.txt", "http://h/a # mirror 1\nhttp://h/b out/b #note\nhttp://h/c#x p#q\n")
    assert [(j.url, j.path) for j in iter_jobs("urls.txt")] == [
        ("http://h/a", None), ("http://h/b", "out/b"), ("http://h/c#x", "p#q")]


def test_text_more_than_two_fields_is_an_error(in_tmp: Path) -> None:
    write("urls.txt", "http://h/a out/a extra\n")
    err = error_of("urls.txt")
    assert err.line == 1 and "3 fields" in err.reason


def test_text_is_lazy_and_fails_at_the_bad_line(in_tmp: Path) -> None:
    write("urls.txt", "http://h/1\nhttp://h/2\nftp://h/3\nhttp://h/4\n")
    it = iter_jobs("urls.txt")
    assert next(it).line == 1
    assert next(it).line == 2
    with pytest.raises(UrlListError) as info:
        next(it)
    assert info.value.line == 3


def test_undecodable_byte_is_reported_on_its_own_line(in_tmp: Path) -> None:
    Path("urls.txt").write_bytes(b"http://h/a\n" * 5000 + b"http://h/\xff\n")
    err = error_of("urls.txt")
    assert err.line == 5001 and "UTF-8" in str(err)


def test_overlong_line_is_an_error(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_LINE", 64)
    write("urls.txt", "http://h/a\nhttp://h/" + "x" * 100 + "\n")
    err = error_of("urls.txt")
    assert err.line == 2 and "longer than 64" in err.reason


def test_missing_file_names_it(in_tmp: Path) -> None:
    err = error_of("nope.txt")
    assert err.source == "nope.txt" and err.line is None and "cannot open" in str(err)


def test_single_url_string_gets_a_hint(in_tmp: Path) -> None:
    err = error_of("http://h/file.bin")
    assert "fetch([url])" in str(err)


def test_compressed_lists(in_tmp: Path) -> None:
    with gzip.open("urls.txt.gz", "wt", encoding="utf-8") as f:
        f.write("http://h/a\nhttp://h/b p\n")
    assert [(j.url, j.path) for j in iter_jobs("urls.txt.gz")] == [
        ("http://h/a", None), ("http://h/b", "p")]
    with bz2.open("urls.csv.bz2", "wt", encoding="utf-8") as f:
        f.write("url,k\nhttp://h/a,1\n")
    assert [j.extra for j in iter_jobs("urls.csv.bz2")] == [{"k": "1"}]


def test_corrupt_gzip_is_a_url_list_error(in_tmp: Path) -> None:
    Path("urls.txt.gz").write_bytes(b"not gzip at all")
    err = error_of("urls.txt.gz")
    assert err.source == "urls.txt.gz" and err.line == 1


# --- CSV / TSV ----------------------------------------------------------------------

def test_csv_columns_extras_and_empty_cells(in_tmp: Path) -> None:
    write("urls.csv", "url,path,sha256,label,note\n"
          f"http://h/a,,,\"one, two\",x\nhttp://h/b,out/b,{SHA.upper()},,\n")
    a, b = iter_jobs("urls.csv")
    assert (a.url, a.path, a.sha256, a.line) == ("http://h/a", None, None, 2)
    assert a.extra == {"label": "one, two", "note": "x"}
    assert (b.path, b.sha256, b.extra) == ("out/b", SHA, {"label": "", "note": ""})


def test_csv_header_is_case_and_space_insensitive_and_bom_is_dropped(in_tmp: Path) -> None:
    Path("urls.csv").write_bytes(b"\xef\xbb\xbf URL , Path ,Label\r\nhttp://h/a,p,L\r\n")
    (job,) = iter_jobs("urls.csv")
    assert (job.url, job.path, job.extra) == ("http://h/a", "p", {"Label": "L"})


def test_csv_without_url_column_names_the_file(in_tmp: Path) -> None:
    write("list.csv", "link,path\nhttp://h/a,p\n")
    err = error_of("list.csv")
    assert str(err).startswith("list.csv:1: ") and "'url'" in str(err)


def test_csv_without_header_gets_a_hint(in_tmp: Path) -> None:
    write("list.csv", "http://h/a,p\n")
    assert "header" in str(error_of("list.csv"))


def test_csv_empty_file(in_tmp: Path) -> None:
    write("list.csv", "\n\n")
    err = error_of("list.csv")
    assert "header" in err.reason and err.source == "list.csv"


def test_csv_unclosed_quote_reports_where_the_record_started(in_tmp: Path) -> None:
    write("urls.csv", 'url,label\nhttp://h/a,ok\nhttp://h/b,"never closed\n'
          + "http://h/c,x\n" * 50)
    it = iter_jobs("urls.csv")
    assert next(it).url == "http://h/a"
    with pytest.raises(UrlListError) as info:
        next(it)
    assert info.value.line == 3 and "unbalanced quote" in info.value.reason


def test_csv_stray_quote_is_malformed(in_tmp: Path) -> None:
    write("urls.csv", 'url,label\nhttp://h/a,ok\nhttp://h/b,"a"b\n')
    err = error_of("urls.csv")
    assert err.line == 3 and "malformed CSV" in err.reason


def test_csv_quoted_multiline_field_keeps_its_start_line(in_tmp: Path) -> None:
    write("urls.csv", 'url,note\nhttp://h/a,"two\nlines"\nhttp://h/b,x\n')
    a, b = iter_jobs("urls.csv")
    assert (a.line, a.extra["note"], b.line) == (2, "two\nlines", 4)


def test_csv_row_checks(in_tmp: Path) -> None:
    write("a.csv", "url,k\nhttp://h/a,1,2\n")
    assert "3 fields" in error_of("a.csv").reason
    write("b.csv", "url,k\n,1\n")
    assert error_of("b.csv").reason == "empty url"
    write("c.csv", "url,url\nhttp://h/a,b\n")
    assert "duplicate column" in error_of("c.csv").reason
    write("d.csv", f"url,sha256\nhttp://h/a,{SHA[:10]}\n")
    assert error_of("d.csv").line == 2


def test_csv_short_rows_blank_rows_and_unnamed_columns(in_tmp: Path) -> None:
    write("a.csv", "url,path,k,\nhttp://h/a\n,,,\n\nhttp://h/b,p,v,\n")
    a, b = iter_jobs("a.csv")
    assert (a.path, a.extra, a.line) == (None, {"k": ""}, 2)
    assert (b.path, b.extra, b.line) == ("p", {"k": "v"}, 5)
    write("b.csv", "url,\nhttp://h/a,surprise\n")
    assert "no header name" in error_of("b.csv").reason


def test_tsv(in_tmp: Path) -> None:
    write("urls.tsv", "url\tpath\tk\nhttp://h/a\tp q\tv,w\n")
    (job,) = iter_jobs("urls.tsv")
    assert (job.path, job.extra) == ("p q", {"k": "v,w"})


# --- JSONL --------------------------------------------------------------------------

def test_jsonl_records(in_tmp: Path) -> None:
    write("urls.jsonl", '{"url": "http://h/a", "path": "p", "sha256": "' + SHA + '", "n": [1, 2]}\n'
          '\n{"url": "HTTP://h/b", "path": "", "sha256": null, "k": {"x": 1}}\n')
    a, b = iter_jobs("urls.jsonl")
    assert (a.path, a.sha256, a.extra, a.line) == ("p", SHA, {"n": [1, 2]}, 1)
    assert (b.url, b.path, b.sha256, b.extra, b.line) == (
        "http://h/b", None, None, {"k": {"x": 1}}, 3)


@pytest.mark.parametrize(("text", "reason"), [
    ('{"url": "http://h/a"\n', "invalid JSON"),
    ("[1, 2]\n", "expected a JSON object, got list"),
    ('"http://h/a"\n', "expected a JSON object, got str"),
    ('{"path": "p"}\n', "missing 'url'"),
    ('{"url": 5}\n', "'url' must be a string"),
    ('{"url": "http://h/a", "path": 3}\n', "'path' must be a string"),
    ('{"url": "http://h/a", "x": NaN}\n', "invalid JSON"),
    ('{"url": "gopher://h/a"}\n', "unsupported URL scheme"),
    pytest.param("[" * 100_000 + "\n", "invalid JSON", id="deeply-nested"),
])
def test_jsonl_errors_name_the_line(in_tmp: Path, text: str, reason: str) -> None:
    write("urls.jsonl", '{"url": "http://h/ok"}\n' + text)
    err = error_of("urls.jsonl")
    assert str(err).startswith("urls.jsonl:2: ") and reason in err.reason


# --- stdin, streams, iterables, options ----------------------------------------------

def test_stdin_is_text_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("\ufeffhttp://h/a\nhttp://h/b p\n"))
    jobs = list(iter_jobs("-"))
    assert [(j.url, j.path, j.source, j.line) for j in jobs] == [
        ("http://h/a", None, "<stdin>", 1), ("http://h/b", "p", "<stdin>", 2)]


def test_stdin_error_says_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("http://h/a\nbad\n"))
    assert str(error_of("-")).startswith("<stdin>:2: ")


def test_stdin_with_format(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("url,k\nhttp://h/a,v\n"))
    assert [j.extra for j in iter_jobs("-", fmt="csv")] == [{"k": "v"}]


def test_text_and_binary_streams_are_read_and_left_open() -> None:
    text = io.StringIO("http://h/a\n")
    assert [j.source for j in iter_jobs(text)] == ["<stream>"]
    assert not text.closed
    raw = io.BytesIO(b'{"url": "http://h/\xc3\xa9"}\n')
    assert [j.url for j in iter_jobs(raw, fmt="jsonl")] == ["http://h/\u00e9"]
    assert not raw.closed


def test_open_file_uses_its_name(in_tmp: Path) -> None:
    write("urls.txt", "http://h/a\nnope\n")
    with open("urls.txt", encoding="utf-8") as f:
        assert str(error_of(f)).startswith("urls.txt:2: ")


def test_fmt_overrides_the_extension_and_accepts_aliases(in_tmp: Path) -> None:
    write("list.txt", '{"url": "http://h/a"}\n')
    assert [j.url for j in iter_jobs("list.txt", fmt="ndjson")] == ["http://h/a"]
    assert [j.url for j in iter_jobs(Path("list.txt"), fmt="JSONL")] == ["http://h/a"]


def test_unknown_format_is_a_config_error_at_call_time() -> None:
    with pytest.raises(ConfigError, match="unknown URL list format"):
        iter_jobs("-", fmt="xml")


@pytest.mark.parametrize("bad", [Job("http://h/a"), {"url": "http://h/a"}, b"urls.txt"])
def test_wrong_source_types_are_type_errors(bad: object) -> None:
    with pytest.raises(TypeError):
        iter_jobs(bad)  # type: ignore[arg-type]


def test_iterable_of_urls_records_and_jobs() -> None:
    jobs = list(iter_jobs([
        " http://h/a\n",
        {"url": "HTTP://h/b", "path": "p", "k": 1},
        Job("HTTPS://h/c", sha256=SHA.upper()),
        Job("http://h/d", source="mine.csv", line=40),
    ]))
    assert [(j.url, j.path, j.source, j.line) for j in jobs] == [
        ("http://h/a", None, "<list>", 1), ("http://h/b", "p", "<list>", 2),
        ("https://h/c", None, "<list>", 3), ("http://h/d", None, "mine.csv", 40)]
    assert jobs[1].extra == {"k": 1} and jobs[2].sha256 == SHA


def test_iterable_errors_say_list_and_position() -> None:
    assert str(error_of(["http://h/a", "nope"])).startswith("<list>:2: ")
    assert "got int" in error_of(["http://h/a", 3]).reason
    assert str(error_of(u for u in ["ftp://x/"])).startswith("<list>:1: ")
    assert error_of([Job("ftp://x/", source="f.csv", line=9)]).line == 9


def test_iteration_is_streamed_in_constant_memory(in_tmp: Path) -> None:
    with open("big.txt", "w", encoding="utf-8") as f:
        for i in range(50_000):
            f.write(f"https://example.com/some/dir/file-{i:06d}.bin out/{i}.bin\n")
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_jobs("big.txt"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 50_000
    assert peak < 512 * 1024  # the file is ~3 MB; only a line (and a read buffer) at a time


# --- property: parsers yield valid Jobs or raise UrlListError, nothing else ----------

_url_bits = st.sampled_from([
    "http://h/a", "HTTPS://x.org/p?q#f", "ftp://h/", "http://", "http://[::1]/", "#",
    "http://h:99999/", "url", "path", "sha256", SHA, '"', ",", "\t", " ", "\n", "\r",
    "{", "}", ":", "[", "]", "null", "\x00", "\ufeff", "\udcff", "\u2028", "\\",
])
_list_text = st.lists(st.one_of(_url_bits, st.text(max_size=8)), max_size=30).map("".join)


def _check(jobs_source: object, fmt: str) -> None:
    try:
        for job in iter_jobs(jobs_source, fmt=fmt):  # type: ignore[arg-type]
            assert job.url.startswith(("http://", "https://"))
            assert validate_url(job.url) == job.url
            assert job.sha256 is None or len(job.sha256) == 64
            assert job.line is not None and job.line >= 1
    except UrlListError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_list_text, fmt=st.sampled_from(["text", "csv", "tsv", "jsonl"]))
def test_parsers_yield_valid_jobs_or_raise_url_list_error(text: str, fmt: str) -> None:
    _check(io.StringIO(text), fmt)
    if fmt == "text":
        _check(text.splitlines(), fmt)


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=200), fmt=st.sampled_from(["text", "csv", "tsv", "jsonl"]))
def test_parsers_survive_arbitrary_bytes(data: bytes, fmt: str) -> None:
    _check(io.BytesIO(data), fmt)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_validate_url_only_raises_url_list_error(url: str) -> None:
    try:
        result = validate_url(url)
    except UrlListError:
        return
    assert result.startswith(("http://", "https://")) and result.isprintable()


# --- validate_url's fast path accepts only what the pattern accepts --------------------

def _reference_validate_url(url: str) -> str:
    """validate_url as it was before its fast path: the pattern decides every URL."""
    if url.isprintable() and " " not in url:
        m = re.match(sources._URL_PATTERN, url)
        if (
            m is not None
            and (not m.group(2) or int(m.group(2)) <= 65535)
            and (m.group(1)[0] != "[" or sources._is_ipv6(m.group(1)))
        ):
            if url.startswith(("http://", "https://")):
                return url
            colon = url.index(":")
            return url[:colon].lower() + url[colon:]
    raise UrlListError(sources._url_problem(url), source="<list>", line=None)


def _outcome(validate: Callable[[str], str], url: str) -> str:
    try:
        return "ok " + validate(url)
    except UrlListError as exc:
        return "error " + str(exc)


_authority_bit = st.sampled_from([
    "h", "example", ".", "..", "-", "_", "a-b", "a_b", "x9", "", ":", ":0", ":80", ":65535",
    ":65536", ":99999", ":123456", ":000080", ":1a", "@", "u:p@", "[::1]", "[", "]", "%",
    "%25", "\u00e9", "\u0661", "\u00b2", "?", "#", "\\", "\x00", " ", "\t", "&", "~", "!", "A",
])
_host = st.lists(st.sampled_from(["h", "h", "a-b", "_", "-", "X9", "", "\u00e9"]),
                 min_size=1, max_size=3).map(".".join)
_port = st.sampled_from(["", "", ":", ":0", ":80", ":65535", ":65536", ":99999", ":123456",
                         ":000080", ":00080", ":\u0661", ":\u00b2", ":8a"])
_structured = st.builds(lambda user, host, dot, port: user + host + dot + port,
                        st.sampled_from(["", "", "", "u@", "u:p@"]), _host,
                        st.sampled_from(["", "", "."]), _port)
_authority = st.one_of(_structured, _structured, _structured,
                       st.lists(_authority_bit, max_size=6).map("".join))


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(["http://"] * 4 + ["https://"] * 2
                       + ["HTTP://", "hTTps://", "http:/", "http:", "ftp://", "http//", ""]),
       _authority,
       st.sampled_from(["", "/", "/", "/a", "/a b", "/x?y#z", "?q", "#f", "/\u00e9", "/\x7f",
                        ":"]))
def test_validate_url_equals_the_pattern(scheme: str, authority: str, rest: str) -> None:
    url = scheme + authority + rest
    sources._PLAIN_AUTHORITIES.clear()
    first = _outcome(validate_url, url)
    assert first == _outcome(_reference_validate_url, url)
    assert _outcome(validate_url, url) == first  # again, from the cache of plain hosts
