"""Requests through HTTP(S) proxies, on urllib3's ProxyManager (CONNECT tunnels included).

Imported only when ``FetchConfig.proxies`` is set, so direct downloads never pay for
importing urllib3.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import urllib3
from urllib3.exceptions import HTTPError as Urllib3HTTPError
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from .config import FetchConfig
from .errors import TransportError, TruncatedError
from .http import _DRAIN_LIMIT, Response, redact


def proxy_managers(config: FetchConfig) -> dict[str, Any]:
    """One ProxyManager per proxied scheme, with the config's TLS settings."""
    tls: dict[str, Any] = {}
    if config.verify is False:
        tls["cert_reqs"] = "CERT_NONE"
    elif isinstance(config.verify, str):
        tls["ca_certs"] = config.verify
    if isinstance(config.cert, str):
        tls["cert_file"] = config.cert
    elif config.cert is not None:
        tls["cert_file"], tls["key_file"] = config.cert
    return {scheme.lower(): urllib3.ProxyManager(proxy_url, num_pools=64, maxsize=1,
                                                 block=False, **tls)
            for scheme, proxy_url in (config.proxies or {}).items()}


def request_proxied(proxy: Any, url: str, headers: dict[str, str], *,
                    timeout: float) -> Response:
    """GET ``url`` through ``proxy`` without following redirects (http.py does that)."""
    try:
        raw = proxy.urlopen(
            "GET", url, headers=headers, redirect=False, retries=False,
            preload_content=False, decode_content=False,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
        )
    except (Urllib3HTTPError, OSError) as exc:
        raise TransportError(f"request failed for {redact(url)}: {_reason(exc)}",
                             url=url) from exc
    return _PooledResponse(raw, url)


class _PooledResponse(Response):
    """A urllib3 response (used for proxied requests)."""

    __slots__ = ("_raw", "headers", "status", "url")

    def __init__(self, raw: urllib3.BaseHTTPResponse, url: str) -> None:
        self._raw = raw
        self.status = raw.status
        self.headers = raw.headers
        self.url = url

    def chunks(self, size: int) -> Iterator[bytes]:
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

    def discard(self) -> None:
        raw = self._raw
        try:
            remaining = raw.length_remaining
            if remaining is not None and remaining <= _DRAIN_LIMIT:
                raw.drain_conn()
            else:
                raw.close()
            raw.release_conn()
        except Exception:
            raw.close()

    def release(self) -> None:
        raw = self._raw
        try:
            if raw.length_remaining:  # unread body: not worth draining
                raw.close()
            raw.release_conn()
        except Exception:
            pass

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._raw.shutdown()


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


