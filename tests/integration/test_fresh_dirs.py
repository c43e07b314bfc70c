"""``--on-exists`` where a run plans without an lstat: directories that are the run's
own (``RunContext.exists``, ``_classify``). Every entry there must be one the run knows:
its files (named apart by the name table) or the directories its items need. Three of
these cases were found in review: a file named like a directory the run made, a --post
function's output beside its input, and names equal but for case."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fetcher import Job, fetch
from tests.httpserver import TestServer


def _jobs(server: TestServer, names: list[str], sub: str = "") -> list[Job]:
    return [Job(server.add(f"/{sub}{n}", f"{sub}{n}".encode()), path=f"{sub}{n}")
            for n in names]


def _wait(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)


def _journaled(dest: Path, url: str) -> bool:
    path = dest / ".fetcher" / "manifest.jsonl"
    return path.exists() and any(json.loads(line).get("url") == url
                                 for line in path.read_text().splitlines() if line.strip())


@pytest.mark.parametrize("processes", [1, 2])
def test_only_directories_the_run_made_skip_the_lstat(server: TestServer, dest: Path,
                                                      processes: int) -> None:
    """``a`` and ``a/old`` already exist, and DEST holds a file: there every file keeps
    --on-exists, however many of the run's files went there before the foreign one's
    name; ``b/new`` (``b`` missing when first planned into) is the run's."""
    foreign = {"a/old/f9.bin": b"foreign old", "a/f9.bin": b"foreign a",
               "top9.bin": b"foreign top"}
    (dest / "a" / "old").mkdir(parents=True)
    for name, body in foreign.items():
        (dest / name).write_bytes(body)
    jobs = []
    for d in ("b/new", "a/old", "a", ""):
        for i in range(10):
            name = f"{d}/f{i}.bin" if d else f"top{i}.bin"
            jobs.append(Job(server.add(f"/{name}", name.encode()), path=name))
    report = fetch(jobs, dest, download_processes=processes, threads=4)
    assert report.ok, report.failures
    for name, body in foreign.items():
        assert (dest / name).read_bytes() == body
        renamed = name.replace("9.bin", "9.1.bin")
        assert (dest / renamed).read_bytes() == name.encode()
    for i in range(10):
        assert (dest / f"b/new/f{i}.bin").read_bytes() == f"b/new/f{i}.bin".encode()
    assert not list((dest / "b").rglob("*.1.bin"))


@pytest.mark.parametrize("sub", ["", "d/"])
@pytest.mark.parametrize("opts", [{"threads": 1}, {"threads": 1, "rate": 1000.0}],
                         ids=["loop", "pool"])
def test_a_file_named_like_a_directory_the_run_made_is_renamed(
        server: TestServer, dest: Path, sub: str, opts: dict[str, Any]) -> None:
    """``x`` makes the directory the run's; ``a/b`` then needs directory ``a``, a name
    the name table never claimed: ``a`` goes to ``a.1`` (--on-exists rename). (One
    connection: with more, ``a`` may be planned before ``a/b`` is published, and then
    whichever is published second fails, as it always has.)"""
    report = fetch(_jobs(server, ["x", "a/b", "a"], sub), dest, **opts)
    assert report.ok, report.failures
    assert (dest / f"{sub}a/b").read_bytes() == f"{sub}a/b".encode()
    assert (dest / f"{sub}a.1").read_bytes() == f"{sub}a".encode()


@pytest.mark.parametrize("opts", [{"threads": 1}, {"threads": 1, "rate": 1000.0}],
                         ids=["loop", "pool"])
def test_a_server_name_another_url_holds_is_not_written_over(server: TestServer, dest: Path,
                                                       opts: dict[str, Any]) -> None:
    """``U`` asked for ``x.bin`` once (an explicit path, held by ``V``: it got
    ``x.1.bin``); listed again without a path, the server names it ``x.bin`` too. The
    name table answers "a duplicate of U's request", but ``x.bin`` is V's: U gets a
    free variant, not V's name (review: before, only the lstat stood in the way)."""
    v = server.add("/other", b"V's file")
    u = server.add("/get", b"U's body",
                   headers={"Content-Disposition": 'attachment; filename="x.bin"'})
    report = fetch([Job(v, path="x.bin"), Job(u, path="x.bin"), Job(u)], dest,
                   content_disposition=True, **opts)
    assert report.ok, report.failures
    assert (dest / "x.bin").read_bytes() == b"V's file"
    assert sorted(p.name for p in dest.iterdir()) == [".fetcher", "x.1.bin", "x.2.bin",
                                                      "x.bin"]


def test_a_file_named_like_the_directory_of_an_owned_item_in_a_worker(
        server: TestServer, tmp_path: Path) -> None:
    """The manifest (shared with a run into another DEST) says ``U`` owns ``a/b``: the
    parent plans it without asking ``exists``, and a fan-out worker makes ``a``, which
    the parent never sees. ``a`` (another URL) must still be looked up and renamed
    ``a.1`` (review: it was planned with no lstat and failed on the directory)."""
    manifest = tmp_path / "m.jsonl"
    u = server.add("/ab", b"U's a/b")
    first = tmp_path / "first"
    assert fetch([Job(u, path="a/b")], first, manifest=manifest).ok
    dest = tmp_path / "second"
    slow = server.add("/slow", b"s" * 4000, slow_bps=2000)  # keeps the parent's connection
    v = server.add("/a", b"V's a")

    def jobs() -> Iterator[Job]:
        yield Job(slow, path="slow")
        yield Job(u, path="a/b")
        deadline = time.monotonic() + 10
        while not (dest / "a" / "b").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        yield Job(v, path="a")

    report = fetch(jobs(), dest, manifest=manifest, threads=2, download_processes=2)
    assert report.processes == 2
    assert report.ok, report.failures
    assert (dest / "a" / "b").read_bytes() == b"U's a/b"
    assert (dest / "a.1").read_bytes() == b"V's a"


@pytest.mark.parametrize("opts", [{"threads": 1}, {"threads": 1, "rate": 1000.0}],
                         ids=["loop", "pool"])
def test_directories_above_a_replaced_one_are_still_known(
        server: TestServer, dest: Path, opts: dict[str, Any]) -> None:
    """The run makes ``a/b/c``; something replaces it with a file, so the next item
    there fails (as it always did) and its directories are checked again. ``a/b`` is
    still the run's directory: a file ``a/b`` is renamed ``a/b.1``, not published onto
    it (review: forgetting them also forgot that they were the run's directories)."""
    first, second = server.add("/f1", b"f1"), server.add("/f2", b"f2")
    third = server.add("/ab", b"file a/b")

    def jobs() -> Iterator[Job]:
        yield Job(first, path="a/b/c/f1")
        _wait(lambda: (dest / "a/b/c/f1").exists())
        shutil.rmtree(dest / "a/b/c")
        (dest / "a/b/c").write_bytes(b"not a directory")
        yield Job(second, path="a/b/c/f2")
        _wait(lambda: _journaled(dest, second))
        yield Job(third, path="a/b")

    report = fetch(jobs(), dest, retries=0, **opts)
    by_url = {r.url: r for r in report.results}
    assert by_url[second].status == "failed"
    assert by_url[third].status == "ok", by_url[third].error
    assert (dest / "a/b.1").read_bytes() == b"file a/b"


@pytest.mark.parametrize("policy", ["rename", "skip"])
@pytest.mark.parametrize("opts", [{"threads": 1}, {"threads": 1, "rate": 1000.0}],
                         ids=["loop", "pool"])
def test_a_server_name_the_same_url_holds_does_not_replace_its_file(
        server: TestServer, dest: Path, opts: dict[str, Any], policy: str) -> None:
    """``U`` listed with the path ``x.bin``, then again without one; the server names it
    ``x.bin`` (Content-Disposition) and has changed meanwhile. ``x.bin`` is the first
    item's file, journaled with its digest: the second is renamed or skipped as
    --on-exists says (review: it was published over the first)."""
    u = server.add("/get", b"version 1", swap_after=1, swap_to=(b"version 2", '"v2"'),
                   headers={"Content-Disposition": 'attachment; filename="x.bin"'})

    def jobs() -> Iterator[Job]:
        yield Job(u, path="x.bin")
        _wait(lambda: _journaled(dest, u))
        yield Job(u)

    report = fetch(jobs(), dest, content_disposition=True, on_exists=policy, **opts)
    assert report.ok, report.failures
    assert (dest / "x.bin").read_bytes() == b"version 1"
    if policy == "rename":
        assert (dest / "x.1.bin").read_bytes() == b"version 2"


@pytest.mark.parametrize("policy", ["rename", "skip"])
def test_a_server_name_held_by_an_item_that_went_elsewhere_is_free(
        server: TestServer, dest: Path, policy: str) -> None:
    """Two URLs named ``c`` by their paths: the first takes ``c`` in the name table but
    its server renames it ``x.bin``; the second gets ``c.1``, and its server names it
    ``c``. Nothing is at ``c``: the second goes there, as before (differential fuzzing,
    helper-14: counting a held name as a file there skipped it)."""
    other = TestServer().start()
    try:
        first = server.add("/c", b"first",
                           headers={"Content-Disposition": 'attachment; filename="x.bin"'})
        second = other.add("/c", b"second",
                           headers={"Content-Disposition": 'attachment; filename="c"'})
        report = fetch([Job(first), Job(second)], dest, content_disposition=True,
                       on_exists=policy, threads=1, rate=1000.0)
    finally:
        other.stop()
    assert report.ok, report.failures
    assert (dest / "x.bin").read_bytes() == b"first"
    assert (dest / "c").read_bytes() == b"second"


def beside(path: Path, dest: Path) -> Path:
    """A --post function that writes its output next to its input."""
    out = Path(path).with_name(Path(path).name + ".sig")
    out.write_bytes(b"signature of " + Path(path).read_bytes())
    return out


def test_a_post_functions_output_is_not_replaced(server: TestServer, dest: Path) -> None:
    """A --post function (``package.module:function``) may write anywhere in DEST: a
    later item named like its output is renamed, not written over it."""
    first = Job(server.add("/f.txt", b"body"), path="f.txt")
    second = Job(server.add("/other", b"downloaded"), path="f.txt.sig")

    def jobs() -> Iterator[Job]:  # the second is planned once the first's output exists
        yield first
        deadline = time.monotonic() + 20
        while not (dest / "f.txt.sig").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        yield second

    report = fetch(jobs(), dest, threads=1, post=[f"{__name__}:beside"])
    assert report.ok, report.failures
    assert (dest / "f.txt.sig").read_bytes() == b"signature of body"
    assert (dest / "f.txt.1.sig").read_bytes() == b"downloaded"


def test_names_equal_but_for_case_on_a_case_insensitive_disk(server: TestServer) -> None:
    """``A.bin`` and ``a.bin`` are two names to the name table but one file on a file
    system that does not tell case apart (macOS, Windows; exFAT on Linux). Needs such a
    directory: FETCHER_CASELESS_DIR (e.g. an exFAT image mounted with exfat-fuse)."""
    root = os.environ.get("FETCHER_CASELESS_DIR")
    if not root:
        pytest.skip("set FETCHER_CASELESS_DIR to a directory on a case-insensitive disk")
    dest = Path(root) / f"out-{uuid.uuid4().hex[:8]}"
    dest.mkdir()
    report = fetch(_jobs(server, ["x.bin", "A.bin", "a.bin", "n/B.bin", "n/b.bin"]), dest,
                   threads=1)
    assert report.ok, report.failures
    for r in report.results:
        assert (dest / r.path).read_bytes() == r.url.split("/", 3)[3].encode()
