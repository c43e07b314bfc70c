"""Fault matrix (issue 3): hundreds of URLs mixing every fault, then a re-run.

Serves every fault the reliability suite knows from one local server (tests'
httpserver) and checks the outcome file by file:

    python bench/fault_matrix.py [--per-fault 20] [--json bench/results/fault_matrix.json]

Prints a table: URLs per fault, files complete and byte-correct, failures recorded,
files outside DIR, partial files under final names, and requests on a re-run for
files already complete. Runs twice: in one process (with --content-disposition, which
keeps a run in one process), then shared by two download processes (fanout.py; the
Content-Disposition fault left out). Exits 1 when any safety figure is not zero.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fetcher import fetch
from tests.httpserver import TestServer

# fault name -> (route kwargs, script, expected outcome)
FAULTS: dict[str, tuple[dict[str, object], tuple[str, ...], str]] = {
    "clean": ({}, (), "ok"),
    "503-then-ok": ({}, ("status:503", "status:503"), "ok"),
    "429-retry-after": ({}, ("status:429:1",), "ok"),
    "500-502-504": ({}, ("status:500", "status:502", "status:504"), "ok"),
    "cut-body-resume": ({}, ("cut:70000",), "ok"),
    "cut-ignored-range": ({}, ("cut:70000", "norange"), "ok"),
    "reset": ({}, ("reset",), "ok"),
    "stall": ({}, ("stall:3",), "ok"),
    "always-cut-no-range": ({"ranges": False}, ("cut:1000",) * 10, "failed"),
    "404": ({"status": 404}, (), "failed"),
    "403": ({"status": 403}, (), "failed"),
    "redirect": ({"redirect": "/target"}, (), "ok"),
    "redirect-loop": ({"redirect": "SELF"}, (), "failed"),
    "redirect-ftp": ({"redirect": "ftp://example.org/x"}, (), "failed"),
    "hostile-cd": (
        {"headers": {"Content-Disposition": 'attachment; filename="../../x"'}},
        (),
        "ok",
    ),
    "html-error-page": ({"content_type": "text/html"}, (), "failed"),
    "bad-checksum": ({}, (), "failed"),
}


def build(server: TestServer, per_fault: int, size: int,
          faults: list[str]) -> tuple[list[str], dict[str, str]]:
    """Register routes; return CSV lines and url -> fault name."""
    server.add("/target", os.urandom(size), content_type="image/png")
    lines, kinds = ["url,sha256"], {}
    for fault in faults:
        kw, script, _ = FAULTS[fault]
        for i in range(per_fault):
            path = f"/{fault}/{i}.bin"
            route_kw = dict(kw)
            if route_kw.get("redirect") == "SELF":
                route_kw["redirect"] = server.url(path)
            elif isinstance(route_kw.get("redirect"), str) and str(route_kw["redirect"]).startswith(
                "/"
            ):
                route_kw["redirect"] = server.url(str(route_kw["redirect"]))
            route_kw.setdefault("content_type", "image/png")
            url = server.add(path, os.urandom(size), **route_kw)  # type: ignore[arg-type]
            if script:
                server.script(path, *script)
            sha = "0" * 64 if fault == "bad-checksum" else ""
            lines.append(f"{url},{sha}")
            kinds[url] = fault
    return lines, kinds


def run(per_fault: int, size: int, processes: int) -> tuple[dict[str, dict[str, int]],
                                                             dict[str, object]]:
    """One pass of the matrix; its rows and its summary."""
    alone = processes == 1  # --content-disposition keeps a run in one process
    faults = [f for f in FAULTS if alone or f != "hostile-cd"]
    server = TestServer().start()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dest = root / "out"
        lines, kinds = build(server, per_fault, size, faults)
        lst = root / "urls.csv"
        lst.write_text("\n".join(lines) + "\n")
        before_outside = set(os.listdir(root))
        started = time.monotonic()
        report = fetch(
            lst,
            dest,
            threads=16,
            retries=4,
            timeout=1.0,
            backoff_base=0.05,
            backoff_max=1.5,
            content_disposition=alone,
            expect_type="image/*",
            download_processes=processes,
        )
        elapsed = time.monotonic() - started

        rows: dict[str, dict[str, int]] = {}
        correct_total = 0
        for result in report.results:
            fault = kinds[result.url]
            want = FAULTS[fault][2]
            row = rows.setdefault(
                fault, {"urls": 0, "ok_correct": 0, "failed_recorded": 0, "unexpected": 0}
            )
            row["urls"] += 1
            if result.status == "ok" and result.path:
                body = (
                    server.route("/target").body
                    if fault == "redirect"
                    else server.route(f"/{fault}/{result.url.rsplit('/', 1)[1]}").body
                )
                if (dest / result.path).read_bytes() == body:
                    row["ok_correct"] += 1
                    correct_total += 1
            elif result.status == "failed" and result.error_type:
                row["failed_recorded"] += 1
            if result.status != want:
                row["unexpected"] += 1
        outside = sorted(set(os.listdir(root)) - before_outside - {"out"})
        manifest_lines = (dest / ".fetcher" / "manifest.jsonl").read_text().splitlines()
        failed_paths = {r.path for r in report.failures if r.path}
        partial_under_final = sum(1 for p in failed_paths if (dest / p).exists())
        server.clear_log()
        rerun = fetch(lst, dest, threads=16, retries=0, content_disposition=alone,
                      expect_type="image/*", download_processes=processes)
        complete_urls = {r.url for r in report.results if r.status == "ok"}
        rerun_requests = sum(
            1 for path, _ in server.requests() if server.url(path) in complete_urls
        )
    server.stop()
    total = len(report.results)
    summary: dict[str, object] = {
        "processes": report.processes,
        "urls": total,
        "elapsed_s": round(elapsed, 2),
        "complete_and_byte_correct": correct_total,
        "failures_recorded": len(report.failures),
        "manifest_lines": len(manifest_lines),
        "files_outside_dir": len(outside),
        "partial_files_under_final_names": partial_under_final,
        "rerun_requests_for_complete_files": rerun_requests,
        "rerun_skipped": rerun.counts["skipped"],
        "unexpected_outcomes": sum(r["unexpected"] for r in rows.values()),
    }
    return rows, summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-fault", type=int, default=15)
    ap.add_argument("--size", type=int, default=150_000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    passes = {}
    bad = False
    for processes in (1, 2):
        rows, summary = run(args.per_fault, args.size, processes)
        passes[f"processes={processes}"] = {"rows": rows, "summary": summary}
        print(f"\n-- {processes} download process{'es' if processes > 1 else ''}")
        print(f"{'fault':22} {'urls':>5} {'ok+correct':>10} {'failed+recorded':>15} "
              f"{'unexpected':>10}")
        for fault, row in rows.items():
            print(
                f"{fault:22} {row['urls']:5d} {row['ok_correct']:10d} "
                f"{row['failed_recorded']:15d} {row['unexpected']:10d}"
            )
        print(json.dumps(summary, indent=2))
        bad = bad or bool(
            summary["files_outside_dir"]
            or summary["partial_files_under_final_names"]
            or summary["rerun_requests_for_complete_files"]
            or summary["unexpected_outcomes"]
            or summary["manifest_lines"] != summary["urls"]
            or summary["processes"] != processes
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(passes, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
