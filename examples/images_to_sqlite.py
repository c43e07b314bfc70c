"""Download a URL list of images, thumbnail them in processes, record them in SQLite:
one chain of library calls.

    report = fetch("images.csv", "out", threads=16,
                   post=["thumbnail:128"], processes=None,      # one process per core
                   sink="sqlite:////abs/path/images.db")        # table "downloads"

downloads on 16 threads; as each file lands, a process pool makes its thumbnail under
``out/.fetcher/derived/thumbnail/`` while the downloads go on; as each item ends, its
record (url, path, status, bytes, sha256, outputs, plus the list's own columns) streams
into the ``downloads`` table through a ParallelWriter (upserted on ``url``, so running
the script twice changes nothing). The script then queries the database and opens a
thumbnail to check its size.

No internet needed: it generates JPEGs, serves them from 127.0.0.1 (with 10 ms of
latency per request, so downloading is I/O-bound as on a real network) and lists them
in a CSV whose extra column (``label``) is carried into the database.

    python examples/images_to_sqlite.py [--images 200] [--size 1024] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from _local_server import serve_directory
from PIL import Image, ImageDraw

from fetcher import fetch


def make_images(root: Path, count: int, size: int) -> list[str]:
    """Write ``count`` JPEGs of ``size`` x ``size * 3/4`` under root/img; relative paths."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rels = []
    for i in range(count):
        img = Image.new("RGB", (size, size * 3 // 4), (40 + i % 200, 90, 160))
        draw = ImageDraw.Draw(img)
        for k in range(12):
            draw.ellipse((k * size // 14, (i * 7 + k * 31) % (size // 2),
                          k * size // 14 + size // 5, (i * 7 + k * 31) % (size // 2) + size // 5),
                         fill=((i * 13 + k * 40) % 256, (k * 60) % 256, (i * 5) % 256))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=88)
        rel = f"img/photo{i:05d}.jpg"
        (root / rel).write_bytes(buf.getvalue())
        rels.append(rel)
    return rels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=1024, help="image width in pixels")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--processes", type=int, default=None, help="default: cores")
    parser.add_argument("--out", type=Path, default=Path("example-output/images_to_sqlite"))
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    db = out / "images.db"
    db.unlink(missing_ok=True)  # start clean: the server's port, so the URLs, change per run
    shutil.rmtree(out / "files", ignore_errors=True)

    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        rels = make_images(site, args.images, args.size)
        with serve_directory(site, latency=0.01) as base:
            url_list = out / "images.csv"
            with url_list.open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["url", "label"])
                for i, rel in enumerate(rels):
                    writer.writerow([f"{base}/{rel}", ("cat", "dog", "bird")[i % 3]])

            t0 = time.perf_counter()
            # sqlite:/// followed by an absolute path: four slashes in all.
            report = fetch(url_list, out / "files", threads=args.threads,
                           post=["thumbnail:128"], processes=args.processes,
                           sink=f"sqlite:///{db}")
            elapsed = time.perf_counter() - t0

    print(f"fetch(...): {report.counts} in {elapsed:.2f} s")
    if not report.ok:
        print(f"  stopped: {report.stopped}" if report.stopped else "", file=sys.stderr)
        for failure in report.failures[:5]:
            print(f"  failed: {failure}", file=sys.stderr)
        return 1
    print(f"sink: {report.sink['rows'] if report.sink else 0} rows -> {db}")

    with sqlite3.connect(db) as conn:
        (rows,) = conn.execute("SELECT count(*) FROM downloads WHERE status = 'ok'").fetchone()
        per_label = conn.execute("SELECT label, count(*), sum(bytes) FROM downloads "
                                 "GROUP BY label ORDER BY label").fetchall()
        url, outputs = conn.execute("SELECT url, outputs FROM downloads "
                                    "ORDER BY url LIMIT 1").fetchone()
    print(f"downloads table: {rows} rows with status ok")
    for label, n, total in per_label:
        print(f"  {label:<5} {n:4d} images {total / 1e6:7.2f} MB")
    thumbs = json.loads(outputs) if isinstance(outputs, str) else outputs
    thumb = out / "files" / thumbs[0]
    with Image.open(thumb) as im:
        print(f"first row: {url}\n  thumbnail {thumbs[0]} is {im.width}x{im.height}")
        small = max(im.size) <= 128
    return 0 if rows == args.images and small else 1


if __name__ == "__main__":
    sys.exit(main())
