"""Config, errors, models and HTTP helpers, without sockets."""

from __future__ import annotations

import pickle

import pytest

import fetcher
from fetcher import errors
from fetcher.config import FetchConfig
from fetcher.http import parse_retry_after, redact
from fetcher.manifest import CompletedIndex, ManifestWriter, item_key, iter_records
from fetcher.models import Report, Result


def test_public_surface_is_exactly_all() -> None:
    public = {name for name in dir(fetcher) if not name.startswith("_")} | {"__version__"}
    assert set(fetcher.__all__) == public
    for name in fetcher.__all__:
        assert getattr(fetcher, name) is not None, name


@pytest.mark.parametrize("exc", [
    errors.UrlListError("no scheme", source="urls.txt", line=3),
    errors.HTTPStatusError(503, url="http://h/x", retry_after=2.0),
    errors.ChecksumError(url="http://h/x", expected="a" * 64, actual="b" * 64),
    errors.UnsafePathError("escapes", path="../x", url="http://h/x"),
    errors.ProcessingError("bad image", transform="thumbnail", path="a.jpg"),
    errors.StorageError("disk full", url="http://h/x", disk_full=True),
    errors.TaskError("boom", item=3, index=3, original=ValueError("v"), traceback_text="tb"),
    errors.SinkError("rejected", sink="sqlite:///x.db", batch=4, row=17),
    errors.BatchFailedError("2 failed", failures=[]),
])
def test_every_error_pickles(exc: errors.FetcherError) -> None:
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc)
    assert str(copy) == str(exc)
    assert copy.__dict__.keys() == exc.__dict__.keys()


def test_error_messages_name_where() -> None:
    assert str(errors.UrlListError("bad", source="urls.txt", line=7)) == "urls.txt:7: bad"
    assert "batch 4 row 17" in str(errors.SinkError("x", sink="s", batch=4, row=17))
    assert errors.HTTPStatusError(503, url="u").retryable
    assert not errors.HTTPStatusError(404, url="u").retryable


def test_config_is_frozen_and_validated() -> None:
    cfg = FetchConfig()
    with pytest.raises(AttributeError):
        cfg.threads = 3  # type: ignore[misc]
    assert cfg.replace(threads=3).threads == 3
    assert cfg.host_limit == 8 and cfg.in_flight == 32
    for bad in ({"threads": 0}, {"retries": -1}, {"timeout": 0}, {"on_exists": "x"},
                {"split": 0}, {"rate": -1.0}, {"per_host": 0}):
        with pytest.raises(errors.ConfigError):
            FetchConfig(**bad)  # type: ignore[arg-type]


def test_redact_hides_passwords() -> None:
    assert redact("http://u:secret@h:8080/p?q=1") == "http://u:***@h:8080/p?q=1"
    assert redact("http://h/p") == "http://h/p"
    assert redact("https://user@h/p") == "https://user@h/p"


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_report_counts_and_raise() -> None:
    report = Report()
    report.add(Result(url="a", path="a", status="ok", bytes=10))
    report.add(Result(url="b", path="b", status="skipped", bytes=5))
    report.add(Result(url="c", path="c", status="failed").fail(ValueError("nope")),
               keep=False)
    assert report.counts == {"ok": 1, "skipped": 1, "failed": 1}
    assert report.bytes == 10 and not report.ok
    assert len(report.results) == 2 and len(report.failures) == 1
    with pytest.raises(errors.BatchFailedError, match="c: nope"):
        report.raise_for_failures()
    assert report.records()[0]["status"] == "ok"


def test_manifest_round_trip_and_torn_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "m.jsonl"
    writer = ManifestWriter(path)
    writer.write(Result(url="u1", path="p1", status="ok", bytes=3).record())
    writer.write(Result(url="u2", path="p2", status="failed").record())
    writer.close()
    with open(path, "a") as fh:
        fh.write('{"url": "u3", "path": "p3", "sta')  # a killed run's torn write
    assert [r["url"] for r in iter_records(path)] == ["u1", "u2"]
    index = CompletedIndex().load(path)
    assert index.size("u1", "p1") == 3
    assert index.size("u2", "p2") is None and len(index) == 1


def test_streaming_report_caps_failures_but_counts_all() -> None:
    from fetcher.models import FAILURES_KEPT

    report = Report()
    for i in range(FAILURES_KEPT + 50):
        report.add(Result(url=f"u{i}", path=None, status="failed").fail(OSError("x")),
                   keep=False)
    assert report.counts["failed"] == FAILURES_KEPT + 50
    assert len(report.failures) == FAILURES_KEPT and report.results == []
    with pytest.raises(errors.BatchFailedError, match=f"{FAILURES_KEPT + 50} of"):
        report.raise_for_failures()


def test_item_key_is_the_blake2b_digest_of_url_nul_path() -> None:
    import hashlib

    for url, path in [("http://h/x", "x"), ("http://h/\u00e9", "a/b"), ("", "")]:
        digest = hashlib.blake2b(f"{url}\0{path}".encode(), digest_size=8).digest()
        assert item_key(url, path) == (int.from_bytes(digest, "big") or 1)
