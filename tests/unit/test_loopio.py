"""loop_framing must never read a head differently from wire.parse_head + Body."""

from __future__ import annotations

import pytest

from fetcher.config import FetchConfig
from fetcher.loopio import loop_framing
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
