"""loop_framing must never read a head differently from wire.parse_head + Body."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fetcher.config import FetchConfig
from fetcher.download import type_matches
from fetcher.loopio import _unusual, loop_framing
from fetcher.wire import Body, Connection, parse_head

HEADS = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5",
    b"HTTP/1.1 200 OK\r\ncontent-length:5\r\nConnection: Keep-Alive",
    b"HTTP/1.1 200 OK\r\nContent-Length:  5 \r\nConnection: close",
    b"HTTP/1.0 200 OK\r\nContent-Length: 5",
    b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7",
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: close\r\nContent-Length: 5",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding : chunked\r\nContent-Length: 5",
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\n Transfer-Encoding: chunked\r\nContent-Length: 5",
    b"HTTP/1.1 200 OK\r\nX-Content-Length: 9\r\nContent-Length: 5",
    b"HTTP/1.1 200 OK\r\nContent-Length: 99999999",
    b"HTTP/1.1 200 OK\r\nContent-Length: -5",
    b"HTTP/1.1 200 OK",
]


@pytest.mark.parametrize("raw", HEADS)
def test_agrees_with_the_full_parser(raw: bytes) -> None:
    length, keep = loop_framing(raw, FetchConfig(), 64 * 1024)
    if length < 0:
        return  # the full parser decides, on a thread
    status, headers, http11 = parse_head(raw)
    body = Body(Connection.__new__(Connection), status, headers, http11=http11)
    assert body.remaining == length
    assert not keep or body.keep_alive  # never keeps what the parser would close


def test_content_disposition_and_type_hand_over_when_asked() -> None:
    raw = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/html\r\n"
           b"Content-Disposition: attachment; filename=x")
    assert loop_framing(raw, FetchConfig(), 1024)[0] == 5
    assert loop_framing(raw, FetchConfig(content_disposition=True), 1024)[0] == -1
    assert loop_framing(raw, FetchConfig(expect_type="image/*"), 1024)[0] == -1
    assert loop_framing(raw, FetchConfig(expect_type="text/*"), 1024)[0] == 5


# The regex-based implementation the substring scans replaced, kept as the reference.
_UNUSUAL_RE = re.compile(rb"[ \t]:|\r\n[ \t]|\n(?<!\r\n)|\r(?!\n)")


def _reference_field(low: bytes, name: bytes) -> bytes | None:
    i = low.find(name)
    if i < 0 or low.find(name, i + len(name)) >= 0:
        return None
    start = i + len(name)
    j = low.find(b"\r\n", start)
    return low[start:j if j >= 0 else len(low)].strip()


def _reference_framing(raw: bytes, cfg: FetchConfig, limit: int) -> tuple[int, bool]:
    if _UNUSUAL_RE.search(raw):
        return -1, False
    low = raw.lower()
    if b"\r\ntransfer-encoding:" in low:
        return -1, False
    length = _reference_field(low, b"\r\ncontent-length:")
    if length is None or not length.isdigit() or int(length) > limit:
        return -1, False
    if cfg.content_disposition and b"\r\ncontent-disposition:" in low:
        return -1, False
    if cfg.expect_type:
        ctype = _reference_field(low, b"\r\ncontent-type:")
        if ctype is None or not type_matches(ctype.decode("latin-1"), cfg.expect_type):
            return -1, False
    connection = _reference_field(low, b"\r\nconnection:")
    http11 = raw[5:8] == b"1.1"
    if connection is None:
        keep = http11 and b"\r\nconnection:" not in low
    else:
        keep = (http11 and b"close" not in connection) or b"keep-alive" in connection
    return int(length), keep


_LINE = st.tuples(
    st.sampled_from([b"\r\n"] * 30 + [b"\n", b"\r", b"\r\n ", b"\r\n\t", b"\r\r\n"]),
    st.sampled_from([b"Content-Length", b"content-length", b"CONNECTION", b"Connection",
                     b"Transfer-Encoding", b"Content-Type", b"Content-Disposition", b"X-A",
                     b"X-Content-Length"]),
    st.sampled_from([b": "] * 20 + [b":", b":  ", b" :", b"\t:", b":\t"]),
    st.sampled_from([b"5", b" 5 ", b"10240", b"99999", b"-5", b"5, 5", b"close",
                     b"keep-alive", b"Keep-Alive, close", b"chunked", b"text/html",
                     b"image/png", b"attachment; filename=x", b"a:b", b""]),
).map(b"".join)
_HEADS = st.builds(
    lambda first, lines, length, at, end:
        first + b"".join(lines[:at]) + length + b"".join(lines[at:]) + end,
    st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 200"]),
    st.lists(_LINE, max_size=6),
    st.sampled_from([b"\r\nContent-Length: 5", b"\r\ncontent-length:10240 "]),
    st.integers(0, 6),
    st.sampled_from([b""] * 8 + [b"\r", b"\n", b" "]),
)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b" ", b"\t", b":", b"a"]), max_size=12))
def test_unusual_equals_the_regex(pieces: list[bytes]) -> None:
    raw = b"".join(pieces)
    assert _unusual(raw) == bool(_UNUSUAL_RE.search(raw))


@settings(max_examples=1500, deadline=None)
@given(_HEADS, st.sampled_from([
    FetchConfig(), FetchConfig(content_disposition=True), FetchConfig(expect_type="text/*"),
]), st.sampled_from([5, 64 * 1024]))
def test_framing_equals_the_previous_implementation(raw: bytes, cfg: FetchConfig,
                                                    limit: int) -> None:
    assert loop_framing(raw, cfg, limit) == _reference_framing(raw, cfg, limit)
