"""Download benchmarks: fetcher against curl, wget2, aria2c, parfive and plain requests.

Run from the repository root::

    python bench/bench_download.py                 # every suite, default sizes
    python bench/bench_download.py small --rounds 5
    python bench/bench_download.py --quick         # smaller sizes, fewer rounds

Suites: small, bigfile, big4, split, urllist (see bench/README.md). Each timed
run gets a fresh empty output directory; within a round the tools run one after
another, and the starting tool rotates from round to round; the first round is
a warm-up and is discarded; a run that fails (exit code, timeout, a missing or
wrong file) marks the tool failed and is never timed. Tables go to stdout, JSON
to ``bench/results/<suite>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from common import GiB, KiB, MiB

SUITES = ("startup", "small", "far", "bigfile", "big4", "split", "urllist")

# A plain thread pool of requests sessions: what a Python user writes first.
REQUESTS_SCRIPT = """
import os, sys, threading
from concurrent.futures import ThreadPoolExecutor
import requests
lst, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
local = threading.local()
def get(url):
    s = getattr(local, "s", None)
    if s is None:
        s = local.s = requests.Session()
    with s.get(url, stream=True, timeout=60) as r:
        r.raise_for_status()
        with open(os.path.join(out, url.rsplit("/", 1)[1]), "wb") as f:
            for chunk in r.iter_content(1 << 16):
                f.write(chunk)
with open(lst) as fh:
    urls = [line.strip() for line in fh if line.strip()]
with ThreadPoolExecutor(n) as ex:
    for _ in ex.map(get, urls):
        pass
"""

# parfive with max_conn workers, one connection per file (max_splits=1) so the
# connection count matches the other tools; 64 KiB chunks instead of 1 KiB.
PARFIVE_SCRIPT = """
import sys
from parfive import Downloader, SessionConfig
lst, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
dl = Downloader(max_conn=n, max_splits=1, progress=False, overwrite=True,
                config=SessionConfig(file_progress=False, chunksize=65536))
with open(lst) as fh:
    for line in fh:
        if line.strip():
            dl.enqueue_file(line.strip(), path=out)
res = dl.download()
if res.errors:
    print(f"{len(res.errors)} failed, e.g. {res.errors[0]}", file=sys.stderr)
    sys.exit(1)
"""


# --------------------------------------------------------------------------- model


@dataclasses.dataclass
class Ctx:
    """What a tool's command line is built from, for one suite."""

    list_path: Path  # URL list, one URL per line
    urls: list[str]
    out: Path  # the tool's output directory (emptied before each run)
    workers: int


@dataclasses.dataclass
class Tool:
    name: str
    build: Callable[[Ctx], list[str]]
    check: Callable[[], str | None]  # None when usable, else why not
    version: Callable[[], str]
    prepare: Callable[[Ctx], None] | None = None  # e.g. write a curl config
    verify: bool = True  # False: the command writes no file (e.g. --help)


@dataclasses.dataclass
class ToolResult:
    name: str
    status: str = "ok"  # ok | failed | not available
    reason: str = ""
    version: str = ""
    cmd: list[str] = dataclasses.field(default_factory=list)
    walls: list[float] = dataclasses.field(default_factory=list)
    cpus: list[float] = dataclasses.field(default_factory=list)
    users: list[float] = dataclasses.field(default_factory=list)
    syss: list[float] = dataclasses.field(default_factory=list)
    rss: list[float] = dataclasses.field(default_factory=list)
    pss: list[float | None] = dataclasses.field(default_factory=list)  # tree PSS per run
    procs: list[int] = dataclasses.field(default_factory=list)
    orphan_cpus: list[float] = dataclasses.field(default_factory=list)
    sampler_cpu_s: float = 0.0  # harness CPU spent sampling this tool's trees
    sampled_s: float = 0.0  # wall time over which it sampled
    warmup_walls: list[float] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def median_wall(self) -> float | None:
        return common.median(self.walls) if self.status == "ok" else None

    def add_memory(self, timed: common.Timed) -> None:
        """Record one run's memory (also for failed urllist runs: memory is the point)."""
        self.rss.append(timed.peak_rss_mib)
        self.pss.append(timed.tree_pss_mib)
        self.procs.append(timed.tree_procs)

    def add(self, timed: common.Timed) -> None:
        """Record one timed, verified run."""
        self.walls.append(timed.wall_s)
        self.cpus.append(timed.cpu_s)
        self.users.append(timed.user_s)
        self.syss.append(timed.sys_s)
        self.orphan_cpus.append(timed.orphan_cpu_s)
        self.add_memory(timed)

    def sampled(self, timed: common.Timed) -> None:
        self.sampler_cpu_s += timed.sampler_cpu_s
        self.sampled_s += timed.wall_s

    def mem_per_run(self) -> list[float]:
        """Per run, the larger of peak RSS and tree PSS (what memory targets are judged on)."""
        return [max(r, p or 0.0) for r, p in zip(self.rss, self.pss, strict=True)]

    def as_dict(self, total_bytes: int, files: int, baseline: float | None) -> dict[str, Any]:
        wall = self.median_wall
        ok = self.status == "ok"
        mem_ok = bool(self.rss) and (ok or "rss_on_failure" in self.extra)
        pss = [p for p in self.pss if p is not None]
        return {
            "tool": self.name,
            "status": self.status,
            "reason": self.reason,
            "version": self.version,
            "cmd": self.cmd,
            "walls_s": [round(w, 4) for w in self.walls],
            "warmup_walls_s": [round(w, 4) for w in self.warmup_walls],
            "median_wall_s": wall,
            "min_wall_s": min(self.walls) if ok and self.walls else None,
            "median_cpu_s": common.median(self.cpus) if ok else None,
            "median_user_s": common.median(self.users) if ok else None,
            "median_sys_s": common.median(self.syss) if ok else None,
            # largest single process (GNU time %M), highest over the timed rounds
            "peak_rss_mib": max(self.rss) if mem_ok else None,
            # sum of PSS over the command's process tree, sampled ~every 20 ms
            "peak_tree_pss_mib": max(pss) if mem_ok and pss else None,
            # the larger of the two: memory targets are judged on this
            "peak_mem_mib": max(self.mem_per_run()) if mem_ok else None,
            "rss_mib_per_round": [round(x, 1) for x in self.rss],
            "tree_pss_mib_per_round": [None if x is None else round(x, 1) for x in self.pss],
            "tree_procs_max": max(self.procs) if self.procs else None,
            # CPU of descendants the command never waited for (reaped by the harness);
            # already included in the CPU figures above
            "median_orphan_cpu_s": common.median(self.orphan_cpus) if ok else None,
            "throughput_mb_s": (total_bytes / wall / 1e6) if wall and total_bytes else None,
            "files_per_s": (files / wall) if wall and files else None,
            # > 1: fetcher is faster than this tool (this tool's time / fetcher's time)
            "fetcher_speedup": (wall / baseline) if wall and baseline else None,
            **self.extra,
        }


# --------------------------------------------------------------------------- tools


def _which(name: str, apt: str) -> Callable[[], str | None]:
    def check() -> str | None:
        return None if common.ensure_command(name, apt) else f"{name} not installed"

    return check


def _module(mod: str, pip: str) -> Callable[[], str | None]:
    def check() -> str | None:
        return None if common.ensure_module(mod, pip) else f"python module {mod} not installed"

    return check


_FETCHER_HELP: list[str | None] = []


def _fetcher_help() -> str | None:
    if not _FETCHER_HELP:
        _FETCHER_HELP.append(common.fetcher_get_help())
    return _FETCHER_HELP[0]


def _fetcher_check(*needs: str) -> Callable[[], str | None]:
    def check() -> str | None:
        text = _fetcher_help()
        if text is None:
            return f"`{' '.join(common.fetcher_cmd())} get --help` fails"
        missing = [opt for opt in needs if opt not in text]
        return f"fetcher get has no {', '.join(missing)}" if missing else None

    return check


def _fetcher_version() -> str:
    out = subprocess.run(
        [common.prepare_fetcher().python, "-c",
         "import fetcher; print(getattr(fetcher, '__version__', '?'))"],
        capture_output=True,
        text=True,
        cwd=common.REPO_ROOT,
    )
    git = ["git", "-C", str(common.REPO_ROOT)]
    sha = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "fetcher"], capture_output=True, text=True
    ).stdout.strip()
    return f"fetcher {out.stdout.strip() or '?'} @ {sha.stdout.strip() or '?'}" + (
        " + uncommitted changes" if dirty else ""
    )


def fetcher_tool(name: str = "fetcher", *extra: str, threads: bool = True,
                 list_path: Path | None = None) -> Tool:
    """fetcher on the suite's list (or on ``list_path``: the same URLs, named otherwise)."""
    def build(c: Ctx) -> list[str]:
        lst = list_path or c.list_path
        cmd = [*common.fetcher_cmd(), "get", str(lst), "-o", str(c.out)]
        if threads:
            cmd += ["--threads", str(c.workers)]
        return [*cmd, *extra, "--quiet"]

    needs = ("--threads", "--quiet", *[e for e in extra if e.startswith("--")])
    return Tool(name, build, _fetcher_check(*needs), _fetcher_version)


def _curl_config(c: Ctx) -> Path:
    return c.list_path.with_name(f"{c.list_path.stem}.{c.out.name}.curlrc")


def _curl_prepare(c: Ctx) -> None:
    common.write_curl_config(_curl_config(c), ((u, c.out / u.rsplit("/", 1)[1]) for u in c.urls))


def curl_parallel_tool(name: str = "curl") -> Tool:
    def build(c: Ctx) -> list[str]:
        return [
            "curl",
            "--parallel",
            "--parallel-max",
            str(c.workers),
            "--parallel-immediate",
            "--fail",
            "--silent",
            "--show-error",
            "--config",
            str(_curl_config(c)),
        ]

    return Tool(
        name,
        build,
        _which("curl", "curl"),
        lambda: common.tool_version(["curl", "--version"]),
        prepare=_curl_prepare,
    )


def curl_single_tool(name: str = "curl") -> Tool:
    def build(c: Ctx) -> list[str]:
        (url,) = c.urls
        out = str(c.out / url.rsplit("/", 1)[1])
        return ["curl", "--fail", "--silent", "--show-error", "-o", out, url]

    return Tool(
        name, build, _which("curl", "curl"), lambda: common.tool_version(["curl", "--version"])
    )


def wget2_tool() -> Tool:
    def build(c: Ctx) -> list[str]:
        return [
            "wget2",
            f"--max-threads={c.workers}",
            "-i",
            str(c.list_path),
            "-P",
            str(c.out),
            "-q",
            "--no-robots",
            "--config=/dev/null",
        ]

    return Tool(
        "wget2",
        build,
        _which("wget2", "wget2"),
        lambda: common.tool_version(["wget2", "--version"]),
    )


def aria2c_tool(name: str = "aria2c", *extra: str) -> Tool:
    def build(c: Ctx) -> list[str]:
        return [
            "aria2c",
            f"-j{c.workers}",
            "-i",
            str(c.list_path),
            "-d",
            str(c.out),
            "--no-conf",
            "--quiet",
            "--console-log-level=error",
            "--summary-interval=0",
            "--download-result=hide",
            "--allow-overwrite=true",
            "--auto-file-renaming=false",
            *extra,
        ]

    return Tool(
        name,
        build,
        _which("aria2c", "aria2"),
        lambda: common.tool_version(["aria2c", "--version"]),
    )


def python_script_tool(name: str, script: str, module: str, pip: str) -> Tool:
    def build(c: Ctx) -> list[str]:
        return [sys.executable, "-c", script, str(c.list_path), str(c.out), str(c.workers)]

    def version() -> str:
        p = subprocess.run(
            [sys.executable, "-c", f"import {module}; print({module}.__version__)"],
            capture_output=True,
            text=True,
        )
        return f"{module} {p.stdout.strip() or '?'}"

    return Tool(name, build, _module(module, pip), version)


def parfive_tool() -> Tool:
    return python_script_tool("parfive", PARFIVE_SCRIPT, "parfive", "parfive")


def requests_tool() -> Tool:
    return python_script_tool("requests-pool", REQUESTS_SCRIPT, "requests", "requests")


# --------------------------------------------------------------------------- runner


@dataclasses.dataclass
class Settings:
    work: Path
    rounds: int | None
    warmup: int
    quick: bool
    only: set[str] | None
    urllist_lines: int | None
    urllist_budget: float
    timeout: float | None
    meter: common.CpuMeter | None = None  # restarted for each suite
    outputs: common.OutputRoots | None = None

    def out_root(self, need_bytes: int, params: dict[str, Any]) -> Path:
        """The root for this suite's output dirs; records which kind in ``params``."""
        assert self.outputs is not None
        root, kind = self.outputs.pick(need_bytes)
        params["output"] = kind
        return root


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(title: str, rows: list[dict[str, Any]], rate: str | None) -> None:
    """``rate``: an extra column, "MB/s" or "files/s" (or None)."""
    headers = ["tool", "status", "median s", "min s", "fetcher speed-up", "CPU s", "peak RSS MiB",
               "tree PSS MiB"]
    if rate:
        headers.insert(4, rate)
    table = []
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"[:48]
        line = [
            r["tool"],
            status,
            _fmt(r["median_wall_s"]),
            _fmt(r["min_wall_s"]),
            _fmt(r["fetcher_speedup"], ".2f") + ("x" if r["fetcher_speedup"] else ""),
            _fmt(r["median_cpu_s"], ".2f"),
            _fmt(r["peak_rss_mib"], ".1f"),
            _fmt(r["peak_tree_pss_mib"], ".1f"),
        ]
        if rate:
            key = "throughput_mb_s" if rate == "MB/s" else "files_per_s"
            line.insert(4, _fmt(r[key], ".0f"))
        table.append(line)
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(headers)]
    print(f"\n== {title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)))


def ratio_lines(rows: list[dict[str, Any]], base_name: str) -> list[str]:
    base = next((r for r in rows if r["tool"] == base_name), None)
    if base is None or base["median_wall_s"] is None:
        return [f"{base_name}: no timing, so no ratios"]
    lines = []
    for r in rows:
        if r["tool"] == base_name or r["median_wall_s"] is None:
            continue
        ratio = r["median_wall_s"] / base["median_wall_s"]
        times = f"({base['median_wall_s']:.3f} s vs {r['median_wall_s']:.3f} s)"
        if abs(ratio - 1) < 0.03:
            lines.append(f"{base_name} is as fast as {r['tool']}, within 3% {times}")
        elif ratio >= 1:
            lines.append(f"{base_name} is {ratio:.2f}x faster than {r['tool']} {times}")
        else:
            lines.append(f"{base_name} is {1 / ratio:.2f}x slower than {r['tool']} {times}")
    return lines


def run_rounds(
    suite: str,
    tools: list[Tool],
    *,
    list_path: Path,
    urls: list[str],
    expected: Sequence[Path],
    workers: int,
    settings: Settings,
    rounds: int,
    timeout: float,
    out_root: Path,
) -> list[ToolResult]:
    """Warm-up + ``rounds`` timed rounds; tools alternate, start rotates per round."""
    results = {t.name: ToolResult(t.name) for t in tools}
    active: list[Tool] = []
    for t in tools:
        r = results[t.name]
        if settings.only and t.name.split()[0] not in settings.only | {"fetcher"}:
            r.status, r.reason = "not available", "excluded by --only"
            continue
        why = t.check()
        if why:
            r.status, r.reason = "not available", why
            common.log(f"{suite}: {t.name}: {why}")
            continue
        r.version = t.version()
        active.append(t)
    ctxs = {t.name: Ctx(list_path, urls, out_root / suite / _slug(t.name), workers) for t in active}
    for t in active:
        if t.prepare:
            t.prepare(ctxs[t.name])
    total = settings.warmup + rounds
    for rnd in range(total):
        live = [t for t in active if results[t.name].status == "ok"]
        if not live:
            break
        k = rnd % len(live)
        for t in live[k:] + live[:k]:
            res, ctx = results[t.name], ctxs[t.name]
            common.empty_dir(ctx.out)
            os.sync()
            cmd = t.build(ctx)
            res.cmd = cmd
            tag = "warm-up" if rnd < settings.warmup else f"round {rnd - settings.warmup + 1}"
            timed = common.run_timed(cmd, timeout=timeout, cwd=common.REPO_ROOT)
            problem = None
            if timed.timed_out:
                problem = f"timed out after {timeout:.0f} s"
            elif timed.returncode != 0:
                problem = f"exit {timed.returncode}: {timed.stderr_tail[-300:]}"
            elif t.verify:
                problem = common.verify_by_name(ctx.out, expected)
            common.log(
                f"{suite} {tag}: {t.name:<18} {timed.wall_s:8.3f} s  cpu {timed.cpu_s:6.2f} s  "
                f"rss {timed.peak_rss_mib:7.1f} MiB  {_tree_text(timed)}  {problem or 'ok'}"
            )
            res.sampled(timed)
            if problem:
                res.status, res.reason = "failed", problem
            elif rnd < settings.warmup:
                res.warmup_walls.append(timed.wall_s)
            else:
                res.add(timed)
            common.empty_dir(ctx.out)
    for t in active:
        shutil.rmtree(ctxs[t.name].out, ignore_errors=True)
    return [results[t.name] for t in tools]


def _tree_text(timed: common.Timed) -> str:
    """The log's view of the tree measures: PSS, processes, samples, orphans."""
    pss = "-" if timed.tree_pss_mib is None else f"{timed.tree_pss_mib:.1f}"
    text = f"tree pss {pss} MiB ({timed.tree_procs} procs, {timed.tree_samples} samples)"
    if timed.orphans:
        text += f"  {timed.orphans} orphans reaped (cpu {timed.orphan_cpu_s:.2f} s)"
    if timed.unaccounted:
        text += f"  {timed.unaccounted} escaped (their CPU is missing)"
    return text


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


def finish(
    suite: str,
    results: list[ToolResult],
    *,
    base_name: str,
    total_bytes: int,
    files: int = 0,
    params: dict[str, Any],
    settings: Settings,
    rounds: int,
    rate: str | None,
    targets: Sequence[tuple[str, str, float]] = (),
    wall_targets: Sequence[tuple[str, str, float]] = (),
    ratio_targets: Sequence[tuple[str, str, str, float]] = (),
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    base = next((r for r in results if r.name == base_name), None)
    baseline = base.median_wall if base else None
    rows = [r.as_dict(total_bytes, files, baseline) for r in results]
    summary = ratio_lines(rows, base_name) if base_name else []
    target_rows = []
    # (targets, row field, key in the JSON, how a value prints): "below a limit" targets.
    kinds = [(targets, "peak_mem_mib", "value_mib", "{:.1f} MiB"),
             (wall_targets, "median_wall_s", "value_s", "{:.3f} s")]
    for limits, field, key, fmt in kinds:
        for tool, label, limit in limits:
            row = next((r for r in rows if r["tool"] == tool), None)
            value = row[field] if row else None
            verdict = "n/a" if value is None else ("PASS" if value < limit else "FAIL")
            row_info: dict[str, Any] = {"tool": tool, "target": label, key: value,
                                        "verdict": verdict}
            shown = "" if value is None else f" ({fmt.format(value)})"
            if field == "peak_mem_mib" and row:
                row_info["peak_rss_mib"] = row["peak_rss_mib"]
                row_info["peak_tree_pss_mib"] = row["peak_tree_pss_mib"]
                if value is not None:
                    shown = (f" ({fmt.format(value)}: peak RSS {_fmt(row['peak_rss_mib'], '.1f')},"
                             f" tree PSS {_fmt(row['peak_tree_pss_mib'], '.1f')} MiB)")
            target_rows.append(row_info)
            summary.append(f"target {tool} {label}: {verdict}{shown}")
    for tool, other, key, limit in ratio_targets:
        a = next((r[key] for r in rows if r["tool"] == tool), None)
        b = next((r[key] for r in rows if r["tool"] == other), None)
        ratio = a / b if a and b else None
        verdict = "n/a" if ratio is None else ("PASS" if ratio <= limit else "FAIL")
        label = f"{key} at most {limit:g}x {other}'s"
        target_rows.append({"tool": tool, "target": label, "ratio": ratio, "verdict": verdict})
        summary.append(f"target {tool} {label}: {verdict}"
                       + ("" if ratio is None else f" ({ratio:.2f}x)"))
    load = settings.meter.report() if settings.meter else {}
    if load.get("busy"):
        summary.append(
            f"WARNING: other processes used {load['foreign_cpu_share']:.0%} of the machine's "
            "CPU during this suite: wall times are noisy; compare min s and CPU s too"
        )
    fetcher = common.prepare_fetcher()
    sampler_cpu = sum(r.sampler_cpu_s for r in results)
    sampled = sum(r.sampled_s for r in results)
    notes = [
        *notes,
        fetcher.note,
        "peak RSS = largest single process (GNU time %M); tree PSS = peak of the PSS summed "
        "over the command's whole process tree, sampled every ~20 ms (copy-on-write pages "
        "shared after fork count once); memory targets are judged on the larger of the two",
        "CPU s = user+sys of the command and every descendant, including ones it never "
        "waited for (e.g. a multiprocessing forkserver), which the harness reaps itself",
    ]
    if sampled:
        notes.append(f"tree sampling cost the harness {sampler_cpu:.2f} CPU s over {sampled:.1f} s "
                     f"of runs ({sampler_cpu / sampled:.1%} of one core)")
    title = f"{suite}: " + ", ".join(f"{k}={v}" for k, v in params.items())
    title += f"; {rounds} timed round{'s' * (rounds != 1)} + {settings.warmup} warm-up"
    print_table(title, rows, rate)
    for line in [*summary, *notes]:
        print(f"  {line}")
    data = {
        "suite": suite,
        "quick": settings.quick,
        "params": params,
        "rounds": rounds,
        "warmup": settings.warmup,
        "baseline": base_name,
        "fetcher_command": fetcher.as_dict(),
        "machine": common.machine_info(),
        "neighbours": load,
        "tools": rows,
        "summary": summary,
        "targets": target_rows,
        "notes": list(notes),
    }
    path = common.write_json(common.RESULTS_DIR / f"{suite}.json", data)
    common.log(f"wrote {path}")
    return data


# --------------------------------------------------------------------------- suites


def _command_tool(name: str, argv: list[str], check: Callable[[], str | None],
                  version: Callable[[], str]) -> Tool:
    return Tool(name, lambda c: list(argv), check, version, verify=False)


def _on_a_terminal(argv: list[str]) -> list[str]:
    """``argv`` under a pseudo-terminal of 100 x 40 (util-linux script(1)), as a user at a
    terminal runs it: stderr is a tty, so fetcher's progress bar is live."""
    return ["script", "-qec", "stty cols 100 rows 40; " + shlex.join(argv), "/dev/null"]


def _script_check() -> str | None:
    return None if shutil.which("script") else "script(1) (util-linux) not found"


def _terminal_fetcher_tool(name: str) -> Tool:
    def build(c: Ctx) -> list[str]:
        return _on_a_terminal([*common.fetcher_cmd(), "get", str(c.list_path),
                               "-o", str(c.out)])

    def check() -> str | None:
        return _script_check() or _fetcher_check()()

    return Tool(name, build, check, _fetcher_version)


def _startup_note() -> str:
    fetcher = common.prepare_fetcher()
    if fetcher.kind == "installed":
        return ("python -c pass is the interpreter's own floor, run with the same venv "
                "python as fetcher's console script; pip compiled fetcher's bytecode at install")
    return (f"python -c pass is the interpreter's own floor ({fetcher.python}); "
            "fetcher's bytecode is precompiled first, as pip install does")


def _instructions(cmd: list[str]) -> int | None:
    """User-space instructions of ``cmd`` under callgrind (repeatable where wall time on a
    shared machine is not), or None without valgrind."""
    if not common.ensure_command("valgrind", "valgrind"):
        return None
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        done = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                               *cmd], capture_output=True, text=True, timeout=300)
    for line in done.stderr.splitlines():
        if "Collected :" in line:
            return int(line.rsplit(":", 1)[1].strip())
    return None


def suite_startup(ng: common.Nginx, s: Settings) -> dict[str, Any]:
    rounds = s.rounds or (3 if s.quick else 7)
    files = common.make_file_set(ng.root / "one", 1, 10 * KiB)
    urls = [f"{ng.base_url}/one/{files[0].name}"]
    lst = common.write_lines(s.work / "lists" / "startup.txt", urls)
    tools = [
        _command_tool("fetcher --help", [*common.fetcher_cmd(), "--help"],
                      _fetcher_check(), _fetcher_version),
        fetcher_tool("fetcher get (1 URL)", threads=False),
        # No --quiet, on a terminal: what a user at a shell waits for, progress bar
        # machinery included; script(1) alone is measured beside it.
        _terminal_fetcher_tool("fetcher get (1 URL, terminal)"),
        _command_tool("script(1) alone", _on_a_terminal(["true"]), _script_check,
                      lambda: "util-linux script"),
        curl_single_tool("curl (1 URL)"),
        _command_tool("python -c pass", [common.prepare_fetcher().python, "-c", "pass"],
                      lambda: None, lambda: sys.version.split()[0]),
    ]
    params: dict[str, Any] = {"files": 1, "size": "10 KiB"}
    out_root = s.out_root(common.files_footprint(1, 10 * KiB), params)
    results = run_rounds(
        "startup", tools, list_path=lst, urls=urls, expected=files, workers=1,
        settings=s, rounds=rounds, timeout=s.timeout or 60, out_root=out_root,
    )  # fmt: skip
    counted = {
        "fetcher get (1 URL)": _instructions(
            [*common.fetcher_cmd(), "get", str(lst), "-o", str(out_root / "callgrind"),
             "--quiet"]),
        "python -c pass": _instructions([common.prepare_fetcher().python, "-c", "pass"]),
    }
    counts = ", ".join(f"{name} {n / 1e6:.1f} M" for name, n in counted.items() if n)
    report = finish(
        "startup",
        results,
        base_name="fetcher get (1 URL)",
        total_bytes=0,
        params=params,
        settings=s,
        rounds=rounds,
        rate=None,
        wall_targets=[("fetcher --help", "wall < 0.3 s", 0.3),
                      ("fetcher get (1 URL)", "wall < 0.5 s", 0.5),
                      ("fetcher get (1 URL, terminal)", "wall < 0.5 s", 0.5)],
        notes=[_startup_note(),
               f"instructions (callgrind, user space; repeatable): {counts}" if counts
               else "instructions: valgrind not available, not counted"],
    )
    report["instructions"] = counted
    return report


def suite_small(ng: common.Nginx, s: Settings) -> dict[str, Any]:
    count, size, workers = (300 if s.quick else 2000), 10 * KiB, 16
    # Nine rounds: fetcher's curl ratios sit on their targets (1.5x wall, 2x CPU), and
    # with five the median flipped sides between runs minutes apart.
    rounds = s.rounds or (2 if s.quick else 9)
    files = common.make_file_set(ng.root / "small", count, size)
    urls = [f"{ng.base_url}/small/{p.name}" for p in files]
    lst = common.write_lines(s.work / "lists" / "small.txt", urls)
    # The same URLs, each file in a directory of its own (d/f000123/f000123.bin), as
    # dataset lists often name them: what a new directory per file costs.
    per_dir = common.write_lines(
        s.work / "lists" / "small-dirs.txt",
        (f"{u} d/{u.rsplit('/', 1)[1].partition('.')[0]}/{u.rsplit('/', 1)[1]}" for u in urls))
    tools = [
        fetcher_tool(),
        # The same run kept in one process: what fanning out costs and gains here.
        fetcher_tool("fetcher 1 process", "--download-processes", "1"),
        fetcher_tool("fetcher dir per file", list_path=per_dir),
        # Opt-in HTTP/1.1 pipelining: what it saves where latency is ~0 (see "far").
        fetcher_tool("fetcher --pipeline 4", "--pipeline", "4"),
        fetcher_tool("fetcher 1 process --pipeline 4", "--download-processes", "1",
                     "--pipeline", "4"),
        curl_parallel_tool(),
        wget2_tool(),
        aria2c_tool(),
        parfive_tool(),
        requests_tool(),
    ]
    params: dict[str, Any] = {"files": count, "size": "10 KiB", "workers": workers}
    out_root = s.out_root(common.files_footprint(count, size), params)
    results = run_rounds(
        "small", tools, list_path=lst, urls=urls, expected=files, workers=workers,
        settings=s, rounds=rounds, timeout=s.timeout or 300, out_root=out_root,
    )  # fmt: skip
    return finish(
        "small",
        results,
        base_name="fetcher",
        total_bytes=count * size,
        files=count,
        params=params,
        settings=s,
        rounds=rounds,
        rate="files/s",
        ratio_targets=[("fetcher", "curl", "median_wall_s", 1.5),
                       ("fetcher", "curl", "median_cpu_s", 2.0),
                       ("fetcher", "wget2", "median_wall_s", 1.0),
                       ("fetcher", "aria2c", "median_wall_s", 1.0),
                       ("fetcher", "parfive", "median_wall_s", 1.0)],
        notes=[
            f"every tool runs {workers} concurrent transfers "
            "(aria2c: -j16 with its default -x1 = one connection per download)",
            "parfive: max_conn=16, max_splits=1 (it still sends HEAD then GET per file)",
        ],
    )


FAR_DELAY_MS = 10


def suite_far(ng: common.Nginx, s: Settings) -> dict[str, Any]:
    """Small files from a distant server: nginx behind a proxy that delays every byte
    by FAR_DELAY_MS each way (delay_proxy.py), so each request costs a round trip."""
    count, size, workers = (300 if s.quick else 1000), 10 * KiB, 16
    rounds = s.rounds or (2 if s.quick else 3)
    files = common.make_file_set(ng.root / "small", count, size)
    with common.DelayProxy(ng.port, FAR_DELAY_MS) as proxy:
        urls = [f"http://127.0.0.1:{proxy.port}/small/{p.name}" for p in files]
        lst = common.write_lines(s.work / "lists" / "far.txt", urls)
        tools = [
            fetcher_tool("fetcher --pipeline 8", "--pipeline", "8"),
            fetcher_tool("fetcher --pipeline 4", "--pipeline", "4"),
            fetcher_tool(),
            curl_parallel_tool(),
            wget2_tool(),
            aria2c_tool(),
            aria2c_tool("aria2c pipelining", "--enable-http-pipelining=true"),
        ]
        params: dict[str, Any] = {"files": count, "size": "10 KiB", "workers": workers,
                                  "rtt": f"{2 * FAR_DELAY_MS} ms"}
        out_root = s.out_root(common.files_footprint(count, size), params)
        results = run_rounds(
            "far", tools, list_path=lst, urls=urls, expected=files, workers=workers,
            settings=s, rounds=rounds, timeout=s.timeout or 300, out_root=out_root,
        )  # fmt: skip
    floor = count / workers * 2 * FAR_DELAY_MS / 1000
    return finish(
        "far",
        results,
        base_name="fetcher --pipeline 8",
        total_bytes=count * size,
        files=count,
        params=params,
        settings=s,
        rounds=rounds,
        rate="files/s",
        ratio_targets=[("fetcher --pipeline 8", name, "median_wall_s", 1.0)
                       for name in ("curl", "wget2", "aria2c", "aria2c pipelining")],
        notes=[
            f"every byte waits {FAR_DELAY_MS} ms each way in bench/delay_proxy.py "
            f"(round trip {2 * FAR_DELAY_MS} ms); one request per round trip on "
            f"{workers} connections is {floor:.2f} s at best",
            "fetcher --pipeline N keeps N requests on each keep-alive connection "
            "(opt-in; aria2c's equivalent is --enable-http-pipelining)",
        ],
    )


def suite_bigfile(ng: common.Nginx, s: Settings) -> dict[str, Any]:
    size = 128 * MiB if s.quick else GiB
    rounds = s.rounds or (2 if s.quick else 5)
    path = common.make_big_file(ng.root / "big" / f"big{size // MiB}m.bin", size)
    urls = [f"{ng.base_url}/big/{path.name}"]
    lst = common.write_lines(s.work / "lists" / "bigfile.txt", urls)
    tools = [fetcher_tool(threads=False), curl_single_tool(), requests_tool()]
    params: dict[str, Any] = {"size": f"{size // MiB} MiB"}
    out_root = s.out_root(common.files_footprint(1, size), params)
    results = run_rounds(
        "bigfile", tools, list_path=lst, urls=urls, expected=[path], workers=1,
        settings=s, rounds=rounds, timeout=s.timeout or 300, out_root=out_root,
    )  # fmt: skip
    return finish(
        "bigfile",
        results,
        base_name="fetcher",
        total_bytes=size,
        params=params,
        settings=s,
        rounds=rounds,
        rate="MB/s",
        targets=[("fetcher", "peak memory < 100 MiB", 100.0)],
        notes=["requests-pool: one requests session, iter_content(64 KiB), for a Python floor"],
    )


def suite_big4(ng: common.Nginx, s: Settings) -> dict[str, Any]:
    size, workers = (32 * MiB if s.quick else 256 * MiB), 4
    rounds = s.rounds or (2 if s.quick else 3)
    files = [
        common.make_big_file(ng.root / "big4" / f"part{i}-{size // MiB}m.bin", size, seed=10 + i)
        for i in range(4)
    ]
    urls = [f"{ng.base_url}/big4/{p.name}" for p in files]
    lst = common.write_lines(s.work / "lists" / "big4.txt", urls)
    tools = [fetcher_tool(), curl_parallel_tool(), aria2c_tool()]
    params: dict[str, Any] = {"files": 4, "size": f"{size // MiB} MiB", "workers": workers}
    out_root = s.out_root(common.files_footprint(4, size), params)
    results = run_rounds(
        "big4", tools, list_path=lst, urls=urls, expected=files, workers=workers,
        settings=s, rounds=rounds, timeout=s.timeout or 300, out_root=out_root,
    )  # fmt: skip
    return finish(
        "big4",
        results,
        base_name="fetcher",
        total_bytes=4 * size,
        params=params,
        settings=s,
        rounds=rounds,
        rate="MB/s",
    )


def suite_split(ng: common.Nginx, s: Settings) -> dict[str, Any]:
    size = 64 * MiB if s.quick else 512 * MiB
    rounds = s.rounds or (1 if s.quick else 2)
    path = common.make_big_file(ng.root / "split" / f"split{size // MiB}m.bin", size, seed=3)
    urls = [f"{ng.base_url}/slow/split/{path.name}"]
    lst = common.write_lines(s.work / "lists" / "split.txt", urls)
    tools = [
        fetcher_tool("fetcher --split 4", "--split", "4", threads=False),
        fetcher_tool("fetcher 1 conn", threads=False),
        aria2c_tool("aria2c -x4 -s4", "-x4", "-s4", "--min-split-size=1M"),
        curl_single_tool("curl 1 conn"),
    ]
    rate = 20 * MiB  # nginx "20m" = 20 MiB/s per connection
    timeout = s.timeout or (size / rate * 2 + 60)
    params: dict[str, Any] = {
        "size": f"{size // MiB} MiB",
        "limit_rate": f"{ng.slow_rate}/connection",
    }
    out_root = s.out_root(common.files_footprint(1, size), params)
    results = run_rounds(
        "split", tools, list_path=lst, urls=urls, expected=[path], workers=1,
        settings=s, rounds=rounds, timeout=timeout, out_root=out_root,
    )  # fmt: skip
    return finish(
        "split",
        results,
        base_name="fetcher --split 4",
        total_bytes=size,
        params=params,
        settings=s,
        rounds=rounds,
        rate="MB/s",
        notes=[
            f"one connection is capped at {rate // MiB} MiB/s: {size / rate:.1f} s is the "
            f"floor for 1 connection, {size / rate / 4:.1f} s for 4",
        ],
    )


def _urllist_run(
    tool: Tool, lst: Path, out: Path, lines: int, name: str, timeout: float
) -> ToolResult:
    """One measured ``fetcher get`` over ``lst`` into ``out`` (not emptied here)."""
    res = ToolResult(name, version=tool.version())
    res.cmd = tool.build(Ctx(lst, [], out, 16))
    os.sync()
    timed = common.run_timed(res.cmd, timeout=timeout, cwd=common.REPO_ROOT)
    problem = None
    if timed.timed_out:
        problem = f"timed out after {timeout:.0f} s"
    elif timed.returncode != 0:
        problem = f"exit {timed.returncode}: {timed.stderr_tail[-300:]}"
    else:
        n_files = sum(1 for _ in common.iter_output_files(out))
        if n_files != lines:
            problem = f"{n_files} files on disk, expected {lines}"
    common.log(
        f"urllist {name}: {timed.wall_s:.1f} s cpu {timed.cpu_s:.1f} s "
        f"rss {timed.peak_rss_mib:.1f} MiB {_tree_text(timed)} {problem or 'ok'}"
    )
    res.sampled(timed)
    res.extra["lines"] = lines
    if problem:
        res.add_memory(timed)
        res.status, res.reason = "failed", problem
        res.extra["wall_s_until_stop"] = timed.wall_s
        res.extra["rss_on_failure"] = True  # reported even on timeout: memory is the point
        return res
    res.add(timed)
    res.extra["urls_per_s"] = lines / timed.wall_s
    return res


def suite_urllist(ng: common.Nginx, s: Settings) -> dict[str, Any]:
    """fetcher's peak memory (RSS, tree PSS) and wall time over a 1,000,000-line URL list.

    Every URL is distinct and real: nginx answers ``/t/...`` with a 1-byte body
    without touching its disk, so what is measured is fetcher's per-URL cost
    (parse, name, request, write a file, a manifest line) and whatever memory it
    keeps per URL. No warm-up (this suite is about memory). Four runs:

    1. fresh, M = N/10 lines; 2. the same command again (re-run: the manifest
       records all M complete, so nothing is requested);
    3. fresh, N lines; 4. re-run of N lines.

    N defaults to 1,000,000. Unless ``--urllist-lines`` is given, N is scaled
    down when run 1's speed says run 3 would exceed ``--urllist-budget`` seconds;
    the growth per line between M and N then gives a projection to 1,000,000
    (printed as a projection, not a measurement).
    """
    target = s.urllist_lines or (20_000 if s.quick else 1_000_000)
    small = max(1, target // 10)
    tool = fetcher_tool()
    why = tool.check()
    params: dict[str, Any] = {"lines": target, "workers": 16}
    # 1-byte files (a page each on tmpfs) + a manifest line (~300 B) each
    out = s.out_root(common.files_footprint(target, 1) + target * 400, params) / "urllist"
    base = f"{ng.base_url}/t"
    notes: list[str] = []
    results: list[ToolResult] = []
    lines = target
    if why:
        results = [
            ToolResult(f"fetcher {kind} {n:,}", status="not available", reason=why)
            for n in (small, target)
            for kind in ("fresh", "re-run")
        ]
    else:
        for n, prefix in ((small, "s"), (target, "")):
            if n == target and results[0].status == "ok" and not s.urllist_lines:
                # Scale down when the full list would not fit the time budget.
                rate = results[0].extra["urls_per_s"]
                estimate = target / rate
                if estimate > s.urllist_budget:
                    lines = max(small * 2, int(rate * s.urllist_budget) // 10_000 * 10_000)
                    notes.append(
                        f"scaled down from {target:,} to {lines:,} lines: at {rate:,.0f} URLs/s "
                        f"the full list would take ~{estimate:.0f} s, over the "
                        f"{s.urllist_budget:.0f} s budget (--urllist-budget)"
                    )
                    n = lines
            elif n == target:
                lines = n
            lst = s.work / "lists" / f"urllist-{prefix}{n}.txt"
            # /t/NNN/uNNNNNNN: 10,000 files per directory, like a real mirror tree.
            common.write_lines(lst, (f"{base}/{prefix}{i // 10000:03d}/u{i:07d}" for i in range(n)))
            timeout = s.timeout or max(120.0, 3 * s.urllist_budget)
            common.empty_dir(out)
            fresh = _urllist_run(tool, lst, out, n, f"fetcher fresh {n:,}", timeout)
            results.append(fresh)
            if fresh.status == "ok":
                results.append(_urllist_run(tool, lst, out, n, f"fetcher re-run {n:,}", timeout))
            else:
                results.append(
                    ToolResult(f"fetcher re-run {n:,}", status="failed", reason="fresh run failed")
                )
            t0 = time.perf_counter()
            common.remove_tree(out)
            common.log(f"urllist: removed {n:,} output files in {time.perf_counter() - t0:.1f} s")
            lst.unlink(missing_ok=True)
    params["lines"] = lines
    notes.insert(
        0,
        f"{lines:,} distinct URLs, each a real 1-byte 200 from nginx (/t/...), 16 threads; "
        "one run each, no warm-up: this suite measures memory, not speed",
    )
    for r in results:
        if r.status == "ok":
            notes.append(f"{r.name}: {r.extra['urls_per_s']:,.0f} URLs/s")
    projections: dict[str, float] = {}
    for i, kind in ((0, "fresh"), (1, "re-run")):
        a, b = results[i], results[i + 2]
        if a.status == "ok" and b.status == "ok" and lines > small:
            # on the larger of peak RSS and tree PSS, as the target is judged
            mem_a, mem_b = a.mem_per_run()[0], b.mem_per_run()[0]
            per_line = (mem_b - mem_a) * MiB / (lines - small)
            if per_line <= 0:
                notes.append(
                    f"{kind}: peak memory did not grow with the list "
                    f"({mem_a:.1f} MiB at {small:,}, {mem_b:.1f} MiB at {lines:,} lines)"
                )
                per_line = 0.0
            else:
                notes.append(
                    f"{kind}: peak memory grows {per_line:,.0f} bytes per line "
                    f"({small:,} -> {lines:,} lines)"
                )
            if lines < 1_000_000:
                projections[kind] = mem_b + per_line * (1_000_000 - lines) / MiB
                notes.append(
                    f"{kind}: linear PROJECTION to 1,000,000 lines: "
                    f"{projections[kind]:.0f} MiB (not measured)"
                )
    data = finish(
        "urllist",
        results,
        base_name="",
        total_bytes=0,
        params=params,
        settings=dataclasses.replace(s, warmup=0),
        rounds=1,
        rate=None,
        targets=[(r.name, "peak memory < 200 MiB", 200.0) for r in results[2:]],
        notes=notes,
    )
    data["projection_1m_rss_mib"] = projections or None  # of the larger memory measure
    common.write_json(common.RESULTS_DIR / "urllist.json", data)
    return data


RUNNERS: dict[str, Callable[[common.Nginx, Settings], dict[str, Any]]] = {
    "startup": suite_startup,
    "small": suite_small,
    "far": suite_far,
    "bigfile": suite_bigfile,
    "big4": suite_big4,
    "split": suite_split,
    "urllist": suite_urllist,
}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("suites", nargs="*", metavar="SUITE",
                    help=f"any of {', '.join(SUITES)}, or all (default: all)")  # fmt: skip
    ap.add_argument("--rounds", type=int, help="timed rounds per suite (default per suite)")
    ap.add_argument("--warmup", type=int, default=1, help="discarded warm-up rounds (default 1)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds")
    ap.add_argument("--only", help="comma-separated tools to run besides fetcher")
    ap.add_argument(
        "--urllist-lines",
        type=int,
        help="lines in the urllist suite (default 1,000,000, scaled to the budget; quick 20,000)",
    )
    ap.add_argument(
        "--urllist-budget",
        type=float,
        default=240,
        help="seconds the big urllist run may take before it is scaled down (default 240)",
    )
    ap.add_argument("--timeout", type=float, help="per-run timeout in seconds")
    ap.add_argument("--work", type=Path, default=common.DEFAULT_WORK, help="work directory")
    ap.add_argument(
        "--out",
        default="auto",
        help="where tools write: auto (tmpfs /dev/shm when it has room, else WORK/out), "
        "disk (WORK/out), or a directory",
    )
    args = ap.parse_args(argv)
    unknown = [x for x in args.suites if x not in (*SUITES, "all")]
    if unknown:
        ap.error(f"unknown suite {', '.join(unknown)} (choose from {', '.join(SUITES)}, all)")
    suites = [x for x in SUITES if x in args.suites or "all" in args.suites or not args.suites]
    settings = Settings(
        work=args.work.resolve(),
        rounds=args.rounds,
        warmup=args.warmup,
        quick=args.quick,
        only=set(args.only.split(",")) if args.only else None,
        urllist_lines=args.urllist_lines,
        urllist_budget=args.urllist_budget,
        timeout=args.timeout,
        outputs=common.OutputRoots(args.out, args.work.resolve()),
    )
    t0 = time.perf_counter()
    common.prepare_fetcher(settings.work)  # builds/updates WORK/venv-fetcher, or falls back
    data_root = settings.work / "data"
    data_root.mkdir(parents=True, exist_ok=True)
    try:
        with common.Nginx(root=data_root, work=settings.work) as ng:
            for name in suites:
                t1 = time.perf_counter()
                settings.meter = common.CpuMeter(ng.proc.pid if ng.proc else None)
                RUNNERS[name](ng, settings)
                common.log(f"{name}: done in {time.perf_counter() - t1:.0f} s")
    finally:
        if settings.outputs is not None:
            settings.outputs.cleanup()
    common.log(f"all done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
