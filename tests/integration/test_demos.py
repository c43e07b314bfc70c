"""``fetcher demo``: every experiment runs, prints its table and conclusion, draws charts.

The numbers come from a shared, noisy machine, so they are not asserted; their shape
is (columns, modes, worker counts, units, ranges that any honest measurement obeys).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fetcher.cli import app
from fetcher.demos import FIELDS, NAMES, conclusions, render_table, run, warnings
from fetcher.demos.common import make_record
from fetcher.demos.measure import CpuMeter, Sample, have_psutil
from fetcher.demos.overhead import crossover
from fetcher.demos.plot import panels, plot
from fetcher.errors import ConfigError
from fetcher.executors import parallel_map, shutdown_pools

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TABLE_HEADER = ("workload", "mode", "workers", "size", "wall (s)", "speedup", "CPU util",
                "others")


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _check_records(records: list[dict[str, Any]]) -> None:
    """Shape every measurement must have, whatever the machine."""
    assert records
    json.dumps(records)  # notebook- and --json-ready
    for r in records:
        assert set(FIELDS) <= set(r), r
        assert r["experiment"] in NAMES
        assert r["wall_s"] > 0
        assert r["workers"] >= 1 and r["size"] >= 1 and r["cores"] >= 1
        assert r["speedup"] is not None and r["speedup"] > 0
        for key in ("cpu_util", "others_util"):
            if r[key] is not None:
                # CPU time cannot exceed wall time x cores (tick rounding allowed)
                assert 0 <= r[key] <= 1.3, r
    for r in records:
        if r["mode"] == "sequential":
            assert r["speedup"] == 1.0
        else:  # speedup is the same workload's sequential time over this one
            seq = next(s for s in records if s["experiment"] == r["experiment"]
                       and s["workload"] == r["workload"] and s["size"] == r["size"]
                       and s["mode"] == "sequential")
            assert math.isclose(r["speedup"], seq["wall_s"] / r["wall_s"], rel_tol=0.01)


def test_demo_all_quick_prints_tables_conclusions_and_writes_png(tmp_path: Path) -> None:
    chart = tmp_path / "demo.png"
    proc = subprocess.run([sys.executable, "-m", "fetcher", "demo", "all", "--quick",
                           "--plot", str(chart)], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    sections = re.split(r"^== ", out, flags=re.M)[1:]
    assert [s.split(":", 1)[0] for s in sections] == list(NAMES)
    expected_modes = {
        "io": {"sequential", "threads", "processes"},
        "cpu": {"sequential", "threads", "processes"},
        "overhead": {"sequential", "fetcher", "fetcher warm", "mp.Pool", "mp.Pool c=1",
                     "futures c=1", "futures chunked"} | ({"joblib"} if _has("joblib") else set()),
        "pipeline": {"sequential", "threads", "threads+processes"},
    }
    for name, section in zip(NAMES, sections, strict=True):
        lines = section.splitlines()
        header = next(i for i, line in enumerate(lines) if line.startswith("workload"))
        assert all(col in lines[header] for col in TABLE_HEADER), lines[header]
        rows = []
        for line in lines[header + 2:]:
            if not line.strip() or line.startswith("Conclusion"):
                break
            rows.append(line)
        assert rows, section
        for row in rows:  # wall time, speedup, CPU util and others are the last four cells
            assert re.search(r"\s\d+(\.\d+)?(e-\d+)?\s+\d[\d.e-]*x\s+(\d+%|n/a)\s+(\d+%|n/a)$",
                             row), row
        modes = {m for m in expected_modes[name] if re.search(rf"\s{re.escape(m)}\s", section)}
        assert modes == expected_modes[name], (name, modes)
        conclusion = next(line for line in lines if line.startswith("Conclusion: "))
        assert re.search(r"\d+(\.\d+)?x", conclusion), conclusion  # computed speedups
        assert "cores" in conclusion
    assert "20 ms" in sections[0]  # the local server's latency is stated
    assert chart.read_bytes().startswith(PNG_MAGIC)
    assert chart.stat().st_size > 20_000  # eight panels, not an empty canvas


def test_run_cpu_quick_returns_records_that_tables_and_charts_use(tmp_path: Path) -> None:
    records = run("cpu", quick=True)
    _check_records(records)
    assert {r["experiment"] for r in records} == {"cpu"}
    workloads = {r["workload"] for r in records}
    assert {"perfect", "squares"} <= workloads
    if _has("PIL"):
        assert "resize" in workloads
    for workload in workloads:
        rs = [r for r in records if r["workload"] == workload]
        assert {r["mode"] for r in rs} == {"sequential", "threads", "processes"}
        cores = rs[0]["cores"]
        assert {r["workers"] for r in rs if r["mode"] == "processes"} >= {1, cores}
    table = render_table(records)
    assert all(col in table.splitlines()[0] for col in TABLE_HEADER)
    assert len(table.splitlines()) == len(records) + 2
    sentence = conclusions(records)["cpu"]
    assert re.search(r"processes \d+\.\dx with \d+ workers", sentence), sentence
    assert "GIL" in sentence

    png = plot(records, tmp_path / "cpu.png")
    assert png.read_bytes().startswith(PNG_MAGIC)
    ps = panels(records)
    assert [p.title.split(": ")[1].split(" (")[0] for p in ps] == sorted(
        workloads, key=[r["workload"] for r in records].index)
    for p in ps:
        assert p.xlabel and p.ylabel and "(x)" in p.ylabel
        assert {s.mode for s in p.series} == {"threads", "processes"}
    if _has("plotly"):
        html = plot(records, tmp_path / "cpu.html").read_text()
        assert "plotly" in html.lower()
        assert "speedup over sequential (x)" in html and "workers (threads or processes)" in html
        assert "CPU-bound: perfect: threads" in html  # legend entries name panel and mode


def test_cli_demo_json_and_html_in_process(tmp_path: Path) -> None:
    target = tmp_path / "pipeline.html" if _has("plotly") else tmp_path / "pipeline.png"
    result = CliRunner().invoke(app, ["demo", "pipeline", "--quick", "--json", "--plot",
                                      str(target)])
    assert result.exit_code == 0, result.output
    start = result.stdout.index("{")
    data = json.loads(result.stdout[start:])
    assert set(data) >= {"machine", "quick", "records", "conclusions", "warnings", "seconds"}
    assert data["quick"] is True
    if not _has("PIL"):
        assert data["records"] == []
        return
    _check_records(data["records"])
    assert {r["mode"] for r in data["records"]} == {"sequential", "threads",
                                                     "threads+processes"}
    assert "photos" in data["conclusions"]["pipeline"]
    assert target.is_file() and target.stat().st_size > 10_000


@pytest.mark.parametrize("args", [["demo", "gpu"], ["demo", "cpu", "--plot", "chart.txt"]])
def test_cli_demo_rejects_bad_input_before_running(args: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "==" not in result.stdout  # nothing ran


def test_run_rejects_unknown_name() -> None:
    with pytest.raises(ConfigError, match="unknown demo"):
        run("nonsense")


def _work(n: int) -> int:
    return sum(i * i for i in range(n))


@pytest.mark.skipif(not have_psutil(), reason="worker CPU time needs psutil")
def test_cpu_meter_counts_worker_processes() -> None:
    n = 3_000_000
    with CpuMeter() as alone:
        _work(n)
    shutdown_pools()
    with CpuMeter(uses_processes=True) as pooled:
        parallel_map(_work, [n, n], mode="process", workers=2, chunksize=1)
    shutdown_pools()
    own = alone.sample.cpu_s
    assert own is not None and pooled.sample.cpu_s is not None
    # Two workers did twice the work of the single run (plus start-up): the meter must
    # see it, although the workers are children of the fork server, not of us.
    assert pooled.sample.cpu_s > 1.4 * own, (own, pooled.sample)
    others = pooled.sample.others_util
    assert others is None or 0 <= others <= 1.3  # a fraction of the cores, when known


def test_cpu_meter_threads_and_idle() -> None:
    with CpuMeter() as idle:
        import time

        time.sleep(0.2)
    assert idle.sample.cpu_s is not None and idle.sample.cpu_s < 0.1
    assert idle.sample.cpu_util is not None and idle.sample.cpu_util < 0.25


def _rec(exp: str, workload: str, mode: str, size: int, wall: float, base: float,
         cpu: float | None = None) -> dict[str, Any]:
    return make_record(exp, workload, mode, 2, size, "tasks", Sample(wall, cpu, 2), base)


def test_crossover_is_where_the_pool_starts_winning_for_good() -> None:
    seq = {1: 0.01, 4: 0.04, 16: 0.16, 64: 0.64}
    pool = {1: 0.2, 4: 0.05, 16: 0.1, 64: 0.35}  # loses at 1 and 4, wins from 16
    records = [_rec("overhead", "spin", "sequential", n, w, w) for n, w in seq.items()]
    records += [_rec("overhead", "spin", "mp.Pool", n, w, seq[n]) for n, w in pool.items()]
    records += [_rec("overhead", "spin", "joblib", n, 1.0, seq[n]) for n in seq]
    assert crossover(records, "spin", "mp.Pool") == 16
    assert crossover(records, "spin", "joblib") is None
    sentence = conclusions(records)["overhead"]
    assert "16 tasks (mp.Pool)" in sentence and "joblib" in sentence


def test_warnings_flag_measurements_other_programs_slowed() -> None:
    quiet = _rec("cpu", "squares", "threads", 8, 1.0, 1.0, cpu=0.5)
    quiet["others_util"] = 0.03
    busy = dict(quiet, mode="processes", others_util=0.6)
    assert warnings([quiet]) == []
    (note,) = warnings([quiet, busy])
    assert "1 of 2 measurements" in note and "60% of the cores" in note


def test_warnings_flag_a_starved_sequential_run() -> None:
    starved = [_rec("cpu", "squares", "sequential", 8, 1.0, 1.0, cpu=0.4)]
    assert any("40% of a core" in w for w in warnings(starved))
    healthy = [_rec("cpu", "squares", "sequential", 8, 1.0, 1.0, cpu=0.98)]
    assert warnings(healthy) == []
