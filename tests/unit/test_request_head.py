"""Request heads: the split-based fast path must agree with the urlsplit-based one."""

from __future__ import annotations

import pytest

from fetcher.errors import TransportError
from fetcher.http import request_head

H = {"User-Agent": "t", "Accept-Encoding": "identity"}
TAIL = "User-Agent: t\r\nAccept-Encoding: identity\r\n\r\n"


@pytest.mark.parametrize(("url", "origin", "target", "host"), [
    ("http://Example.COM/a/b.txt", ("http", "example.com", 80), "/a/b.txt", "Example.COM"),
    ("HTTPS://example.com:8443/x?y=1", ("https", "example.com", 8443), "/x?y=1",
     "example.com:8443"),
    ("http://example.com", ("http", "example.com", 80), "/", "example.com"),
    ("http://example.com:/p", ("http", "example.com", 80), "/p", "example.com:"),
    ("http://example.com?q=1", ("http", "example.com", 80), "/?q=1", "example.com"),
    ("http://example.com/p#frag", ("http", "example.com", 80), "/p", "example.com"),
    ("http://[::1]:8080/v6", ("http", "::1", 8080), "/v6", "[::1]:8080"),
    ("http://example.com/a b/ü", ("http", "example.com", 80), "/a%20b/%C3%BC",
     "example.com"),
    ("http://bücher.example/x", ("http", "xn--bcher-kva.example", 80), "/x",
     "xn--bcher-kva.example"),
])
def test_heads(url: str, origin: tuple[str, str, int], target: str, host: str) -> None:
    key, head = request_head(url, H)
    assert key == origin
    assert head == f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{TAIL}".encode("latin-1")


@pytest.mark.parametrize("url", ["http://example.com:99999/x", "http://example.com:x1/"])
def test_bad_ports(url: str) -> None:
    with pytest.raises(TransportError, match="bad port"):
        request_head(url, H)
