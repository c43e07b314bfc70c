"""Dask distributed (issue 7): a real LocalCluster of 2 worker processes on 127.0.0.1.

The cluster is started once for the module (a few seconds). Tests that kill a worker
wait for its nanny to bring a replacement before they return.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fetcher import FetchConfig, Fetcher, fetch, parallel_map
from fetcher.cli import app
from fetcher.errors import ConfigError, TaskError
from fetcher.executors import parallel_imap
from tests.httpserver import TestServer

distributed = pytest.importorskip("distributed")

from fetcher import cluster as cl  # noqa: E402  (only with distributed installed)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    lc = distributed.LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                                  host="127.0.0.1", dashboard_address=":0")
    try:
        yield lc
    finally:
        # Clients fetcher cached for this scheduler go first: left open, they keep
        # trying to reconnect after it stops (tracebacks and a 20 s wait at exit).
        cl.shutdown_clients()
        lc.close()


@pytest.fixture(scope="module")
def client(cluster: Any) -> Iterator[Any]:
    c = distributed.Client(cluster, set_as_default=False)
    try:
        yield c
    finally:
        c.close()


# --------------------------------------------------------------------------- helpers


def square(x: int) -> int:
    if x == 13:
        raise ValueError(f"unlucky {x}")
    time.sleep(0.002 * (x % 3))
    return x * x


def slow_pid(x: int) -> tuple[int, int]:
    time.sleep(0.15)
    return x, os.getpid()


def die_on_five(x: int) -> int:
    if x == 5:
        os._exit(1)  # a poison item: kills whichever worker runs it
    return x


class Recorder:
    """A Progress that remembers what it was told."""

    def __init__(self) -> None:
        self.total: int | None = -1
        self.done = 0
        self.closed = False
        self.lock = threading.Lock()

    def start(self, total: int | None, *, unit: str = "file", desc: str = "") -> None:
        self.total = total

    def set_total(self, total: int) -> None:
        self.total = total

    def update(self, n: int = 1, *, nbytes: int = 0) -> None:
        with self.lock:
            self.done += n

    def close(self) -> None:
        self.closed = True


def manifest(dest: Path) -> list[dict[str, Any]]:
    lines = (dest / ".fetcher" / "manifest.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def comparable(dest: Path) -> list[dict[str, Any]]:
    recs = manifest(dest)
    for r in recs:
        del r["elapsed_s"]
    return sorted(recs, key=lambda r: (r["url"], r["path"] or ""))


def tree(dest: Path) -> dict[str, str]:
    """Every file under dest -> sha256; the run's own journals aside (a local run with
    --post keeps published.jsonl, a cluster run its spent journals are removed)."""
    out = {}
    for p in dest.rglob("*"):
        rel = p.relative_to(dest).as_posix()
        if p.is_file() and rel not in (".fetcher/manifest.jsonl", ".fetcher/published.jsonl"):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def kill_busy_worker(client: Any, prefix: str, *, timeout: float = 20.0) -> str:
    """SIGKILL the worker process that is running a task whose key starts with prefix."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for addr, keys in client.processing().items():
            if any(str(k).startswith(prefix) for k in keys):
                pid = client.run(os.getpid, workers=[addr])[addr]
                os.kill(pid, signal.SIGKILL)
                return str(addr)
        time.sleep(0.02)
    raise AssertionError(f"no worker was running a {prefix} task")


def wait_for_two_workers(client: Any) -> None:
    client.wait_for_workers(2, timeout=60)


# --------------------------------------------------------------------------- parallel_map


def test_parallel_map_dask_ordered_unordered_errors_progress(client: Any) -> None:
    items = list(range(60))
    prog = Recorder()
    got = parallel_map(square, items, mode="dask", address=client, progress=prog)
    assert [g for i, g in enumerate(got) if i != 13] == [x * x for x in items if x != 13]
    err = got[13]
    assert isinstance(err, TaskError) and err.index == 13 and err.item == 13
    assert isinstance(err.original, ValueError) and "unlucky 13" in str(err.original)
    assert "in square" in err.traceback_text and "raise ValueError" in err.traceback_text
    assert (prog.total, prog.done, prog.closed) == (60, 60, True)

    unordered = parallel_map(square, iter(items), mode="dask", address=client, ordered=False,
                             chunksize=1)
    assert sorted(v for v in unordered if not isinstance(v, TaskError)) == \
        sorted(x * x for x in items if x != 13)
    assert sum(isinstance(v, TaskError) for v in unordered) == 1

    with pytest.raises(ValueError, match="unlucky 13"):
        parallel_map(square, items, mode="dask", address=client, on_error="raise")

    # Lazily consumed: an endless generator is fine, only a window is ever submitted.
    def naturals() -> Iterator[int]:
        n = 0
        while True:
            yield n
            n += 2

    first = list(zip(range(25), parallel_imap(square, naturals(), mode="dask",
                                               address=client), strict=False))
    assert [v for _, v in first] == [x * x for x in range(0, 50, 2)]
    # A lambda travels by value; an address string works as well as a Client.
    addr = client.scheduler.address
    assert parallel_map(lambda x: x + 1, range(5), mode="dask", address=addr) == [1, 2, 3, 4, 5]


def test_parallel_map_dask_survives_a_killed_worker(client: Any) -> None:
    wait_for_two_workers(client)
    out: list[Any] = []
    runner = threading.Thread(target=lambda: out.append(parallel_map(
        slow_pid, range(40), mode="dask", address=client, chunksize=2)))
    runner.start()
    kill_busy_worker(client, "fetcher-map-")
    runner.join(90)
    assert not runner.is_alive()
    results = out[0]
    assert [r[0] for r in results] == list(range(40))  # every item once, in order
    assert not any(isinstance(r, TaskError) for r in results)
    wait_for_two_workers(client)


def test_parallel_map_dask_isolates_an_item_that_kills_workers() -> None:
    import dask

    from fetcher.errors import WorkerLostError

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        lc = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      host="127.0.0.1", dashboard_address=":0")
    try:
        got = parallel_map(die_on_five, range(8), mode="dask", address=lc.scheduler_address,
                           chunksize=4)
    finally:
        cl.shutdown_clients()
        lc.close()
    assert [g for i, g in enumerate(got) if i != 5] == [0, 1, 2, 3, 4, 6, 7]
    assert isinstance(got[5], WorkerLostError) and got[5].index == 5


# --------------------------------------------------------------------------- downloads


def _serve_list(server: TestServer, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    bodies: dict[str, bytes] = {}
    for i in range(90):
        bodies[f"/d/{i % 7}/f{i}.bin"] = os.urandom(500 + i * 97)
    bodies["/same/name.txt"] = b"first"
    bodies["/other/name.txt?v=2"] = b"second"  # both want name.txt in the list below
    for path, body in bodies.items():
        server.add(path.split("?")[0], body)
    rows = ["url,path,label"]
    for i, path in enumerate(bodies):
        target = "both/name.txt" if "name.txt" in path else ""
        rows.append(f"{server.url(path)},{target},L{i}")
    rows.append(f"{server.url('/missing.bin')},,gone")  # 404: a failed item
    rows.append(f"{server.url('/d/0/f0.bin')},,dup")  # same URL, same target: once
    sha_ok = hashlib.sha256(bodies["/d/1/f1.bin"]).hexdigest()
    rows.append(f"{server.url('/d/1/f1.bin')},checked/f1.bin,sha")
    lst = tmp_path / "urls.csv"
    lst.write_text("\n".join(rows) + "\n")
    jsonl = tmp_path / "sha.jsonl"
    jsonl.write_text(json.dumps({"url": server.url("/d/1/f1.bin"), "path": "sha/f1.bin",
                                 "sha256": sha_ok}) + "\n"
                     + json.dumps({"url": server.url("/d/2/f2.bin"), "path": "sha/bad.bin",
                                   "sha256": "0" * 64}) + "\n")
    return lst, bodies


def test_cluster_run_gives_the_same_files_and_manifest_as_a_local_run(
        server: TestServer, tmp_path: Path, client: Any) -> None:
    wait_for_two_workers(client)
    lst, bodies = _serve_list(server, tmp_path)
    local, remote = tmp_path / "local", tmp_path / "remote"
    for d in (local, remote):  # a foreign file at a target: --on-exists rename, both sides
        (d / "d" / "3").mkdir(parents=True)
        (d / "d" / "3" / "f3.bin").write_bytes(b"not ours")
    cfg = FetchConfig(threads=4, retries=1, backoff_base=0.01)
    a = Fetcher(cfg, post=["sha256"], processes=1).run(lst, local)
    prog = Recorder()
    b = Fetcher(cfg, post=["sha256"], cluster=client, progress=prog).run(lst, remote)
    assert a.counts == b.counts == {"ok": 93, "skipped": 0, "failed": 1}
    assert (prog.total, prog.done, prog.closed) == (95, 94, True)  # 95 rows, one a duplicate
    assert comparable(local) == comparable(remote)
    assert tree(local) == tree(remote)
    rec = {r["path"]: r for r in manifest(remote)}
    assert rec["d/3/f3.1.bin"]["outputs"] == [".fetcher/derived/sha256/d/3/f3.1.bin.sha256"]
    assert rec["d/5/f5.bin"]["label"] == "L5"  # carried columns come back too
    assert (remote / "d/5/f5.bin").read_bytes() == bodies["/d/5/f5.bin"]
    assert (remote / "both/name.1.txt").read_bytes() == b"second"
    assert (remote / "d/3/f3.bin").read_bytes() == b"not ours"
    assert os.listdir(remote / ".fetcher" / "partial") == []

    # A JSONL list with a good and a bad sha256: verified on the worker.
    c = fetch(tmp_path / "sha.jsonl", remote, cluster=client)
    assert c.counts == {"ok": 1, "skipped": 0, "failed": 1}
    assert c.failures[0].error_type == "ChecksumError"
    assert not (remote / "sha/bad.bin").exists()

    # A re-run skips complete files without a request, on the cluster as locally.
    server.clear_log()
    again_local = Fetcher(cfg).run(lst, local)
    asked_local = sorted(p for p, _ in server.requests())
    server.clear_log()
    again = Fetcher(cfg, cluster=client).run(lst, remote)
    assert again.counts == again_local.counts
    assert sorted(p for p, _ in server.requests()) == asked_local
    assert again.counts["skipped"] >= 92 and "/missing.bin" in asked_local


def test_two_attempts_of_one_batch_never_share_a_partial(server: TestServer,
                                                         dest: Path) -> None:
    """A worker declared dead that keeps running: both attempts finish, one clean copy."""
    from fetcher.cluster import _end_run, _run_batch, _Spec
    from fetcher.download import PARTIAL_DIR, partial_name

    body = os.urandom(300_000)
    urls = [server.add(f"/z/{i}.bin", body[i:], slow_bps=600_000) for i in range(4)]
    # An earlier run's partial of the first file: exactly one attempt may claim it.
    shared = dest / PARTIAL_DIR
    shared.mkdir(parents=True)
    (shared / partial_name(urls[0], "z/0.bin")).write_bytes(b"junk that is not a prefix")
    # Two worker processes, as far as the run state goes: one state per token.
    specs = [_Spec(t * 12, FetchConfig(threads=4, retries=0), str(dest), ()) for t in "ab"]
    items = [(u, f"z/{i}.bin", None, i == 0, None) for i, u in enumerate(urls)]
    out: list[Any] = []
    attempts = [threading.Thread(target=lambda s=s: out.append(_run_batch(s, 0, items)))
                for s in specs]
    attempts[0].start()
    time.sleep(0.2)  # the second attempt starts while the first is mid-stream
    attempts[1].start()
    for t in attempts:
        t.join(60)
    for spec in specs:
        _end_run(spec.token)
    assert len(out) == 2
    for results, stop in out:
        assert stop is None
        assert [r.status for r in results] == ["ok"] * 4
        assert [r.sha256 for r in results] == \
            [hashlib.sha256(body[i:]).hexdigest() for i in range(4)]
    for i in range(4):
        assert (dest / f"z/{i}.bin").read_bytes() == body[i:]
    assert os.listdir(shared) == []  # attempt directories removed, the claimed junk gone
    # The workers journaled what they published: a client that died before recording
    # the batch does not make the next cluster run rename around these files.
    assert len(list((dest / ".fetcher" / "cluster").glob("*.jsonl"))) == 2


def test_a_cut_transfer_resumes_on_the_next_cluster_run(server: TestServer, dest: Path,
                                                         client: Any) -> None:
    body = os.urandom(400_000)
    url = server.add("/big.bin", body)
    server.script("/big.bin", "cut:150000")
    first = fetch([url], dest, cluster=client, retries=0)
    assert first.counts["failed"] == 1 and not (dest / "big.bin").exists()
    # The worker handed its partial back to the shared directory, sidecar and all ...
    assert len(os.listdir(dest / ".fetcher" / "partial")) == 2
    server.clear_log()
    second = fetch([url], dest, cluster=client)
    assert second.counts["ok"] == 1
    assert (dest / "big.bin").read_bytes() == body
    # ... and the next run's worker claimed it and asked only for the rest.
    (_, headers), = server.requests("/big.bin")
    assert headers.get("Range") == "bytes=150000-"
    assert os.listdir(dest / ".fetcher" / "partial") == []


def test_cancel_stops_the_workers_transfers_and_the_next_run_resumes(
        server: TestServer, dest: Path, client: Any) -> None:
    wait_for_two_workers(client)
    bodies = {f"/s/{i}.bin": os.urandom(300_000 + i) for i in range(6)}
    for path, body in bodies.items():
        server.add(path, body, slow_bps=100_000)  # three seconds per file
    urls = [server.url(p) for p in bodies]
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    t0 = time.monotonic()
    report = Fetcher(FetchConfig(threads=4), cluster=client).run(urls, dest, cancel=cancel)
    assert time.monotonic() - t0 < 2.8  # not the three seconds a transfer would take
    assert report.interrupted and report.counts["ok"] == 0
    records = manifest(dest)
    assert len(records) == len({r["url"] for r in records}) == 6
    assert {r["error_type"] for r in records} == {"CancelledError"}
    assert not any((dest / p.lstrip("/")).exists() for p in bodies)
    # Partials went back to the shared directory: the next run continues them.
    assert any(name.endswith(".part") for name in os.listdir(dest / ".fetcher" / "partial"))
    server.clear_log()
    for path in bodies:
        server.route(path).slow_bps = None
    again = fetch(urls, dest, cluster=client)
    assert again.counts["ok"] == 6
    for path, body in bodies.items():
        assert (dest / path.lstrip("/")).read_bytes() == body
    assert any("Range" in headers for _, headers in server.requests())


def test_a_client_killed_mid_run_is_resumed_without_renames(
        server: TestServer, dest: Path, tmp_path: Path, client: Any) -> None:
    from fetcher.cluster import _end_run, _run_batch, _Spec

    urls = [server.add(f"/j/{i}.txt", f"body {i}".encode()) for i in range(6)]
    # What a worker did for a client that died before it wrote the manifest:
    spec = _Spec("deadclient00", FetchConfig(), str(dest), ())
    _run_batch(spec, 0, [(u, f"j/{i}.txt", None, False, None) for i, u in enumerate(urls[:3])])
    _end_run(spec.token)
    server.clear_log()
    report = fetch(urls, dest, cluster=client)
    assert report.counts == {"ok": 3, "skipped": 3, "failed": 0}
    assert sorted(r["path"] for r in manifest(dest)) == [f"j/{i}.txt" for i in range(6)]
    assert sorted(p for p, _ in server.requests()) == [f"/j/{i}.txt" for i in range(3, 6)]
    assert list((dest / ".fetcher" / "cluster").glob("*.jsonl")) == []  # spent


def test_a_worker_killed_mid_run_costs_only_its_batches(
        server: TestServer, dest: Path, tmp_path: Path, client: Any) -> None:
    wait_for_two_workers(client)
    bodies = {f"/k/{i}.bin": os.urandom(20_000 + i) for i in range(40)}
    for path, body in bodies.items():
        server.add(path, body, slow_bps=40_000)  # about half a second per file
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(server.url(p) for p in bodies) + "\n")
    fetcher = Fetcher(FetchConfig(threads=4), cluster=client, cluster_batch=4)
    out: list[Any] = []
    runner = threading.Thread(target=lambda: out.append(fetcher.run(lst, dest)))
    runner.start()
    time.sleep(0.8)
    kill_busy_worker(client, "fetcher-get-")
    runner.join(90)
    assert not runner.is_alive()
    report = out[0]
    assert report.counts == {"ok": 40, "skipped": 0, "failed": 0}, report.failures[:3]
    records = manifest(dest)
    assert sorted(r["url"] for r in records) == sorted(server.url(p) for p in bodies)
    assert all(r["status"] == "ok" for r in records)
    # A retried batch writes the same names again (no name.1.bin beside a lost attempt's).
    assert sorted(r["path"] for r in records) == sorted(p.lstrip("/") for p in bodies)
    assert sorted(p.name for p in (dest / "k").iterdir()) == sorted(
        p.rsplit("/", 1)[1] for p in bodies)
    for path, body in bodies.items():
        assert (dest / path.lstrip("/")).read_bytes() == body
    # The lost batches really ran twice, and their attempt directories are gone.
    counts: dict[str, int] = {}
    for p, _ in server.requests():
        counts[p] = counts.get(p, 0) + 1
    assert max(counts.values()) >= 2
    assert os.listdir(dest / ".fetcher" / "partial") == []
    wait_for_two_workers(client)


# --------------------------------------------------------------------------- CLI


def test_cli_get_process_write_on_the_cluster(server: TestServer, tmp_path: Path,
                                              cluster: Any, client: Any) -> None:
    wait_for_two_workers(client)
    addr = cluster.scheduler_address
    urls = [server.add(f"/c/{i}.txt", f"line {i}\n".encode()) for i in range(12)]
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(urls) + "\n")
    out = tmp_path / "out"
    db = tmp_path / "rows.db"
    res = CliRunner().invoke(app, ["get", str(lst), "-o", str(out), "--cluster", addr,
                                   "--sink", f"sqlite:///{db}", "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["ok"] == 12
    conn = sqlite3.connect(db)
    try:  # the client fed the sink every record
        assert conn.execute("select count(*) from downloads where status = 'ok'"
                            ).fetchone() == (12,)
    finally:
        conn.close()

    files = sorted((out / "c").iterdir())
    res = CliRunner().invoke(app, ["process", *map(str, files), "--post", "md5", "-o",
                                   str(out), "--cluster", addr, "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    for i in range(12):
        side = out / ".fetcher" / "derived" / "md5" / "c" / f"{i}.txt.md5"
        assert side.read_text().split()[0] == hashlib.md5(f"line {i}\n".encode()).hexdigest()

    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(3):
        (shards / f"part-{k}.jsonl").write_text("".join(
            json.dumps({"id": k * 100 + i, "v": f"x{i}"}) + "\n" for i in range(50)))
    (shards / "_SUCCESS").write_text("")  # bookkeeping names are ignored
    args = ["write", str(shards), f"sqlite:///{db}", "--table", "rows", "--cluster", addr,
            "--quiet", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rows"] == 150
    res = CliRunner().invoke(app, args)  # the same loads again: nothing twice
    assert json.loads(res.stdout)["rows"] == 0
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("select count(*), count(distinct id) from rows").fetchone() \
            == (150, 150)
    finally:
        conn.close()


def test_bad_cluster_setups_fail_before_any_download(server: TestServer, dest: Path,
                                                     client: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    url = server.add("/x.txt", b"x")
    with pytest.raises(ConfigError, match="content-disposition"):
        fetch([url], dest, cluster=client, content_disposition=True)
    with pytest.raises(ConfigError, match="cannot import"):
        fetch([url], dest, cluster=client, post=["nosuchpkg.mod:fn"])
    with pytest.raises(ConfigError, match="cannot reach the Dask scheduler"):
        cl.get_client("tcp://127.0.0.1:9", timeout=1)
    assert server.requests() == []

    monkeypatch.setitem(sys.modules, "distributed", None)  # as if dask were not installed
    with pytest.raises(ConfigError, match=r"pip install 'fetcher\[dask\]'"):
        parallel_map(square, [1], mode="dask")
    with pytest.raises(ConfigError, match=r"pip install 'fetcher\[dask\]'"):
        fetch([url], dest, cluster="tcp://127.0.0.1:8786")
