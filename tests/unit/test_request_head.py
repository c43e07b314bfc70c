"""Request heads: the split-based fast path must agree with the urlsplit-based one."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fetcher import http as http_mod
from fetcher.config import FetchConfig
from fetcher.errors import TransportError
from fetcher.http import HttpClient, request_head

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


def _reference_head(url: str, headers: dict[str, str]) -> tuple[tuple[str, str, int], bytes]:
    """request_head as it was before the cache of plain origins."""
    fields = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    if url.isascii() and "@" not in url and "[" not in url and " " not in url \
            and "#" not in url:
        scheme, _, rest = url.partition("://")
        netloc, slash, path = rest.partition("/")
        scheme = scheme.lower()
        if "?" not in netloc and scheme in ("http", "https") and netloc:
            host, _, port_text = netloc.partition(":")
            if not port_text:
                port = 80 if scheme == "http" else 443
            elif port_text.isdigit() and 0 < int(port_text) < 65536:
                port = int(port_text)
            else:
                raise TransportError("bad port")
            target = slash + path if slash else "/"
            head = f"GET {target} HTTP/1.1\r\nHost: {netloc}\r\n{fields}\r\n"
            return (scheme, host.lower(), port), head.encode("latin-1")
    return request_head(url + "#", headers)  # '#' forces the general path, unchanged


def _outcome(url: str, head: Callable[[str], object]) -> object:
    try:
        return head(url)
    except (TransportError, ValueError, KeyError) as exc:
        return type(exc).__name__


_url = st.builds(
    "".join,
    st.tuples(st.sampled_from(["http://", "https://", "HTTP://", "ftp://", "http:/", ""]),
              st.sampled_from(["h", "H", "h.example", "H.example", "h:8080", "h:", "h:0",
                               "h:99999", "h:x", "", "h?q", "u@h", "[::1]", "b\u00fccher"]),
              st.sampled_from(["", "/", "/a/b.txt", "/a?x=1", "?q", "/a b", "/p#f", "/\u00e9",
                               "/a@b", "//x", "/:80/"])))


@settings(max_examples=500, deadline=None)
@given(st.lists(_url, min_size=1, max_size=8))
def test_fast_paths_equal_the_previous_code(urls: list[str]) -> None:
    http_mod._PLAIN_ORIGINS.clear()
    client = HttpClient(FetchConfig(user_agent="t"))
    for url in urls + urls:  # the second time from the cache of plain origins
        expected = _outcome(url, lambda u: _reference_head(u, H))
        assert _outcome(url, lambda u: request_head(u, H)) == expected
        if "@" not in url:  # prepare() adds the credentials of a userinfo
            assert _outcome(url, client.prepare) == expected
