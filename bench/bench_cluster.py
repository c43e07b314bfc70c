"""The Dask path against the local path: same list, same machine, 2-worker LocalCluster.

Run from the repository root::

    python bench/bench_cluster.py            # 2,000 x 10 KiB, 5 rounds
    python bench/bench_cluster.py --quick    # the same list, 3 rounds (the target is
                                             # defined on 2,000 files; a run is ~0.5 s)

A private nginx (``bench/common.py``) serves 2,000 files of 10 KiB on 127.0.0.1; the
outputs go to tmpfs when it has room (``--out``). Two contenders download the same
list into an emptied directory, rounds alternating their order, after one untimed
warm-up each:

* local: ``fetch(list, dest, threads=16)`` in this process (the ``small`` suite's
  setting);
* cluster: ``Fetcher(FetchConfig(threads=8), cluster=client)`` on a
  ``LocalCluster(n_workers=2, threads_per_worker=2, processes=True)`` started once,
  outside the timing, as a user's cluster would already be running: 8 download
  threads per worker process, 16 in all. The batch size is the default (here
  2,000 / (4 x 4 worker threads) = 125 items, 16 batches).

Both are timed from the call to the returned Report, which includes reading the list,
the manifest and (for the cluster) the check that every worker sees DEST.

Per-batch overhead: the cluster path runs again with ``cluster_batch`` set to
25, 50, 125, 250 and 500 items (80 down to 4 batches); the slope of the median wall
time against the number of batches, by least squares, is the cost one more batch adds
end to end (task submission, scheduling, the result's trip back, the worker's batch
set-up and tear-down). It is only meaningful while the batches still fill the workers,
so the 4-batch point (one per worker thread) is left out of the fit and shown apart.
Besides, an empty-batch round trip (submit one ``_run_batch`` with no items, wait for
it; median of 50) shows the latency a single batch pays, and a one-file list on both
paths (median of 10) shows the fixed cost of a run: the cluster path checks that every
worker sees DEST, sends one batch and says goodbye to the workers.

CPU: every timed run also measures the CPU seconds spent by this process, nginx and
the Dask worker processes, and what the rest of the machine used meanwhile
(``/proc/stat``); a run during which neighbours took over a quarter of the machine is
flagged, and the medians are also given over the quiet runs alone.

Target: cluster wall <= 1.5 x local wall. Exit status 1 when missed. JSON goes to
``bench/results/cluster.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import common  # noqa: E402

from fetcher import FetchConfig, Fetcher, fetch  # noqa: E402

TARGET_RATIO = 1.5
BATCHES = (25, 50, 125, 250, 500)
_TCK = os.sysconf("SC_CLK_TCK")


def _pids_cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        total += int(rest[11]) + int(rest[12])
    return total / _TCK


class Meter:
    """CPU seconds of our processes (this one, nginx, Dask workers) and of the rest."""

    def __init__(self, nginx_sid: int, worker_pids: list[int]) -> None:
        self.sid, self.pids = nginx_sid, worker_pids

    def snap(self) -> tuple[float, float]:
        me = os.times()
        own = me.user + me.system + common._session_cpu_s(self.sid) \
            + _pids_cpu_s(self.pids)
        return common._busy_cpu_s(), own


class Run:
    __slots__ = ("cpu_s", "foreign_share", "wall_s")

    def __init__(self, wall_s: float, cpu_s: float, foreign_share: float) -> None:
        self.wall_s, self.cpu_s, self.foreign_share = wall_s, cpu_s, foreign_share


def timed(fn: Any, out: Path, meter: Meter) -> Run:
    common.empty_dir(out)
    busy0, own0 = meter.snap()
    t0 = time.perf_counter()
    report = fn(out)
    wall = time.perf_counter() - t0
    busy1, own1 = meter.snap()
    if not report.ok or report.counts["ok"] != report.total:
        raise SystemExit(f"a run failed: {report.summary()} {report.failures[:3]}")
    own = own1 - own0
    foreign = max(0.0, (busy1 - busy0) - own)
    return Run(wall, own, foreign / max(1e-9, wall * (os.cpu_count() or 1)))


def empty_batch_latency(client: Any, dest: Path, n: int = 50) -> float:
    from fetcher.cluster import _end_run, _run_batch, _Spec

    spec = _Spec("benchlatency", FetchConfig(threads=1), str(dest), ())
    (dest / ".fetcher" / "partial").mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n + 5):
        t0 = time.perf_counter()
        client.submit(_run_batch, spec, i, [], pure=False).result()
        if i >= 5:
            samples.append(time.perf_counter() - t0)
    client.run(_end_run, spec.token)
    return statistics.median(samples)


def fit_slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope, my - slope * mx


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=None, help="list size (default 2000)")
    ap.add_argument("--size", type=int, default=10 * common.KiB, help="bytes per file")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5)")
    ap.add_argument("--quick", action="store_true", help="3 rounds, fewer batch samples")
    ap.add_argument("--work", type=Path, default=common.DEFAULT_WORK)
    ap.add_argument("--out", default="auto", help="auto | disk | DIR (see bench/README.md)")
    args = ap.parse_args(argv)
    files = args.files or 2000
    rounds = args.rounds or (3 if args.quick else 5)

    from distributed import Client, LocalCluster

    work = args.work.resolve()
    outputs = common.OutputRoots(args.out, work)
    root, where = outputs.pick(3 * common.files_footprint(files, args.size))
    data = work / "data" / "cluster"
    names = common.make_file_set(data, files, args.size)
    cluster = LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                           host="127.0.0.1", dashboard_address=":0")
    client = Client(cluster, set_as_default=False)
    try:
        with common.Nginx(root=data, work=work) as ng:
            assert ng.proc is not None
            meter = Meter(ng.proc.pid, list(client.run(os.getpid).values()))
            lst = common.write_lines(work / "lists" / "cluster.txt",
                                     [f"{ng.base_url}/{p.name}" for p in names])

            def local(out: Path) -> Any:
                return fetch(lst, out, threads=16)

            def on_cluster(batch: int | None) -> Any:
                return lambda out: Fetcher(FetchConfig(threads=8), cluster=client,
                                           cluster_batch=batch).run(lst, out)

            out = root / "cluster-bench"
            common.log(f"{files} x {args.size} B from {ng.base_url}, outputs on {where}")
            timed(local, out, meter)
            timed(on_cluster(None), out, meter)  # warm-up: workers import fetcher
            runs: dict[str, list[Run]] = {"local": [], "cluster": []}
            for r in range(rounds):
                order = ["local", "cluster"] if r % 2 == 0 else ["cluster", "local"]
                for name in order:
                    fn = local if name == "local" else on_cluster(None)
                    runs[name].append(timed(fn, out, meter))
                common.log(f"round {r + 1}: " + ", ".join(
                    f"{n} {runs[n][-1].wall_s:.3f} s (neighbours "
                    f"{runs[n][-1].foreign_share:.0%})" for n in order))
            by_batch: dict[int, float] = {}
            for batch in BATCHES:
                samples = [timed(on_cluster(batch), out, meter).wall_s
                           for _ in range(2 if args.quick else rounds)]
                by_batch[batch] = statistics.median(samples)
                common.log(f"batch {batch}: {by_batch[batch]:.3f} s")
            latency = empty_batch_latency(client, out)
            one = common.write_lines(work / "lists" / "cluster-one.txt",
                                     [f"{ng.base_url}/{names[0].name}"])
            single = {
                "local": statistics.median(
                    timed(lambda o: fetch(one, o), out, meter).wall_s for _ in range(10)),
                "cluster": statistics.median(
                    timed(lambda o: fetch(one, o, cluster=client), out, meter).wall_s
                    for _ in range(10)),
            }
            common.remove_tree(out)
    finally:
        client.close()
        cluster.close()
        outputs.cleanup()

    threads = 4
    fit = [(files / b, t) for b, t in by_batch.items() if files / b > threads]
    slope, intercept = fit_slope([x for x, _ in fit], [y for _, y in fit])

    def med(name: str, attr: str, quiet: bool = False) -> float:
        vals = [getattr(x, attr) for x in runs[name] if not quiet or x.foreign_share <= 0.25]
        return statistics.median(vals) if vals else float("nan")

    med_local, med_cluster = med("local", "wall_s"), med("cluster", "wall_s")
    ratio = med_cluster / med_local
    q_local, q_cluster = med("local", "wall_s", True), med("cluster", "wall_s", True)
    noisy = max(x.foreign_share for v in runs.values() for x in v)
    default_batch = max(16, min(500, -(-files // (4 * threads))))
    results = {
        "suite": "cluster", "files": files, "size": args.size, "rounds": rounds,
        "output": where, "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                     "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "runs": {n: [{"wall_s": round(x.wall_s, 4), "cpu_s": round(x.cpu_s, 3),
                      "foreign_share": round(x.foreign_share, 3)} for x in v]
                 for n, v in runs.items()},
        "local_median_s": med_local, "cluster_median_s": med_cluster, "ratio": ratio,
        "quiet_ratio": q_cluster / q_local, "max_foreign_share": noisy,
        "local_cpu_s": med("local", "cpu_s"), "cluster_cpu_s": med("cluster", "cpu_s"),
        "default_batch": default_batch,
        "batch_medians_s": {str(b): t for b, t in by_batch.items()},
        "per_batch_overhead_ms": slope * 1000, "fit_intercept_s": intercept,
        "empty_batch_roundtrip_ms": latency * 1000, "target_ratio": TARGET_RATIO,
        "one_file_s": single,
    }
    print(f"\nDask path vs local path: {files} x {args.size // 1024} KiB from local nginx, "
          f"{os.cpu_count()} CPUs, outputs on {where}, median of {rounds}")
    print(f"{'contender':<42} {'wall s':>7} {'files/s':>8} {'CPU s':>6} {'vs local':>9}")
    print(f"{'local   fetch(threads=16)':<42} {med_local:>7.3f} {files / med_local:>8.0f} "
          f"{med('local', 'cpu_s'):>6.2f} {1.0:>8.2f}x")
    print(f"{'cluster 2 workers x 8 threads, batch ' + str(default_batch):<42} "
          f"{med_cluster:>7.3f} {files / med_cluster:>8.0f} {med('cluster', 'cpu_s'):>6.2f} "
          f"{ratio:>8.2f}x")
    print("(CPU s: this process + nginx + the Dask worker processes; the scheduler runs in "
          "this process)")
    if noisy > 0.25:
        print(f"WARNING: neighbours used up to {noisy:.0%} of the machine during a run; over "
              f"the quiet runs only: local {q_local:.3f} s, cluster {q_cluster:.3f} s, "
              f"{q_cluster / q_local:.2f}x")
    print("\ncluster wall by batch size (median):")
    for b, t in by_batch.items():
        note = "" if files / b > threads else "  (no more batches than worker threads: not fitted)"
        print(f"  {b:>4} items x {files // b:>3} batches  {t:.3f} s{note}")
    print(f"per-batch overhead (slope of wall vs batches): {slope * 1000:.2f} ms")
    print(f"empty-batch round trip (submit, run nothing, result back): {latency * 1000:.2f} ms")
    print(f"one-file list: local {single['local'] * 1000:.1f} ms, cluster "
          f"{single['cluster'] * 1000:.1f} ms (the fixed cost of a run)")
    ok = ratio <= TARGET_RATIO
    print(f"target cluster <= {TARGET_RATIO}x local: {'met' if ok else 'MISSED'} "
          f"({ratio:.2f}x)")
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (common.RESULTS_DIR / "cluster.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
