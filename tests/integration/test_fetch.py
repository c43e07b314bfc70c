"""The downloader against a real HTTP server on 127.0.0.1 (issue 2: the foundation)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from fetcher import FetchConfig, Fetcher, fetch
from fetcher.errors import BatchFailedError, UrlListError
from tests.httpserver import TestServer


def manifest(dest: Path) -> list[dict[str, object]]:
    text = (dest / ".fetcher" / "manifest.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def write_list(tmp_path: Path, lines: list[str], name: str = "urls.txt") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_many_files_land_complete_with_a_truthful_manifest(
        server: TestServer, dest: Path, tmp_path: Path) -> None:
    bodies = {f"/d/f{i}.bin": os.urandom(1000 + i * 37) for i in range(60)}
    for path, body in bodies.items():
        server.add(path, body)
    urls = write_list(tmp_path, ["# a comment", ""] + [server.url(p) for p in bodies])
    report = fetch(urls, dest, threads=8)
    assert report.ok and report.counts == {"ok": 60, "skipped": 0, "failed": 0}
    for path, body in bodies.items():
        assert (dest / path.lstrip("/")).read_bytes() == body
    records = manifest(dest)
    assert len(records) == 60
    rec = next(r for r in records if r["path"] == "d/f3.bin")
    assert rec["status"] == "ok" and rec["bytes"] == len(bodies["/d/f3.bin"])
    assert rec["sha256"] == hashlib.sha256(bodies["/d/f3.bin"]).hexdigest()
    assert rec["http_status"] == 200 and rec["attempts"] == 1
    assert set(rec) >= {"url", "path", "status", "bytes", "sha256", "http_status",
                        "attempts", "elapsed_s", "error_type", "error", "outputs"}
    # Keep-alive: 8 threads, 60 requests, far fewer connections.
    assert server.connections <= 16
    # Nothing left behind in the partial directory.
    assert list((dest / ".fetcher" / "partial").iterdir()) == []


def test_rerun_skips_complete_files_without_a_request(
        server: TestServer, dest: Path, tmp_path: Path) -> None:
    urls = [server.add(f"/r{i}.txt", f"body {i}".encode()) for i in range(10)]
    first = fetch(urls, dest)
    assert first.counts["ok"] == 10
    server.clear_log()
    second = fetch(urls, dest)
    assert second.counts == {"ok": 0, "skipped": 10, "failed": 0}
    assert server.requests() == []
    # A file changed on disk is ours but not complete any more: fetched again.
    (dest / "r3.txt").write_bytes(b"truncated")
    third = fetch(urls, dest)
    assert third.counts == {"ok": 1, "skipped": 9, "failed": 0}
    assert (dest / "r3.txt").read_bytes() == b"body 3"
    # --force fetches everything again.
    forced = fetch(urls, dest, force=True)
    assert forced.counts["ok"] == 10


def test_csv_list_with_paths_checksums_and_carried_columns(
        server: TestServer, dest: Path, tmp_path: Path) -> None:
    good, bad = b"good bytes", b"bad bytes"
    server.add("/good", good)
    server.add("/bad", bad)
    csv = tmp_path / "list.csv"
    csv.write_text(
        "url,path,sha256,label\n"
        f"{server.url('/good')},sub/good.dat,{hashlib.sha256(good).hexdigest()},cat\n"
        f"{server.url('/bad')},sub/bad.dat,{'0' * 64},dog\n")
    report = fetch(csv, dest, retries=3, backoff_base=0.01)
    assert (dest / "sub/good.dat").read_bytes() == good
    assert not (dest / "sub/bad.dat").exists()  # never published unverified
    by_path = {r["path"]: r for r in manifest(dest)}
    assert by_path["sub/good.dat"]["label"] == "cat"
    failed = by_path["sub/bad.dat"]
    assert failed["status"] == "failed" and failed["error_type"] == "ChecksumError"
    assert failed["attempts"] == 2  # one retry after a clean mismatch, then final
    assert failed["label"] == "dog"
    assert not report.ok
    with pytest.raises(BatchFailedError, match="sha256 mismatch"):
        report.raise_for_failures()


def test_duplicates_fetched_once_and_colliding_names_kept_apart(
        server: TestServer, dest: Path, tmp_path: Path) -> None:
    a = server.add("/x/data.csv", b"A")
    b = server.add("/y/data.csv", b"B")
    lines = [a + " data.csv", a + " data.csv", b + " data.csv"]
    report = fetch(write_list(tmp_path, lines), dest)
    assert report.counts["ok"] == 2
    assert len(server.requests("/x/data.csv")) == 1
    assert (dest / "data.csv").read_bytes() == b"A"
    assert (dest / "data.1.csv").read_bytes() == b"B"
    paths = {r["url"]: r["path"] for r in manifest(dest)}
    assert paths == {a: "data.csv", b: "data.1.csv"}


@pytest.mark.parametrize("policy", ["rename", "skip", "overwrite", "error"])
def test_on_exists_policies_for_foreign_files(
        server: TestServer, dest: Path, policy: str) -> None:
    url = server.add("/file.txt", b"new content")
    (dest / "file.txt").write_bytes(b"someone else's file")
    report = fetch([url], dest, on_exists=policy)
    result = report.results[0]
    if policy == "rename":
        assert (dest / "file.txt").read_bytes() == b"someone else's file"
        assert (dest / "file.1.txt").read_bytes() == b"new content"
        assert result.path == "file.1.txt" and result.status == "ok"
    elif policy == "skip":
        assert result.status == "skipped" and server.requests() == []
        assert (dest / "file.txt").read_bytes() == b"someone else's file"
    elif policy == "overwrite":
        assert (dest / "file.txt").read_bytes() == b"new content"
    else:
        assert result.status == "failed" and result.error_type == "TargetExistsError"
        assert (dest / "file.txt").read_bytes() == b"someone else's file"


def test_bad_list_stops_before_any_download(
        server: TestServer, dest: Path, tmp_path: Path) -> None:
    ok = server.add("/ok", b"x")
    urls = write_list(tmp_path, [ok, ok + "2", "ftp://example.org/file"])
    with pytest.raises(UrlListError, match=r"urls\.txt:3"):
        fetch(urls, dest)
    assert server.requests() == []


def test_unsafe_list_path_fails_that_item_only(server: TestServer, dest: Path,
                                               tmp_path: Path) -> None:
    ok = server.add("/ok", b"x")
    report = fetch(write_list(tmp_path, [ok + " ../../escape", ok + " fine"]), dest)
    assert report.counts == {"ok": 1, "skipped": 0, "failed": 1}
    assert report.failures[0].error_type == "UnsafePathError"
    assert not (dest.parent.parent / "escape").exists()


def test_fetcher_object_reuse_and_records_for_pandas(server: TestServer, dest: Path) -> None:
    urls = [server.add(f"/p{i}", b"p" * i) for i in range(1, 6)]
    fetcher = Fetcher(FetchConfig(threads=2))
    report = fetcher.run(urls, dest)
    again = fetcher.run(urls, dest)
    assert report.ok and again.counts["skipped"] == 5
    records = report.records()
    assert [r["bytes"] for r in sorted(records, key=lambda r: r["path"])] == [1, 2, 3, 4, 5]
    summary = report.summary()
    assert summary["ok"] == 5 and summary["bytes"] == 15


def test_headers_auth_and_requests_session_options(server: TestServer, dest: Path) -> None:
    import requests

    url = server.add("/secret", b"s")
    session = requests.Session()
    session.headers["X-Token"] = "abc"
    session.auth = ("user", "pw")
    report = fetch([url], dest, session=session)
    assert report.ok
    sent = server.requests("/secret")[0][1]
    assert sent["X-Token"] == "abc"
    assert sent["Authorization"].startswith("Basic ")
