"""Pipeline bench (issue 4): downloads overlapped with process-pool thumbnails.

N JPEGs are served by a private nginx through its rate-limited ``/slow/`` location
(so downloading is I/O-bound, as on a real network) and, in alternation per round:

- ``download``  ``fetcher get LIST --threads T``                      (I/O alone)
- ``process``   ``fetcher process FILES --post thumbnail:S --processes 2`` (CPU alone)
- ``pipeline``  ``fetcher get LIST --threads T --post thumbnail:S --processes 2``
- ``then-pool`` ``fetch()`` everything, then ``multiprocessing.Pool(2).map`` the same
                thumbnail transform (the hand-glued baseline)

Prints medians and the ratios the issue asks for: pipeline / max(download, process)
(target <= 1.15), pipeline / (download + process), pipeline / then-pool.

    python bench/bench_pipeline.py [--images 240] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BENCH_DIR,
    DEFAULT_WORK,
    Nginx,
    empty_dir,
    log,
    median,
    run_timed,
    write_lines,
)

BASELINE = r"""
import sys, time
from multiprocessing import get_context
from pathlib import Path
from fetcher import fetch
from fetcher.transforms import parse_post, run_chain

def work(args):
    path, dest = args
    return run_chain([parse_post(sys.argv[3])], Path(path), Path(dest))

if __name__ == "__main__":
    lst, dest = sys.argv[1], Path(sys.argv[2])
    report = fetch(lst, dest, threads=int(sys.argv[4]))
    paths = [(str(dest / r.path), str(dest)) for r in report.results if r.ok]
    with get_context("forkserver").Pool(2) as pool:
        pool.map(work, paths)
"""


def make_images(directory: Path, count: int, width: int, height: int) -> list[Path]:
    """``count`` distinct photo-like JPEGs (noise over gradients), reused when present."""
    from PIL import Image

    marker = directory / ".spec.json"
    spec = {"count": count, "w": width, "h": height}
    names = [directory / f"img{i:05d}.jpg" for i in range(count)]
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return names
    log(f"generating {count} JPEGs of {width}x{height} in {directory}")
    empty_dir(directory)
    rng = random.Random(7)
    base = Image.effect_noise((width, height), 64).convert("RGB")
    for i, path in enumerate(names):
        tint = Image.new("RGB", (width, height), (rng.randrange(256), rng.randrange(256),
                                                  rng.randrange(256)))
        buf = io.BytesIO()
        Image.blend(base, tint, 0.5).rotate(i % 360).save(buf, "JPEG", quality=90)
        path.write_bytes(buf.getvalue())
    marker.write_text(json.dumps(spec))
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--size", default="1600x1200", help="source image WxH")
    ap.add_argument("--thumb", type=int, default=256)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--rate", default="1m", help="nginx limit_rate per connection")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, default=BENCH_DIR / "results" / "pipeline.json")
    args = ap.parse_args()
    if args.quick:
        args.images, args.rounds = 80, 1
    width, height = (int(x) for x in args.size.split("x"))
    work = DEFAULT_WORK / "pipeline"
    images = make_images(work / "data", args.images, width, height)
    total_mib = sum(p.stat().st_size for p in images) / 2**20
    post = f"thumbnail:{args.thumb}"
    py = sys.executable
    results: dict[str, list[float]] = {k: [] for k in ("download", "process", "pipeline",
                                                       "then-pool")}
    with Nginx(root=work / "data", work=work, slow_rate=args.rate) as nginx:
        lst = write_lines(work / "urls.txt",
                          (f"{nginx.base_url}/slow/{p.name}" for p in images))
        baseline = work / "baseline.py"
        baseline.write_text(BASELINE)
        for rnd in range(args.rounds + 1):  # round 0 warms caches and is discarded
            out = {k: empty_dir(work / "out" / k) for k in results}
            runs = {
                "download": [py, "-m", "fetcher", "get", str(lst), "-o", str(out["download"]),
                             "--threads", str(args.threads), "--quiet"],
                "pipeline": [py, "-m", "fetcher", "get", str(lst), "-o", str(out["pipeline"]),
                             "--threads", str(args.threads), "--quiet", "--post", post,
                             "--processes", "2"],
                "then-pool": [py, str(baseline), str(lst), str(out["then-pool"]), post,
                              str(args.threads)],
            }
            for name in ("download", "pipeline", "then-pool"):
                t = run_timed(runs[name], timeout=600)
                if t.returncode != 0:
                    log(f"{name} failed: {t.stderr_tail}")
                    return 1
                if rnd:
                    results[name].append(t.wall_s)
            files = sorted(str(p) for p in (out["download"] / "slow").glob("*.jpg"))
            t = run_timed([py, "-m", "fetcher", "process", *files, "--post", post,
                           "--processes", "2", "-o", str(out["process"]), "--quiet"],
                          timeout=600)
            if t.returncode != 0:
                log(f"process failed: {t.stderr_tail}")
                return 1
            if rnd:
                results["process"].append(t.wall_s)
            thumbs = list((out["pipeline"] / ".fetcher" / "derived").rglob("*.jpg"))
            if len(thumbs) != len(images):
                log(f"pipeline made {len(thumbs)} thumbnails for {len(images)} images")
                return 1
    med = {k: median(v) or 0.0 for k, v in results.items()}
    print(f"{args.images} JPEGs {args.size} ({total_mib:.0f} MiB) over /slow/ at "
          f"{args.rate}/connection, {args.threads} threads; thumbnail:{args.thumb}, "
          f"2 processes; medians of {args.rounds} rounds")
    for k, v in med.items():
        print(f"  {k:10} {v:7.2f} s   (runs: {', '.join(f'{x:.2f}' for x in results[k])})")
    longer = max(med["download"], med["process"])
    ratios = {
        "pipeline/max(download,process)": med["pipeline"] / longer,
        "pipeline/(download+process)": med["pipeline"] / (med["download"] + med["process"]),
        "pipeline/then-pool": med["pipeline"] / med["then-pool"],
    }
    for k, v in ratios.items():
        print(f"  {k:32} {v:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"medians_s": med, "runs_s": results, "ratios": ratios,
                                     "images": args.images, "size": args.size,
                                     "rate": args.rate, "time": time.time()}, indent=2))
    return 0 if ratios["pipeline/max(download,process)"] <= 1.15 else 1


if __name__ == "__main__":
    sys.exit(main())
