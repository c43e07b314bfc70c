"""Hostile servers and broken networks (issue 3): retries, resume, politeness, safety."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fetcher import fetch
from tests.httpserver import TestServer

FAST = {"backoff_base": 0.01, "backoff_max": 0.05}


def test_retryable_statuses_then_success(server: TestServer, dest: Path) -> None:
    url = server.add("/flaky", b"finally")
    server.script("/flaky", "status:503", "status:500", "status:502", "status:504",
                  "status:408")
    report = fetch([url], dest, retries=5, **FAST)
    assert report.ok and report.results[0].attempts == 6
    assert (dest / "flaky").read_bytes() == b"finally"


def test_client_errors_are_not_retried_and_never_saved(server: TestServer, dest: Path) -> None:
    url = server.add("/gone", b"data")
    server.script("/gone", "status:404")
    report = fetch([url], dest, retries=5, **FAST)
    result = report.results[0]
    assert result.status == "failed" and result.attempts == 1
    assert result.error_type == "HTTPStatusError" and result.http_status == 404
    assert not (dest / "gone").exists()
    assert len(server.requests("/gone")) == 1


def test_retry_after_is_honoured_and_pauses_the_host(server: TestServer, dest: Path) -> None:
    urls = [server.add(f"/ra{i}", b"x") for i in range(4)]
    server.script("/ra0", "status:429:1")
    started = time.monotonic()
    report = fetch(urls, dest, threads=4, retries=2, backoff_base=0.01, backoff_max=5)
    assert report.ok and report.results[0].attempts in (1, 2)
    assert time.monotonic() - started >= 1.0
    by_url = {r.url: r for r in report.results}
    assert by_url[urls[0]].attempts == 2


def test_retry_after_http_date(server: TestServer, dest: Path) -> None:
    from email.utils import formatdate

    url = server.add("/date", b"x")
    server.script("/date", "status:503:" + formatdate(time.time() + 2, usegmt=True))
    started = time.monotonic()
    report = fetch([url], dest, retries=1, backoff_base=0.01, backoff_max=5)
    assert report.ok and time.monotonic() - started >= 1.0


def test_cut_body_resumes_with_range_and_if_range(server: TestServer, dest: Path) -> None:
    body = os.urandom(300_000)
    url = server.add("/big", body)
    server.script("/big", "cut:100000")
    report = fetch([url], dest, retries=2, **FAST)
    assert report.ok, report.failures
    assert (dest / "big").read_bytes() == body
    assert report.results[0].sha256 == hashlib.sha256(body).hexdigest()
    second = server.requests("/big")[1][1]
    assert second["Range"] == "bytes=100000-"
    assert second["If-Range"] == server.route("/big").etag


def test_ignored_range_restarts_from_zero(server: TestServer, dest: Path) -> None:
    body = os.urandom(200_000)
    url = server.add("/norange", body)
    server.script("/norange", "cut:50000", "norange")
    report = fetch([url], dest, retries=2, **FAST)
    assert report.ok and (dest / "norange").read_bytes() == body


def test_changed_resource_is_not_appended(server: TestServer, dest: Path) -> None:
    old, new = os.urandom(200_000), os.urandom(250_000)
    url = server.add("/changing", old)
    server.script("/changing", "cut:80000")
    route = server.route("/changing")
    original_etag = route.etag

    def swap_after_first_request() -> None:
        while len(server.requests("/changing")) < 1:
            time.sleep(0.005)
        route.body, route.etag = new, '"v2"'

    t = threading.Thread(target=swap_after_first_request)
    t.start()
    report = fetch([url], dest, retries=2, backoff_base=0.2, backoff_max=0.3)
    t.join()
    assert report.ok
    assert (dest / "changing").read_bytes() == new
    assert server.requests("/changing")[1][1]["If-Range"] == original_etag


def test_body_shorter_than_content_length_is_never_ok(server: TestServer, dest: Path) -> None:
    url = server.add("/short", os.urandom(10_000), ranges=False)
    server.script("/short", "cut:5000", "cut:5000", "cut:5000")
    report = fetch([url], dest, retries=2, **FAST)
    result = report.results[0]
    assert result.status == "failed" and result.error_type == "TruncatedError"
    assert not (dest / "short").exists()


def test_stall_times_out_and_retries(server: TestServer, dest: Path) -> None:
    body = os.urandom(100_000)
    url = server.add("/stall", body)
    server.script("/stall", "stall:3")
    report = fetch([url], dest, retries=1, timeout=0.5, **FAST)
    assert report.ok and report.results[0].attempts == 2
    assert (dest / "stall").read_bytes() == body


def test_slow_but_steady_body_is_not_a_failure(server: TestServer, dest: Path) -> None:
    body = os.urandom(20_000)
    url = server.add("/slow", body, slow_bps=10_000)  # ~2 s in 0.1 s steps
    report = fetch([url], dest, retries=0, timeout=0.5)
    assert report.ok and (dest / "slow").read_bytes() == body


def test_per_host_cap(server: TestServer, dest: Path) -> None:
    urls = [server.add(f"/cap{i}", os.urandom(5000), slow_bps=50_000) for i in range(8)]
    report = fetch(urls, dest, threads=8, per_host=2)
    assert report.ok and server.max_active <= 2


def test_rate_limit_per_host(server: TestServer, dest: Path) -> None:
    urls = [server.add(f"/rate{i}", b"r") for i in range(6)]
    started = time.monotonic()
    report = fetch(urls, dest, threads=6, rate=10.0)
    assert report.ok and time.monotonic() - started >= 0.45


def test_redirects_followed_loops_refused(server: TestServer, dest: Path) -> None:
    target = server.add("/target", b"arrived")
    server.add("/hop2", redirect=target)
    hop1 = server.add("/hop1", redirect=server.url("/hop2"))
    server.add("/loop-a", redirect=server.url("/loop-b"))
    loop = server.add("/loop-b", redirect=server.url("/loop-a"))
    ftp = server.add("/to-ftp", redirect="ftp://example.org/x")
    report = fetch([hop1, loop, ftp], dest, retries=3, **FAST)
    by_url = {r.url: r for r in report.results}
    assert by_url[hop1].status == "ok" and (dest / "hop1").read_bytes() == b"arrived"
    assert by_url[loop].error_type == "RedirectError" and "loop" in (by_url[loop].error or "")
    assert by_url[loop].attempts == 1
    assert by_url[ftp].error_type == "RedirectError"


def test_too_many_redirects(server: TestServer, dest: Path) -> None:
    for i in range(5):
        server.add(f"/r{i}", redirect=server.url(f"/r{i + 1}"))
    server.add("/r5", b"end")
    report = fetch([server.url("/r0")], dest, max_redirects=3)
    assert report.results[0].error_type == "RedirectError"
    assert "more than 3 redirects" in (report.results[0].error or "")


def test_credentials_never_cross_hosts_and_are_redacted(dest: Path) -> None:
    a, b = TestServer().start(), TestServer().start()
    try:
        final = b.add("/final", b"ok")
        a.add("/start", redirect=final)
        url = a.url("/start").replace("http://", "http://alice:s3cret@")
        report = fetch([url], dest)
        assert report.ok
        assert a.requests("/start")[0][1]["Authorization"].startswith("Basic ")
        assert "Authorization" not in b.requests("/final")[0][1]
        record = report.records()[0]
        assert "s3cret" not in str(record) and "alice:***@" in record["url"]
        manifest = (dest / ".fetcher" / "manifest.jsonl").read_text()
        assert "s3cret" not in manifest
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("header,expected", [
    ('attachment; filename="report.pdf"', "report.pdf"),
    ("attachment; filename*=UTF-8''na%C3%AFve.txt", "naïve.txt"),
    ('attachment; filename="../../.bashrc"', ".bashrc"),
    ('attachment; filename="/etc/passwd"', "passwd"),
    ('attachment; filename="..\\\\..\\\\evil.txt"', "evil.txt"),
    ('attachment; filename=""', "dl"),
    ('attachment; filename="' + "a" * 400 + '"', None),
])
def test_content_disposition_never_escapes(server: TestServer, dest: Path, header: str,
                                           expected: str | None) -> None:
    url = server.add("/dl", b"payload", headers={"Content-Disposition": header})
    report = fetch([url], dest, content_disposition=True)
    result = report.results[0]
    assert result.status == "ok"
    assert result.path is not None and ".." not in result.path
    assert not result.path.startswith("/")
    if expected is not None:
        assert result.path == expected
    assert (dest / result.path).read_bytes() == b"payload"
    outside = {p.name for p in dest.parent.iterdir()}
    assert ".bashrc" not in outside and "evil.txt" not in outside


def test_content_disposition_off_by_default(server: TestServer, dest: Path) -> None:
    url = server.add("/plain", b"x", headers={"Content-Disposition": 'attachment; filename="y"'})
    assert fetch([url], dest).results[0].path == "plain"


def test_planted_symlink_is_not_followed(server: TestServer, dest: Path,
                                         tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "sub").symlink_to(outside)
    url = server.add("/sub/file.txt", b"x")
    report = fetch([url], dest)
    assert report.results[0].error_type == "UnsafePathError"
    assert list(outside.iterdir()) == []


def test_expect_type_catches_error_pages(server: TestServer, dest: Path) -> None:
    img = server.add("/img.png", b"\x89PNG...", content_type="image/png")
    page = server.add("/login", b"<html>login</html>", content_type="text/html")
    report = fetch([img, page], dest, expect_type="image/*")
    by_url = {r.url: r for r in report.results}
    assert by_url[img].status == "ok"
    assert by_url[page].error_type == "ContentTypeError"
    assert not (dest / "login").exists()


def test_cancel_leaves_partials_and_a_truthful_manifest(server: TestServer,
                                                        dest: Path) -> None:
    body = os.urandom(400_000)
    urls = [server.add(f"/c{i}", body, slow_bps=100_000) for i in range(4)]
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    started = time.monotonic()
    report = fetch(urls, dest, threads=2, cancel=cancel)
    assert time.monotonic() - started < 2.5
    assert report.interrupted and not report.ok
    assert all(r.error_type == "CancelledError" for r in report.failures)
    partials = list((dest / ".fetcher" / "partial").glob("*.part"))
    assert partials and not any((dest / f"c{i}").exists() for i in range(4))
    # A second run resumes what was there and completes every file.
    server.clear_log()
    again = fetch(urls, dest, threads=4)
    assert again.ok and all((dest / f"c{i}").read_bytes() == body for i in range(4))
    assert any("Range" in h for _, h in server.requests())


def test_no_thread_or_fd_leak_across_runs(server: TestServer, dest: Path) -> None:
    urls = [server.add(f"/l{i}", b"l") for i in range(20)]
    fetch(urls, dest, force=True)
    threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        fetch(urls, dest, force=True)
    time.sleep(0.3)
    assert threading.active_count() <= threads
    assert len(os.listdir("/proc/self/fd")) <= fds + 2


def test_content_disposition_rerun_makes_no_request(server: TestServer, dest: Path) -> None:
    urls = [server.add(f"/cd{i}", f"doc {i}".encode(),
                       headers={"Content-Disposition": f'attachment; filename="doc{i}.txt"'})
            for i in range(3)]
    assert fetch(urls, dest, content_disposition=True).ok
    assert sorted(p.name for p in dest.glob("doc*.txt")) == ["doc0.txt", "doc1.txt", "doc2.txt"]
    server.clear_log()
    again = fetch(urls, dest, content_disposition=True)
    assert again.counts["skipped"] == 3 and server.requests() == []


def test_split_fetches_segments_in_parallel_and_verifies(server: TestServer,
                                                         dest: Path) -> None:
    body = os.urandom(2_000_000)
    url = server.add("/large.bin", body, slow_bps=1_000_000)
    digest = hashlib.sha256(body).hexdigest()
    report = fetch([{"url": url, "sha256": digest}], dest, split=4, split_min_size=100_000)
    assert report.ok, report.failures
    assert (dest / "large.bin").read_bytes() == body
    ranges = sorted(h.get("Range", "") for _, h in server.requests("/large.bin"))
    assert ranges == ["", "bytes=1000000-1499999", "bytes=1500000-1999999",
                      "bytes=500000-999999"]
    assert server.max_active >= 3  # the segments really ran at the same time


def test_split_segment_cut_is_retried_and_small_files_are_not_split(
        server: TestServer, dest: Path) -> None:
    body = os.urandom(1_000_000)
    url = server.add("/seg.bin", body)
    server.script("/seg.bin", "ok", "cut:1000")  # one of the segment requests breaks
    small = server.add("/small.bin", b"s" * 1000)
    report = fetch([url, small], dest, split=2, split_min_size=100_000, **FAST)
    assert report.ok, report.failures
    assert (dest / "seg.bin").read_bytes() == body
    assert all("Range" not in h for _, h in server.requests("/small.bin"))


def test_split_resumes_across_runs(server: TestServer, dest: Path) -> None:
    body = os.urandom(3_000_000)
    url = server.add("/resume.bin", body, slow_bps=600_000)
    cancel = threading.Event()
    threading.Timer(0.8, cancel.set).start()
    first = fetch([url], dest, split=3, split_min_size=100_000, cancel=cancel)
    assert first.interrupted
    server.clear_log()
    server.route("/resume.bin").slow_bps = None
    again = fetch([url], dest, split=3, split_min_size=100_000)
    assert again.ok and (dest / "resume.bin").read_bytes() == body
    assert all(h.get("If-Range") for _, h in server.requests("/resume.bin"))


def test_on_exists_checks_hold_in_a_tree_not_created_yet(server: TestServer, dest: Path,
                                                         tmp_path: Path) -> None:
    """exists() answers at once for a missing top directory (a run planning ahead of
    its first file there); a link or a file on the way is still found before any
    request, and a file already there still gets --on-exists."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "linked").symlink_to(outside)  # outside/deeper does not exist
    (dest / "old").mkdir()
    (dest / "old" / "f.txt").write_bytes(b"theirs")
    (dest / "old" / "link").symlink_to(outside)
    fresh = [server.add(f"/new/sub/f{i}.txt", b"n") for i in range(40)]
    fresh += [server.add(f"/old/n{i}/f.txt", b"n") for i in range(40)]  # below a real dir
    linked = [server.add(p, b"x") for p in ("/linked/deeper/x.txt", "/old/link/deeper/x.txt")]
    taken = server.add("/old/f.txt", b"ours")
    report = fetch([*fresh, *linked, taken], dest, threads=4)
    by_url = {r.url: r for r in report.results}
    assert all(by_url[u].status == "ok" for u in fresh)
    assert all(by_url[u].error_type == "UnsafePathError" for u in linked)
    assert server.requests("/linked/deeper/x.txt") == []
    assert server.requests("/old/link/deeper/x.txt") == []
    assert list(outside.iterdir()) == []
    assert by_url[taken].path == "old/f.1.txt"  # --on-exists rename (the default)
    assert (dest / "old" / "f.txt").read_bytes() == b"theirs"


@pytest.mark.parametrize("then", ["removed", "a file"])
@pytest.mark.parametrize("second", ["/a/c/y.txt", "/a/y.txt"])
def test_a_checked_directory_changed_during_the_run(server: TestServer, dest: Path,
                                                    then: str, second: str) -> None:
    """A directory the run checked (and its ancestors) is removed, or replaced by a
    file, between two items: a removed one is made again and the item lands; a file on
    the way fails that item with UnsafePathError. The run goes on either way."""
    first = server.add("/a/b/x.txt", b"one")
    late = server.add(second, b"two")
    after = server.add("/z.txt", b"z")

    def urls() -> Iterator[str]:
        yield first
        deadline = time.monotonic() + 5
        while not (dest / "a" / "b" / "x.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        shutil.rmtree(dest / "a")
        if then == "a file":
            (dest / "a").write_bytes(b"someone's file")
        yield late
        yield after

    report = fetch(urls(), dest, threads=1)
    by_url = {r.url: r for r in report.results}
    assert by_url[first].status == "ok" and by_url[after].status == "ok"
    if then == "removed":
        assert by_url[late].status == "ok", by_url[late].error
        assert (dest / second.lstrip("/")).read_bytes() == b"two"
    else:
        assert by_url[late].error_type == "UnsafePathError", by_url[late].error
        assert (dest / "a").read_bytes() == b"someone's file"
