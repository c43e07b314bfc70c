"""The only module that talks HTTP.

One ``HttpClient`` per worker thread, each with its own urllib3 pool (keep-alive,
one connection per host, since a thread runs one request at a time). requests'
per-request machinery (hooks, cookie jars, adapters, re-parsing) costs several
times urllib3's on small files, so the hot path uses urllib3 directly; requests
users keep their habits through ``FetchConfig`` (headers, auth, proxies, verify,
cert) or ``config_from_session``.

Redirects are followed here, not by urllib3, so the policy lives in one place:
http/https targets only, a hop limit, loop detection, and credentials dropped when
the host changes. Transport exceptions become ``TransportError`` at this boundary.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import urllib3
from urllib3.exceptions import HTTPError as Urllib3HTTPError
from urllib3.exceptions import ProtocolError, ReadTimeoutError
from urllib3.util import make_headers

from .config import FetchConfig
from .errors import HTTPStatusError, RedirectError, TransportError, TruncatedError

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
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:  # pragma: no cover - older Pythons
        return None
    delta = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, delta)


class Response:
    """A streaming response. Always ``release()`` it (``with`` does)."""

    __slots__ = ("_raw", "headers", "status", "url")

    def __init__(self, raw: urllib3.BaseHTTPResponse, url: str) -> None:
        self._raw = raw
        self.status: int = raw.status
        self.headers = raw.headers
        self.url = url

    @property
    def content_length(self) -> int | None:
        """Declared body length, if any."""
        value = self.headers.get("Content-Length")
        if value is None or not value.strip().isdigit():
            return None
        return int(value)

    def chunks(self, size: int) -> Iterator[bytes]:
        """Body chunks of up to ``size`` bytes; transport failures become ours."""
        raw = self._raw
        # read1 returns what has arrived (up to size) instead of blocking until size
        # bytes: a slow body still reaches disk steadily, so an interrupt keeps it.
        read = raw.read1
        try:
            while True:
                data = read(size)
                if not data:
                    return
                yield data
        except ReadTimeoutError as exc:
            raise TransportError(f"read timed out for {redact(self.url)}", url=self.url) from exc
        except ProtocolError as exc:
            raise TruncatedError(
                f"connection broken for {redact(self.url)}: {_reason(exc)}", url=self.url
            ) from exc
        except (Urllib3HTTPError, OSError) as exc:
            raise TransportError(
                f"transfer failed for {redact(self.url)}: {_reason(exc)}", url=self.url
            ) from exc

    def release(self) -> None:
        """Give the connection back to the pool if the body was consumed, else close it."""
        raw = self._raw
        try:
            if raw.length_remaining:  # unread body: not worth draining
                raw.close()
            raw.release_conn()
        except Exception:
            pass

    def abort(self) -> None:
        """Break the connection from another thread (used on Ctrl-C)."""
        try:
            shutdown = getattr(self._raw, "shutdown", None)
            if shutdown is not None:
                shutdown()
            else:  # pragma: no cover - urllib3 < 2.3
                self._raw.close()
        except Exception:
            pass

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class HttpClient:
    """An HTTP client for one worker thread (not thread-safe by design)."""

    def __init__(self, config: FetchConfig, *, pool_size: int = 1) -> None:
        self.config = config
        self._timeout = urllib3.Timeout(connect=config.timeout, read=config.timeout)
        tls: dict[str, Any] = {}
        if config.verify is False:
            tls["cert_reqs"] = "CERT_NONE"
        elif isinstance(config.verify, str):
            tls["ca_certs"] = config.verify
        if isinstance(config.cert, str):
            tls["cert_file"] = config.cert
        elif config.cert is not None:
            tls["cert_file"], tls["key_file"] = config.cert
        base_headers = {"User-Agent": config.user_agent, "Accept-Encoding": "identity"}
        base_headers.update(config.headers)
        self._base_headers = base_headers
        common = {"num_pools": 64, "maxsize": pool_size, "block": False, **tls}
        self._direct = urllib3.PoolManager(**common)
        self._proxied: dict[str, urllib3.ProxyManager] = {}
        for scheme, proxy_url in (config.proxies or {}).items():
            self._proxied[scheme] = urllib3.ProxyManager(proxy_url, **common)

    def _manager(self, url: str) -> urllib3.PoolManager:
        scheme = url.partition(":")[0].lower()
        return self._proxied.get(scheme, self._direct)

    def get(self, url: str, headers: Mapping[str, str] | None = None) -> Response:
        """GET ``url`` following redirects; returns the final response, status unchecked.

        Raises ``TransportError`` (connect/TLS/timeout) and ``RedirectError``.
        """
        origin_host = host_of(url)
        auth_header = self._auth_header(url)
        current = _strip_userinfo(url)
        seen = {current}
        for _hop in range(self.config.max_redirects + 1):
            hdrs = dict(self._base_headers)
            if headers:
                hdrs.update(headers)
            if auth_header and host_of(current) == origin_host:
                hdrs["Authorization"] = auth_header
            elif host_of(current) != origin_host:
                hdrs.pop("Authorization", None)
                hdrs.pop("Cookie", None)
            raw = self._request(current, hdrs)
            if raw.status not in REDIRECT_STATUSES or not raw.headers.get("Location"):
                return Response(raw, current)
            location = raw.headers["Location"]
            _discard(raw)
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
            from urllib.parse import unquote

            cred = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            return make_headers(basic_auth=cred)["authorization"]
        if self.config.auth is not None:
            user, password = self.config.auth
            return make_headers(basic_auth=f"{user}:{password}")["authorization"]
        return None

    def _request(self, url: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        try:
            return self._manager(url).urlopen(
                "GET", url, headers=headers, redirect=False, retries=False,
                preload_content=False, timeout=self._timeout, decode_content=False,
            )
        except (Urllib3HTTPError, OSError) as exc:
            raise TransportError(f"request failed for {redact(url)}: {_reason(exc)}",
                                 url=url) from exc

    def close(self) -> None:
        """Close every pooled connection."""
        self._direct.clear()
        for mgr in self._proxied.values():
            mgr.clear()


def raise_for_status(resp: Response, *, url: str) -> None:
    """Raise ``HTTPStatusError`` for 4xx/5xx, after discarding the body (never saved)."""
    if resp.status < 400:
        return
    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
    _discard(resp._raw)
    raise HTTPStatusError(resp.status, url=url, retry_after=retry_after)


def _discard(raw: urllib3.BaseHTTPResponse) -> None:
    """Drain a small unwanted body so the connection can be reused; close a large one."""
    try:
        remaining = raw.length_remaining
        if remaining is not None and remaining <= _DRAIN_LIMIT:
            raw.drain_conn()
        else:
            raw.close()
        raw.release_conn()
    except Exception:
        raw.close()


def _strip_userinfo(url: str) -> str:
    if "@" not in url:
        return url
    parts = urlsplit(url)
    if parts.username is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _reason(exc: BaseException) -> str:
    """A short, readable cause from urllib3's nested exceptions."""
    inner: BaseException = exc
    for _ in range(4):
        nxt = getattr(inner, "reason", None) or inner.__context__
        if not isinstance(nxt, BaseException):
            break
        inner = nxt
    text = str(inner) or type(inner).__name__
    return text if inner is exc else f"{type(inner).__name__}: {text}"


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
