"""`fetcher get --post ... --processes N`: downloads overlapped with process-pool work."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fetcher import fetch
from fetcher.cli import app
from tests.httpserver import TestServer

Image = pytest.importorskip("PIL.Image")


def _jpeg(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def test_get_with_thumbnails_records_outputs(server: TestServer, dest: Path,
                                             tmp_path: Path) -> None:
    urls = [server.add(f"/img/{i}.jpg", _jpeg((400, 300), (i * 20, 100, 50)),
                       content_type="image/jpeg") for i in range(8)]
    broken = server.add("/img/broken.jpg", b"not a jpeg at all", content_type="image/jpeg")
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join([*urls, broken]) + "\n")
    res = CliRunner().invoke(app, ["get", str(lst), "-o", str(dest), "--quiet", "--json",
                                   "--post", "thumbnail:64", "--processes", "2"])
    assert res.exit_code == 1, res.output  # the broken image fails its item only
    summary = json.loads(res.stdout)
    assert summary["ok"] == 8 and summary["failed"] == 1
    records = {r["path"]: r for r in map(json.loads, (dest / ".fetcher" / "manifest.jsonl")
                                         .read_text().splitlines())}
    for i in range(8):
        rec = records[f"img/{i}.jpg"]
        assert rec["status"] == "ok" and len(rec["outputs"]) == 1
        thumb = dest / rec["outputs"][0]
        assert thumb.is_file() and thumb != dest / f"img/{i}.jpg"
        with Image.open(thumb) as im:
            assert max(im.size) <= 64
    bad = records["img/broken.jpg"]
    assert bad["status"] == "failed" and bad["error_type"] == "ProcessingError"
    assert (dest / "img/broken.jpg").read_bytes() == b"not a jpeg at all"  # kept


def test_rerun_with_post_processes_already_downloaded_files(server: TestServer,
                                                            dest: Path) -> None:
    urls = [server.add(f"/p{i}.png", _jpeg((100, 100), (0, 0, 0))) for i in range(3)]
    assert fetch(urls, dest).ok
    server.clear_log()
    report = fetch(urls, dest, post=["sha256"], processes=1)
    assert report.ok and server.requests() == []
    assert all(r.status == "skipped" and r.outputs for r in report.results)


def test_bad_post_spec_is_a_usage_error_before_downloading(server: TestServer, dest: Path,
                                                           tmp_path: Path) -> None:
    url = server.add("/a.jpg", b"x")
    lst = tmp_path / "urls.txt"
    lst.write_text(url + "\n")
    res = CliRunner().invoke(app, ["get", str(lst), "-o", str(dest), "--post", "explode:3"])
    assert res.exit_code == 2 and "explode" in res.stderr
    assert server.requests() == []


def test_fetcher_process_command(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.jpg").write_bytes(_jpeg((300, 200), (10, 20, 30)))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["process", *(str(p) for p in sorted(src.iterdir())),
                                   "--post", "grayscale", "--processes", "2", "-o", str(out),
                                   "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["ok"] == 3
    made = list((out / ".fetcher" / "derived").rglob("*.jpg"))
    assert len(made) == 3


def test_post_and_sink_together_lose_no_record(server: TestServer, dest: Path,
                                               tmp_path: Path) -> None:
    import sqlite3

    urls = [server.add(f"/s/{i}.jpg", _jpeg((300, 200), (i, i, i)), content_type="image/jpeg")
            for i in range(20)]
    db = tmp_path / "imgs.db"
    report = fetch(urls, dest, post=["thumbnail:64"], processes=2, sink=f"sqlite:///{db}")
    assert report.ok, (report.stopped, report.failures)
    con = sqlite3.connect(db)
    rows = con.execute("select url, outputs from downloads").fetchall()
    con.close()
    assert len(rows) == 20 and all(json.loads(out) for _, out in rows)
