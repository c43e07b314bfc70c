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
        },
    )
    common.log(f"wrote {out}")
    return 0 if all(i["exit_code"] == 0 for i in scripts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
