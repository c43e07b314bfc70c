"""The HTTP/1.1 wire layer against real servers: framing, keep-alive, TLS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fetcher import fetch
from tests.httpserver import TestServer


@pytest.mark.parametrize("fault", ["chunked", "eof"])
def test_bodies_without_content_length(server: TestServer, dest: Path, fault: str) -> None:
    body = os.urandom(100_003)
    url = server.add("/framed", body)
    server.script("/framed", fault)
    report = fetch([url], dest, retries=0)
    assert report.ok, report.failures
    assert (dest / "framed").read_bytes() == body


def test_keep_alive_reuses_one_connection_per_thread(server: TestServer, dest: Path) -> None:
    urls = [server.add(f"/k{i}", os.urandom(3000)) for i in range(50)]
    report = fetch(urls, dest, threads=1)
    assert report.ok and server.connections == 1


def test_server_dropping_idle_connections_is_invisible(server: TestServer,
                                                       dest: Path) -> None:
    urls = [server.add(f"/d{i}", os.urandom(500)) for i in range(6)]
    for i in range(6):
        server.script(f"/d{i}", "drop-idle")
    report = fetch(urls, dest, threads=1, retries=0)
    assert report.ok, report.failures
    assert all(r.attempts == 1 for r in report.results)
    assert server.connections == 6  # each reuse found a dead socket and reconnected


def test_connection_refused_is_a_transport_error(dest: Path) -> None:
    report = fetch(["http://127.0.0.1:9/nothing"], dest, retries=1, backoff_base=0.01)
    result = report.results[0]
    assert result.error_type == "TransportError" and "127.0.0.1:9" in (result.error or "")
    assert result.attempts == 2


def test_https_with_a_ca_bundle(tls_server: TestServer, dest: Path,
                                cert: tuple[str, str]) -> None:
    body = os.urandom(50_000)
    url = tls_server.add("/secure.bin", body)
    report = fetch([url], dest, verify=cert[0])
    assert report.ok, report.failures
    assert (dest / "secure.bin").read_bytes() == body


def test_https_untrusted_certificate_fails_unless_insecure(tls_server: TestServer,
                                                           dest: Path) -> None:
    url = tls_server.add("/x", b"x")
    report = fetch([url], dest, retries=0)
    assert report.results[0].error_type == "TransportError"
    assert "CERTIFICATE_VERIFY_FAILED" in (report.results[0].error or "")
    assert fetch([url], dest, verify=False).ok


def test_http_proxy_is_used(server: TestServer, dest: Path) -> None:
    import threading
    import urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str] = []

    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(self.path)
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(self.path) as upstream:
                data = upstream.read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        url = server.add("/via-proxy.txt", b"proxied")
        proxy_url = f"http://127.0.0.1:{proxy.server_address[1]}"
        report = fetch([url], dest, proxies={"http": proxy_url})
        assert report.ok, report.failures
        assert (dest / "via-proxy.txt").read_bytes() == b"proxied"
        assert seen == [url]
    finally:
        proxy.shutdown()
        proxy.server_close()
