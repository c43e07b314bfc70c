"""``fetcher demo pipeline``: download + thumbnail, with and without overlapping stages.

N photos (generated JPEGs) are served by a local server with 20 ms of latency per
request; each is downloaded and shrunk to a 256-pixel thumbnail:

``sequential``          download one, thumbnail it, next;
``threads``             T threads, each downloading then thumbnailing its item: the
                        stages overlap across threads, the thumbnails share the GIL
                        (Pillow releases it only in parts of the work);
``threads+processes``   ``fetcher.fetch(urls, dest, threads=T, post=["thumbnail:256"],
                        processes=N)``: downloads on T threads, and each finished file
                        goes at once to a pool of N processes (one per core) for its
                        thumbnail while the downloads go on -- ``fetcher get --post
                        thumbnail:256 --processes N``. It also hashes and journals every
                        file, and its pool starts inside the measurement (a pipeline
                        pays for its pool once per run).

All three run the same thumbnail code, fetcher's ``thumbnail:256`` transform (JPEG
draft decoding, then a Lanczos resize), and write to ``DEST/.fetcher/derived/``.
"""

from __future__ import annotations

import functools
import io
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..executors import parallel_map, shutdown_pools, usable_cpu_count
from .common import Log, Record, best, make_record, pct, quiet
from .io import download_file
from .measure import CpuMeter
from .server import DEFAULT_LATENCY_S, LocalServer

EXPERIMENT = "pipeline"
WORKLOAD = "download+thumbnail"
THUMB_PX = 256
_DISTINCT_PHOTOS = 6  # generated once each, then served under many names


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work one run of the demo does."""

    images: int
    width: int
    height: int
    threads: tuple[int, ...]


def sizes(quick: bool) -> Sizes:
    """The sizes for ``--quick`` or a full run."""
    if quick:
        return Sizes(images=32, width=2400, height=1800, threads=(8,))
    return Sizes(images=120, width=3000, height=2000, threads=(2, 4, 8, 16))


def make_photo(seed: int, width: int, height: int) -> bytes:
    """A JPEG that compresses like a photo (gradients, texture, noise)."""
    from PIL import Image, ImageFilter

    grad = Image.linear_gradient("L").resize((width, height))
    noise = Image.effect_noise((width, height), 30 + seed % 20)
    radial = Image.radial_gradient("L").resize((width, height))
    img = Image.merge("RGB", (grad, Image.blend(radial, noise, 0.4),
                              Image.blend(grad, noise, 0.5)))
    img = img.filter(ImageFilter.GaussianBlur(1)).rotate(seed * 37 % 360)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@functools.cache
def _thumbnailer() -> Callable[[Path, Path], list[Path]]:
    from ..transforms import parse_post

    return parse_post(f"thumbnail:{THUMB_PX}")


def download_and_thumbnail(job: tuple[str, str, str]) -> list[Path]:
    """Download ``url`` to ``path``, then thumbnail it below ``dest``; the outputs."""
    url, path, dest = job
    download_file((url, path))
    return _thumbnailer()(Path(path), Path(dest))


def run(*, quick: bool = False, log: Log = quiet) -> list[Record]:
    """Run the three pipelines; one record per (mode, threads)."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        log("pipeline: skipped, Pillow is not installed (pip install 'fetcher[demo]')")
        return []
    from ..downloader import fetch

    sz = sizes(quick)
    procs = usable_cpu_count()
    out: list[Record] = []
    with tempfile.TemporaryDirectory(prefix="fetcher-demo-pipeline-") as tmp:
        site = Path(tmp) / "site"
        (site / "photos").mkdir(parents=True)
        photos = [make_photo(i, sz.width, sz.height) for i in range(_DISTINCT_PHOTOS)]
        rels = [f"photos/p{i:04d}.jpg" for i in range(sz.images)]
        for i, rel in enumerate(rels):
            (site / rel).write_bytes(photos[i % len(photos)])
        kib = sum(len(p) for p in photos) // len(photos) // 1024
        log(f"pipeline: {sz.images} photos of {sz.width}x{sz.height} (~{kib} KiB) from "
            f"127.0.0.1 (+{DEFAULT_LATENCY_S * 1000:.0f} ms per request) -> "
            f"{THUMB_PX}px thumbnails")
        note = f"{sz.width}x{sz.height} JPEG ~{kib} KiB -> {THUMB_PX}px"
        counter = iter(range(1_000_000))

        def fresh(urls: list[str]) -> tuple[Path, list[tuple[str, str, str]]]:
            dest = Path(tmp) / f"run{next(counter)}"
            dest.mkdir()
            return dest, [(u, str(dest / f"p{i:04d}.jpg"), str(dest))
                          for i, u in enumerate(urls)]

        def rec(mode: str, workers: int, meter: CpuMeter, base: float, text: str) -> Record:
            return make_record(EXPERIMENT, WORKLOAD, mode, workers, sz.images, "images",
                               meter.sample, base, note=text)

        with LocalServer(site) as srv:
            urls = [srv.url(r) for r in rels]
            _, jobs = fresh(urls)
            download_and_thumbnail(jobs[0])  # connection and imports outside the timing
            _, jobs = fresh(urls)
            with CpuMeter(exclude={srv.pid}) as m:
                for job in jobs:
                    download_and_thumbnail(job)
            base = m.sample.wall_s
            out.append(rec("sequential", 1, m, base, note))
            for w in sz.threads:
                _, jobs = fresh(urls)
                with CpuMeter(exclude={srv.pid}) as m:
                    parallel_map(download_and_thumbnail, jobs, mode="thread", workers=w,
                                 chunksize=1, on_error="raise")
                out.append(rec("threads", w, m, base, note))
            for w in sz.threads:
                shutdown_pools()
                dest, _ = fresh(urls)
                with CpuMeter(exclude={srv.pid}, uses_processes=True) as m:
                    report = fetch(urls, dest, threads=w, retries=0,
                                   post=[f"thumbnail:{THUMB_PX}"], processes=procs)
                made = sum(1 for r in report.records() if r.get("outputs"))
                if not report.ok or made != len(urls):
                    raise RuntimeError(f"demo pipeline: {made} of {len(urls)} thumbnails "
                                       f"made; failures: {report.failures[:1]}")
                r = rec("threads+processes", w, m, base, f"{note}; {procs} processes")
                r["processes"] = procs
                out.append(r)
    shutdown_pools()
    return out


def conclude(records: list[Record]) -> str:
    """One sentence, from the numbers, on what overlapping the stages bought."""
    mine = [r for r in records if r["experiment"] == EXPERIMENT]
    if not mine:
        return "pipeline: skipped (needs Pillow)."
    seq = next((r for r in mine if r["mode"] == "sequential"), None)
    t = best(mine, mode="threads")
    tp = best(mine, mode="threads+processes")
    if seq is None or t is None or tp is None:
        return "pipeline: incomplete measurements."
    winner = ("threads + processes" if tp["speedup"] > 1.05 * t["speedup"]
              else "threads alone" if t["speedup"] > 1.05 * tp["speedup"] else "neither")
    return (f"Download + thumbnail of {seq['size']} photos on {seq['cores']} cores: "
            f"sequential {seq['wall_s']:.2f} s; overlapped in {t['workers']} threads "
            f"{t['speedup']:.1f}x faster (CPU {pct(t['cpu_util'])} busy); "
            f"{tp['workers']} download threads + {tp.get('processes', '?')} thumbnail "
            f"processes {tp['speedup']:.1f}x (CPU {pct(tp['cpu_util'])}): {winner} came out "
            "ahead by more than 5%.")
