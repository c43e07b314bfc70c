"""The only module that talks HTTP.

One ``HttpClient`` per worker thread, each keeping one idle keep-alive connection
per origin (a thread runs one request at a time). Direct connections speak HTTP/1.1
through ``wire.py``, because requests' and even urllib3's per-request machinery is
what caps a Python downloader on small files (see ARCHITECTURE.md); proxied schemes
use urllib3's ProxyManager. requests users keep their habits through ``FetchConfig``
(headers, auth, proxies, verify, cert) or ``config_from_session``.

Redirects are followed here, not by urllib3, so the policy lives in one place:
http/https targets only, a hop limit, loop detection, and credentials dropped when
the host changes. Transport exceptions become ``TransportError`` at this boundary.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

from .config import FetchConfig
from .errors import (
    CancelledError,
    HTTPStatusError,
    RedirectError,
    TransportError,
    TruncatedError,
)
from .models import plain_methods
from .wire import Body, Connection, Headers, StaleConnection, WireError, tls_context

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DRAIN_LIMIT = 64 * 1024


def redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs, manifest, progress)."""
    if "@" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    cred = f"{user}:***" if parts.password is not None else user
    return urlunsplit((parts.scheme, f"{cred}@{host}", parts.path, parts.query, parts.fragment))


def host_of(url: str) -> str:
    """``host[:port]`` of a URL, without credentials (the key for per-host limits)."""
    netloc = urlsplit(url).netloc
    return netloc.rpartition("@")[2].lower()


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    import email.utils  # rare: only servers that send an HTTP-date

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:  # pragma: no cover - older Pythons
        return None
    delta = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, delta)


class Response:
    """A streaming response, whichever transport carried it. Always ``release()`` it."""

    status: int
    headers: Any
    url: str

    @property
    def content_length(self) -> int | None:
        """Declared body length, if any."""
        value = self.headers.get("Content-Length")
        if value is None or not value.strip().isdigit():
            return None
        return int(value)

    def chunks(self, size: int) -> Iterator[bytes]:
        """Body chunks of up to ``size`` bytes as they arrive; failures become ours."""
        raise NotImplementedError

    def discard(self) -> None:
        """Drop an unwanted body: read a small one so the connection is reused."""
        raise NotImplementedError

    @property
    def fills_buffers(self) -> bool:
        """Whether ``readinto`` works (a length-framed body on our own connection)."""
        return False

    def readinto(self, buf: memoryview) -> int:
        """Body bytes into the front of ``buf``; 0 at the end (see ``fills_buffers``)."""
        raise NotImplementedError

    def release(self) -> None:
        """Return the connection if the body was consumed, else close it."""
        raise NotImplementedError

    def abort(self) -> None:
        """Break the connection from another thread (Ctrl-C)."""
        raise NotImplementedError

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _WireResponse(Response):
    """A response on one of the client's own keep-alive connections (``wire.py``)."""

    __slots__ = ("_body", "_client", "_key", "headers", "status", "url")

    def __init__(self, client: HttpClient, key: tuple[str, str, int], status: int,
                 headers: Headers, body: Body, url: str) -> None:
        self._client, self._key, self._body = client, key, body
        self.status, self.headers, self.url = status, headers, url

    def chunks(self, size: int) -> Iterator[bytes]:
        try:
            yield from self._body.chunks(size)
        except WireError as exc:
            raise self._body_error(exc) from exc

    @property
    def fills_buffers(self) -> bool:
        return not self._body.chunked

    def readinto(self, buf: memoryview) -> int:
        try:
            return self._body.readinto(buf)
        except WireError as exc:
            raise self._body_error(exc) from exc

    def _body_error(self, exc: WireError) -> TransportError:
        shown = redact(self.url)
        if exc.kind == "truncated":
            return TruncatedError(f"connection broken for {shown}: {exc}", url=self.url)
        return TransportError(f"transfer failed for {shown}: {exc}", url=self.url)

    def discard(self) -> None:
        body = self._body
        if body.remaining is not None and body.remaining <= _DRAIN_LIMIT:
            try:
                for _ in body.chunks(_DRAIN_LIMIT):
                    pass
            except WireError:
                pass
        self.release()

    def release(self) -> None:
        body = self._body
        if body.done and body.keep_alive and not body.conn.buf:
            # One idle connection per origin: a connection handed over by the loop can
            # find the slot taken, and the one it replaces must not stay open.
            old = self._client._idle.get(self._key)
            if old is not None and old is not body.conn:
                old.close()
            self._client._idle[self._key] = body.conn
        else:
            body.conn.close()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._body.conn.sock.shutdown(socket.SHUT_RDWR)


_DEFAULT_PORTS = {"http": 80, "https": 443}
# RFC 3986 reserved and unreserved characters plus "%": kept as they are when a request
# target is re-quoted, so existing escapes survive and only raw bytes get escaped.
_URI_SAFE = "!#$%&'()*+,/:;=?@[]~"


Origin = tuple[str, str, int]
"""(scheme, host, port): the key of a keep-alive connection."""


@plain_methods
@dataclass(slots=True, init=False, repr=False, eq=False)
class Prefetched:
    """Hop 0 of a GET whose head another loop sent and read; the connection stays open."""

    conn: Connection
    key: Origin
    status: int
    headers: Headers
    http11: bool
    reuse: bool = True
    """False when responses to requests pipelined behind this one follow it on the
    connection: it is closed after this body."""

    # Written out, and __repr__/__eq__ from plain_methods, not generated: dataclasses
    # compiles generated methods at every import (~3 M instructions);
    # tests/unit/test_models_dataclasses.py holds them to those.
    def __init__(self, conn: Connection, key: Origin, status: int, headers: Headers,
                 http11: bool, reuse: bool = True) -> None:
        self.conn = conn
        self.key = key
        self.status = status
        self.headers = headers
        self.http11 = http11
        self.reuse = reuse


_PLAIN_ORIGINS: dict[str, tuple[Origin, str]] = {}
"""``scheme://netloc`` of plain URLs -> (origin, Host value); bounded (few per run)."""


def _header_lines(headers: Mapping[str, str]) -> str:
    return "".join(f"{k}: {v}\r\n" for k, v in headers.items())


def request_head(url: str, headers: Mapping[str, str]) -> tuple[Origin, bytes]:
    """The origin and the bytes of ``GET url`` with ``headers`` (no credentials in url).

    Plain ASCII URLs take a split-based path that costs a fraction of ``urlsplit``; the
    rest (userinfo, IPv6, fragments, non-ASCII, spaces) the general one.
    """
    return _request_head(url, _header_lines(headers))


def _request_head(url: str, fields: str) -> tuple[Origin, bytes]:
    """``request_head`` with the header lines already joined."""
    if url.isascii() and "@" not in url and "[" not in url and " " not in url \
            and "#" not in url:
        sep = url.find("://")
        if sep > 0:
            end = url.find("/", sep + 3)
            known = _PLAIN_ORIGINS.get(url if end < 0 else url[:end])
            if known is not None:  # an origin the split-based path below took before
                origin, host_value = known
                target = url[end:] if end >= 0 else "/"
                head = f"GET {target} HTTP/1.1\r\nHost: {host_value}\r\n{fields}\r\n"
                return origin, head.encode("latin-1")
        scheme, _, rest = url.partition("://")
        netloc, slash, path = rest.partition("/")
        scheme = scheme.lower()
        if "?" not in netloc and scheme in _DEFAULT_PORTS and netloc:
            host, _, port_text = netloc.partition(":")
            if not port_text:
                port = _DEFAULT_PORTS[scheme]
            elif port_text.isdigit() and 0 < int(port_text) < 65536:
                port = int(port_text)
            else:
                raise TransportError(f"bad port in {redact(url)}", url=url)
            target = slash + path if slash else "/"
            head = f"GET {target} HTTP/1.1\r\nHost: {netloc}\r\n{fields}\r\n"
            origin = (scheme, host.lower(), port)
            if len(_PLAIN_ORIGINS) < 1024:
                _PLAIN_ORIGINS[url[:len(url) - len(rest) + len(netloc)]] = (origin, netloc)
            return origin, head.encode("latin-1")
    scheme = url.partition(":")[0].lower()
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise TransportError(f"bad port in {redact(url)}", url=url) from exc
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    if not target.isascii() or " " in target:
        target = quote(target, safe=_URI_SAFE)  # as requests does: UTF-8, %-escaped
    netloc = parts.netloc.rpartition("@")[2]
    if not netloc.isascii():
        try:
            host = host.encode("idna").decode("ascii")
            netloc = host if parts.port is None else f"{host}:{parts.port}"
        except UnicodeError as exc:
            raise TransportError(f"{redact(url)}: host is not a valid IDNA name",
                                 url=url) from exc
    head = f"GET {target} HTTP/1.1\r\nHost: {netloc}\r\n{fields}\r\n"
    return (scheme, host, port), head.encode("latin-1")


class HttpClient:
    """An HTTP client for one worker thread (not thread-safe by design).

    Direct connections use ``wire.py`` (one idle keep-alive connection per origin);
    proxied schemes go through urllib3's ProxyManager, which knows CONNECT tunnels.
    """

    def __init__(self, config: FetchConfig, *, cancel: threading.Event | None = None) -> None:
        self.config = config
        self._cancel = cancel
        self._inflight: socket.socket | None = None
        base_headers = {"User-Agent": config.user_agent, "Accept-Encoding": "identity"}
        base_headers.update(config.headers)
        self._base_headers = base_headers
        self._hop0_fields: str | None = None
        if config.auth is None:  # otherwise hop 0 carries an Authorization header
            self._hop0_fields = _header_lines(base_headers)
        self._idle: dict[tuple[str, str, int], Connection] = {}
        self._proxied: dict[str, Any] = {}
        if config.proxies:
            from .proxied import proxy_managers  # urllib3, imported only when needed

            self._proxied = proxy_managers(config)

    def get(self, url: str, headers: Mapping[str, str] | None = None, *,
            first: Prefetched | None = None) -> Response:
        """GET ``url`` following redirects; returns the final response, status unchecked.

        ``first`` is hop 0's response when another loop already sent that request.
        Raises ``TransportError`` (connect/TLS/timeout) and ``RedirectError``.
        """
        origin_host = host_of(url)
        auth_header = self._auth_header(url)
        current = _strip_userinfo(url)
        seen = {current}
        trusted = True  # once a redirect leaves the origin, credentials never return
        for _hop in range(self.config.max_redirects + 1):
            hdrs = dict(self._base_headers)
            if headers:
                hdrs.update(headers)
            if trusted and current is not url and current != url:
                # Another host, or https downgraded to http: credentials would leak.
                trusted = host_of(current) == origin_host and not (
                    url[:6].lower() == "https:" and current[:5].lower() == "http:")
            if not trusted:
                hdrs.pop("Authorization", None)
                hdrs.pop("Cookie", None)
            elif auth_header:
                hdrs["Authorization"] = auth_header
            if first is not None:
                resp, first = self._adopt(first, url), None
            else:
                resp = self._request(current, hdrs)
            location = resp.headers.get("Location")
            if resp.status not in REDIRECT_STATUSES or not location:
                return resp
            resp.discard()
            target = urljoin(current, location)
            scheme = target.partition(":")[0].lower()
            if scheme not in ("http", "https"):
                raise RedirectError(
                    f"redirect from {redact(url)} to a non-http(s) URL: {redact(target)}", url=url
                )
            target = _strip_userinfo(target)
            if target in seen:
                raise RedirectError(f"redirect loop at {redact(target)} from {redact(url)}",
                                    url=url)
            seen.add(target)
            current = target
        raise RedirectError(
            f"more than {self.config.max_redirects} redirects from {redact(url)}", url=url
        )

    def _auth_header(self, url: str) -> str | None:
        parts = urlsplit(url)
        if parts.username is not None:
            return _basic(f"{unquote(parts.username)}:{unquote(parts.password or '')}")
        if self.config.auth is not None:
            user, password = self.config.auth
            return _basic(f"{user}:{password}")
        return None

    def prepare(self, url: str) -> tuple[Origin, bytes]:
        """The origin and request head of hop 0 of ``get(url)`` (for ``multiplex.py``)."""
        if "@" not in url and self._hop0_fields is not None:
            return _request_head(url, self._hop0_fields)
        hdrs = dict(self._base_headers)
        auth_header = self._auth_header(url)
        if auth_header:
            hdrs["Authorization"] = auth_header
        return request_head(_strip_userinfo(url), hdrs)

    def _request(self, url: str, headers: dict[str, str]) -> Response:
        scheme = url.partition(":")[0].lower()
        proxy = self._proxied.get(scheme)
        if proxy is not None:
            from .proxied import request_proxied

            return request_proxied(proxy, url, headers, timeout=self.config.timeout)
        key, head = request_head(url, headers)
        scheme, host, port = key
        for _try in range(2):
            conn = self._idle.pop(key, None)
            try:
                if conn is None:
                    tls = tls_context(self.config.verify, self.config.cert) \
                        if scheme == "https" else None
                    conn = Connection(host, port, timeout=self.config.timeout, tls=tls,
                                      cancel=self._cancel, on_socket=self._set_inflight)
                else:
                    self._set_inflight(conn.sock)
                status, resp_headers, http11 = conn.request(head)
                body = Body(conn, status, resp_headers, http11=http11)
            except StaleConnection:
                if conn is not None:
                    conn.close()
                continue  # the server closed an idle keep-alive connection: reconnect
            except WireError as exc:
                if conn is not None:
                    conn.close()
                if self._cancel is not None and self._cancel.is_set():
                    raise CancelledError(f"cancelled: {redact(url)}", url=url) from exc
                raise TransportError(f"request failed for {redact(url)}: {exc}",
                                     url=url) from exc
            finally:
                self._set_inflight(None)
            return _WireResponse(self, key, status, resp_headers, body, url)
        raise TransportError(f"request failed for {redact(url)}: connection closed", url=url)

    def _adopt(self, pre: Prefetched, url: str) -> Response:
        try:
            body = Body(pre.conn, pre.status, pre.headers, http11=pre.http11)
        except WireError as exc:
            pre.conn.close()
            raise TransportError(f"request failed for {redact(url)}: {exc}", url=url) from exc
        if not pre.reuse:
            body.keep_alive = False
        return _WireResponse(self, pre.key, pre.status, pre.headers, body, url)

    def _set_inflight(self, sock: socket.socket | None) -> None:
        self._inflight = sock

    def abort(self) -> None:
        """Break a request that is connecting or waiting for its response head (Ctrl-C).

        Bodies are aborted through their Response; this covers the time before one exists.
        """
        sock = self._inflight
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def take_idle(self) -> list[tuple[Origin, Connection]]:
        """Remove and return the pooled direct connections (for ``Multiplexer.handed_done``)."""
        idle = list(self._idle.items())
        self._idle.clear()
        return idle

    def close(self) -> None:
        """Close every pooled connection."""
        for conn in self._idle.values():
            conn.close()
        self._idle.clear()
        for mgr in self._proxied.values():
            mgr.clear()


def raise_for_status(resp: Response, *, url: str) -> None:
    """Raise ``HTTPStatusError`` for 4xx/5xx, after discarding the body (never saved)."""
    if resp.status < 400:
        return
    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
    resp.discard()
    raise HTTPStatusError(resp.status, url=url, retry_after=retry_after)


def _basic(credentials: str) -> str:
    import base64  # runs with credentials only

    return "Basic " + base64.b64encode(credentials.encode("latin-1")).decode("ascii")


def _strip_userinfo(url: str) -> str:
    if "@" not in url:
        return url
    parts = urlsplit(url)
    if parts.username is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def config_from_session(session: Any, base: FetchConfig | None = None) -> FetchConfig:
    """A FetchConfig carrying a ``requests.Session``'s headers, auth, proxies and TLS options."""
    cfg = base or FetchConfig()
    auth = session.auth
    if auth is not None and not isinstance(auth, tuple):
        user, password = getattr(auth, "username", None), getattr(auth, "password", None)
        if user is None:
            from .errors import ConfigError

            raise ConfigError("only basic auth (a (user, password) tuple) can be taken from a "
                              "requests.Session; pass headers={'Authorization': ...} instead")
        auth = (user, password)
    headers = {k: v for k, v in session.headers.items()
               if k.lower() not in ("accept-encoding", "connection")}
    headers.update(cfg.headers)
    return cfg.replace(
        headers=headers, auth=auth or cfg.auth,
        proxies=dict(session.proxies) or cfg.proxies,
        verify=session.verify if session.verify is not True else cfg.verify,
        cert=session.cert or cfg.cert,
    )
