"""Run every benchmark the project has, print one combined table, write all.json.

    python bench/run.py            # full (~15 min on 2 cores)
    python bench/run.py --quick    # smaller sizes (~3 min)

Runs ``bench/bench_download.py`` (all its suites), then every other benchmark
script present in ``bench/`` (``bench_*.py``, plus ``fault_matrix.py``), each as a
subprocess with ``--quick`` passed through when the script accepts it. Results:
``bench/results/all.json``, which embeds each suite's JSON and every other JSON
file the scripts wrote to ``bench/results/`` during this run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

OWN = {"bench_download.py", "run.py", "common.py"}
EXTRA = ("fault_matrix.py",)  # benchmark scripts not named bench_*.py


def other_scripts() -> list[Path]:
    found = sorted(p for p in common.BENCH_DIR.glob("bench_*.py") if p.name not in OWN)
    found += [common.BENCH_DIR / n for n in EXTRA if (common.BENCH_DIR / n).exists()]
    return found


def accepts(script: Path, option: str) -> bool:
    try:
        p = subprocess.run(
            [sys.executable, str(script), "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=common.REPO_ROOT,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return option in p.stdout


def run_script(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run one benchmark script, streaming its output, and time it."""
    common.log("running: " + " ".join(cmd))
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            cmd, cwd=common.REPO_ROOT, stdout=subprocess.PIPE, text=True, timeout=timeout
        )
        code, out = p.returncode, p.stdout
    except subprocess.TimeoutExpired as exc:
        code = None
        out = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode()
        out += f"\n[timed out after {timeout:.0f} s]"
    print(out, end="" if out.endswith("\n") else "\n", flush=True)
    return {
        "cmd": cmd,
        "exit_code": code,
        "wall_s": round(time.perf_counter() - t0, 2),
        "stdout": out,
    }


def combined_rows(suites: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, data in suites.items():
        tools = data.get("tools")
        if not isinstance(tools, list):
            continue  # another script's format: kept in all.json, not tabulated
        for t in tools:
            if not isinstance(t, dict) or "tool" not in t:
                continue
            ok = t.get("status") == "ok"
            rows.append(
                [
                    name,
                    str(t["tool"]),
                    "ok" if ok else str(t.get("status")),
                    f"{t['median_wall_s']:.3f}" if ok and t.get("median_wall_s") else "-",
                    f"{t['fetcher_speedup']:.2f}x" if t.get("fetcher_speedup") else "-",
                    f"{t['median_cpu_s']:.2f}" if t.get("median_cpu_s") is not None else "-",
                    f"{t['peak_rss_mib']:.1f}" if t.get("peak_rss_mib") is not None else "-",
                    f"{t['peak_tree_pss_mib']:.1f}"
                    if t.get("peak_tree_pss_mib") is not None
                    else "-",
                ]
            )
    return rows


def marginal_cpu(suites: dict[str, Any]) -> dict[str, Any] | None:
    """CPU per small file beyond start-up: (small run - one-URL run) / (files - 1), for
    fetcher and curl, from this run's ``small`` and ``startup`` suites.

    A companion to the small-file CPU target, which divides the whole run (start-up
    included); this one says what each further file costs.
    """
    small, startup = suites.get("small"), suites.get("startup")
    if not isinstance(small, dict) or not isinstance(startup, dict):
        return None
    files = (small.get("params") or {}).get("files")

    def cpu(data: dict[str, Any], tool: str) -> float | None:
        for t in data.get("tools") or ():
            if isinstance(t, dict) and t.get("tool") == tool and t.get("status") == "ok":
                value = t.get("median_cpu_s")
                return float(value) if value is not None else None
        return None

    pairs = {"fetcher": (cpu(small, "fetcher"), cpu(startup, "fetcher get (1 URL)")),
             "curl": (cpu(small, "curl"), cpu(startup, "curl (1 URL)"))}
    if not isinstance(files, int) or files < 2:
        return None
    per_file: dict[str, float] = {}
    for tool, (run, one) in pairs.items():
        if run is None or one is None:
            return None
        per_file[tool] = (run - one) / (files - 1)
    ratio = per_file["fetcher"] / per_file["curl"] if per_file["curl"] > 0 else None
    return {"files": files, "us_per_file": {k: round(v * 1e6, 1) for k, v in per_file.items()},
            "ratio": round(ratio, 2) if ratio else None}


def print_rows(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds")
    ap.add_argument("--skip-download", action="store_true", help="only the other benchmark scripts")
    ap.add_argument(
        "--timeout", type=float, default=3600, help="per-script timeout in seconds (default 3600)"
    )
    args = ap.parse_args()
    quick = ["--quick"] if args.quick else []
    started = time.time()
    t0 = time.perf_counter()
    scripts: dict[str, Any] = {}
    suites: dict[str, Any] = {}

    if not args.skip_download:
        dl = common.BENCH_DIR / "bench_download.py"
        scripts["bench_download.py"] = run_script([sys.executable, str(dl), *quick], args.timeout)
    for script in other_scripts():
        extra = quick if args.quick and accepts(script, "--quick") else []
        scripts[script.name] = run_script([sys.executable, str(script), *extra], args.timeout)

    # Every result file written during this run, suites first.
    for path in sorted(common.RESULTS_DIR.glob("*.json")):
        if path.name == "all.json" or path.stat().st_mtime < started:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        suites[path.stem] = data

    print("\n== all benchmarks" + (" (--quick)" if args.quick else ""))
    rows = combined_rows({k: v for k, v in suites.items() if isinstance(v, dict)})
    if rows:
        headers = ["suite", "tool", "status", "median s", "fetcher speed-up", "CPU s", "RSS MiB",
                   "tree PSS MiB"]
        print_rows(headers, rows)
    commands = {d["fetcher_command"]["note"] for d in suites.values()
                if isinstance(d, dict) and isinstance(d.get("fetcher_command"), dict)}
    for note in sorted(commands):
        print(f"  {note}")
    for name, data in suites.items():
        summary = data.get("summary") if isinstance(data, dict) else None
        if isinstance(summary, list):
            for line in summary:
                print(f"  {name}: {line}")
    marginal = marginal_cpu(suites)
    if marginal is not None:
        us, ratio = marginal["us_per_file"], marginal["ratio"]
        print(f"  small: CPU per file beyond start-up (small run less the one-URL run): "
              f"fetcher {us['fetcher']:.0f} us, curl {us['curl']:.0f} us"
              + (f" ({ratio:.2f}x)" if ratio else ""))
    print()
    for name, info in scripts.items():
        status = "ok" if info["exit_code"] == 0 else f"exit {info['exit_code']}"
        print(f"  script {name}: {status} in {info['wall_s']:.0f} s")
    total = time.perf_counter() - t0
    print(f"  total {total:.0f} s")

    out = common.write_json(
        common.RESULTS_DIR / "all.json",
        {
            "quick": args.quick,
            "machine": common.machine_info(),
            "total_wall_s": round(total, 1),
            "scripts": scripts,
            "results": suites,
            "small_cpu_beyond_startup": marginal,
        },
    )
    common.log(f"wrote {out}")
    return 0 if all(i["exit_code"] == 0 for i in scripts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
