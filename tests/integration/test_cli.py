"""The CLI in-process (typer's CliRunner) and once as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from fetcher.cli import app
from tests.httpserver import TestServer

runner = CliRunner()


def _list(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "urls.txt"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_get_exit_0_and_json_summary(server: TestServer, dest: Path, tmp_path: Path) -> None:
    urls = [server.add(f"/c{i}", b"c" * 100) for i in range(5)]
    res = runner.invoke(app, ["get", str(_list(tmp_path, urls)), "-o", str(dest), "--json",
                              "--quiet"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["ok"] == 5 and summary["bytes"] == 500 and summary["failed"] == 0


def test_get_exit_1_names_the_failed_url(server: TestServer, dest: Path, tmp_path: Path) -> None:
    good = server.add("/good", b"g")
    missing = server.url("/missing")
    res = runner.invoke(app, ["get", str(_list(tmp_path, [good, missing])), "-o", str(dest),
                              "--retries", "0"])
    assert res.exit_code == 1
    assert missing in res.stderr and "HTTP 404" in res.stderr
    assert "1 ok, 0 skipped, 1 failed" in res.stderr


def test_get_bad_list_exit_2_names_file_and_line(server: TestServer, dest: Path,
                                                 tmp_path: Path) -> None:
    lst = _list(tmp_path, [server.add("/a", b"a"), "not a url"])
    res = runner.invoke(app, ["get", str(lst), "-o", str(dest)])
    assert res.exit_code == 2
    assert "urls.txt:2" in res.stderr
    assert server.requests() == []


def test_bad_options_exit_2(tmp_path: Path) -> None:
    lst = _list(tmp_path, ["http://127.0.0.1:9/x"])
    res = runner.invoke(app, ["get", str(lst), "--threads", "0"])
    assert res.exit_code == 2 and "threads" in res.stderr
    res = runner.invoke(app, ["get", str(lst), "--on-exists", "explode"])
    assert res.exit_code == 2 and "on_exists" in res.stderr
    res = runner.invoke(app, ["get", str(tmp_path / "nope.txt")])
    assert res.exit_code == 2 and "not found" in res.stderr


def test_get_reads_stdin(server: TestServer, dest: Path) -> None:
    url = server.add("/stdin.txt", b"from stdin")
    res = runner.invoke(app, ["get", "-", "-o", str(dest), "--quiet"], input=url + "\n")
    assert res.exit_code == 0, res.output
    assert (dest / "stdin.txt").read_bytes() == b"from stdin"


def test_real_subprocess(server: TestServer, dest: Path, tmp_path: Path) -> None:
    urls = [server.add(f"/s{i}.bin", bytes([i]) * 2048) for i in range(20)]
    proc = subprocess.run(
        [sys.executable, "-m", "fetcher", "get", str(_list(tmp_path, urls)), "-o", str(dest),
         "--threads", "4", "--json"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] == 20
    assert "20 ok, 0 skipped, 0 failed" in proc.stderr
    assert all((dest / f"s{i}.bin").stat().st_size == 2048 for i in range(20))


def test_help_lists_the_commands() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for command in ("get", "process", "write"):
        assert command in res.stdout


_EMBEDDED = """\
import atexit, os, sys, threading, time
from pathlib import Path

marks = Path(sys.argv[1])
mode = sys.argv[2]
hard_exit = os._exit


def spied_exit(code: int) -> None:
    sys.stderr.write("no teardown\\n")
    sys.stderr.flush()
    hard_exit(code)


os._exit = spied_exit
if mode == "atexit":
    atexit.register(lambda: (marks / "atexit").write_text("ran"))
if mode == "thread":
    def late() -> None:
        time.sleep(0.3)
        (marks / "thread").write_text("ran")
    threading.Thread(target=late).start()
sys.argv = ["fetcher", "get", *sys.argv[3:]]
from fetcher._console import main  # what the console script runs
main()
"""


def test_the_console_exit_skips_teardown_only_when_nothing_needs_it(
        server: TestServer, tmp_path: Path) -> None:
    """The console entry point exits without the interpreter's teardown (a few ms of a
    short run) when no thread and no atexit callback could still need it; otherwise
    every callback runs and every thread finishes. Output is complete either way."""
    urls = [server.add(f"/x{i}.bin", bytes([i]) * 3000) for i in range(30)]
    lst = _list(tmp_path, urls)
    for mode in ("plain", "atexit", "thread"):
        marks = tmp_path / mode
        marks.mkdir()
        out = tmp_path / f"out-{mode}"
        proc = subprocess.run(
            [sys.executable, "-c", _EMBEDDED, str(marks), mode, str(lst), "-o", str(out),
             "--json"],
            capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["ok"] == 30  # flushed into the pipe
        assert "30 ok, 0 skipped, 0 failed" in proc.stderr
        assert ("no teardown" in proc.stderr) == (mode == "plain"), (mode, proc.stderr)
        assert sorted(p.name for p in marks.iterdir()) == ([] if mode == "plain" else [mode])
        assert len(list((out / ".fetcher").glob("manifest.jsonl"))) == 1
        lines = (out / ".fetcher" / "manifest.jsonl").read_text().splitlines()
        assert len(lines) == 30


def test_the_console_script_runs_with_stdout_or_stderr_closed(server: TestServer,
                                                              tmp_path: Path) -> None:
    """``fetcher get ... >&-`` (or ``2>&-``): Python starts with that stream None; what
    would go there is dropped and the command does its work and exits 0."""
    import os

    urls = [server.add(f"/z{i}.bin", bytes([i]) * 100) for i in range(5)]
    lst = _list(tmp_path, urls)
    for fd in (1, 2):
        out = tmp_path / f"out{fd}"
        proc = subprocess.run(
            [sys.executable, "-m", "fetcher", "get", str(lst), "-o", str(out), "--json"],
            preexec_fn=lambda fd=fd: os.close(fd), capture_output=False,
            stdin=subprocess.DEVNULL, timeout=60)
        assert proc.returncode == 0, fd
        assert sorted(p.name for p in out.glob("z*.bin")) == [f"z{i}.bin" for i in range(5)]
        assert len((out / ".fetcher" / "manifest.jsonl").read_text().splitlines()) == 5


def test_only_the_console_script_skips_teardown(server: TestServer, tmp_path: Path) -> None:
    """``fetcher.entry.main`` called from Python raises SystemExit to its caller, run
    after run; and ``python -m cProfile -m fetcher`` still gets to write its profile."""
    lst = _list(tmp_path, [server.add("/p.bin", b"p" * 100)])
    embed = ("import sys\n"
             "from fetcher.entry import main\n"
             "codes, (lst, out) = [], sys.argv[1:]\n"
             "for n in range(2):\n"
             "    sys.argv = ['fetcher', 'get', lst, '-o', f'{out}{n}', '-q']\n"
             "    try:\n        main()\n"
             "    except SystemExit as exc:\n        codes.append(exc.code)\n"
             "print('codes', codes)\n")
    proc = subprocess.run([sys.executable, "-c", embed, str(lst), str(tmp_path / "e")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "codes [0, 0]"
    assert (tmp_path / "e0" / "p.bin").exists() and (tmp_path / "e1" / "p.bin").exists()
    prof = tmp_path / "prof.out"
    proc = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "fetcher",
                           "get", str(lst), "-o", str(tmp_path / "c"), "-q"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert prof.stat().st_size > 0
