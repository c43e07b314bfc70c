"""PostPipeline and process_paths on real worker processes."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from fetcher.errors import CancelledError, ConfigError, ProcessingError
from fetcher.progress import Progress
from fetcher.transforms import PostPipeline, process_paths

Image = pytest.importorskip("PIL.Image")

UPPER = "test_transform_helpers:upper_copy"


def write_texts(dest: Path, names: list[str]) -> None:
    for name in names:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_text(f"text of {name}")


def test_pipeline_runs_chains_in_processes(dest: Path) -> None:
    for i in range(6):
        Image.new("RGB", (400, 300), (i * 40, 0, 0)).save(dest / f"img{i}.jpg")
    with PostPipeline(["thumbnail:100", "sha256"], dest, processes=2) as pipe:
        futures = {i: pipe.submit(f"img{i}.jpg") for i in range(6)}
        outputs = {i: f.result(timeout=30) for i, f in futures.items()}
    for i, outs in outputs.items():
        assert outs == [f".fetcher/derived/thumbnail/img{i}.jpg",
                        f".fetcher/derived/thumbnail+sha256/img{i}.jpg.sha256"]
        with Image.open(dest / outs[0]) as thumb:
            assert thumb.size == (100, 75)


def test_a_failure_fails_only_its_item_and_keeps_the_input(dest: Path) -> None:
    write_texts(dest, ["good.txt"])
    (dest / "bad.jpg").write_text("not an image")
    with PostPipeline(["grayscale"], dest, processes=2) as pipe:
        bad = pipe.submit("bad.jpg")
        Image.new("RGB", (10, 10)).save(dest / "ok.jpg")
        ok = pipe.submit("ok.jpg")
    with pytest.raises(ProcessingError, match="not a JPEG/PNG") as info:
        bad.result()
    assert info.value.transform == "grayscale" and info.value.path == "bad.jpg"
    assert (dest / "bad.jpg").read_text() == "not an image"
    assert ok.result() == [".fetcher/derived/grayscale/ok.jpg"]


def test_a_killed_worker_becomes_a_processing_error_and_the_rest_go_on(dest: Path) -> None:
    names = ["a.txt", "poison.txt", "b.txt", "c.txt"]
    write_texts(dest, names)
    with PostPipeline(["test_transform_helpers:kill_on_poison"], dest, processes=2) as pipe:
        futures = {n: pipe.submit(n) for n in names}
    with pytest.raises(ProcessingError, match="SIGKILL") as info:
        futures["poison.txt"].result()
    assert info.value.path == "poison.txt"
    assert "kill_on_poison" in info.value.transform
    for n in ("a.txt", "b.txt", "c.txt"):
        assert futures[n].result() == [f".fetcher/derived/upper/{n}"]


def test_submit_blocks_when_max_pending_files_are_unfinished(dest: Path) -> None:
    names = [f"f{i}.txt" for i in range(4)]
    write_texts(dest, names)
    returned: list[float] = []
    with PostPipeline(["test_transform_helpers:slow_copy"], dest, processes=1,
                      max_pending=2) as pipe:
        t0 = time.monotonic()
        for n in names:
            pipe.submit(n)
            returned.append(time.monotonic() - t0)
    # two are accepted at once; the third waits for the first (0.3 s of work)
    assert returned[1] < 0.2
    assert returned[2] >= 0.25
    assert returned[3] >= 0.5


def test_submit_is_thread_safe(dest: Path) -> None:
    names = [f"t{i}/{j}.txt" for i in range(6) for j in range(5)]
    write_texts(dest, names)
    results: dict[str, Future[list[str]]] = {}
    lock = threading.Lock()
    with PostPipeline([UPPER], dest, processes=2, max_pending=3) as pipe:
        def producer(i: int) -> None:
            for j in range(5):
                fut = pipe.submit(f"t{i}/{j}.txt")
                with lock:
                    results[f"t{i}/{j}.txt"] = fut

        threads = [threading.Thread(target=producer, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 30
    for name, fut in results.items():
        assert fut.result() == [f".fetcher/derived/upper/{name}"]
        assert (dest / ".fetcher/derived/upper" / name).read_text() == f"TEXT OF {name}".upper()


def test_leaving_by_an_exception_stops_quickly_and_cancels(dest: Path) -> None:
    names = [f"s{i}.txt" for i in range(6)]
    write_texts(dest, names)
    futures: list[Future[list[str]]] = []
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt), \
            PostPipeline(["test_transform_helpers:slow_copy"], dest, processes=2,
                         max_pending=6) as pipe:
        futures = [pipe.submit(n) for n in names]
        raise KeyboardInterrupt
    assert time.monotonic() - t0 < 2
    assert all(f.done() for f in futures)
    assert any(isinstance(f.exception(), CancelledError) for f in futures)


def test_in_process_mode_for_debugging(dest: Path) -> None:
    write_texts(dest, ["x.txt"])
    with PostPipeline([UPPER], dest, processes=0) as pipe:
        assert pipe.submit("x.txt").result() == [".fetcher/derived/upper/x.txt"]


def test_bad_specs_fail_before_any_work(dest: Path) -> None:
    with pytest.raises(ConfigError):
        PostPipeline(["thumbnail:huge"], dest)
    with pytest.raises(ConfigError):
        process_paths([dest / "x"], ["nope"], dest=dest)


class Counting:
    def __init__(self) -> None:
        self.total: int | None = -1
        self.done = 0

    def start(self, total: int | None, *, unit: str = "file", desc: str = "") -> None:
        self.total = total

    def set_total(self, total: int) -> None:
        self.total = total

    def update(self, n: int = 1, *, nbytes: int = 0) -> None:
        self.done += n

    def close(self) -> None:
        pass


@pytest.mark.parametrize("processes", [0, 2])
def test_process_paths_reports_every_path(dest: Path, tmp_path: Path, processes: int) -> None:
    write_texts(dest, ["a.txt", "sub/b.txt"])
    outside = tmp_path / "elsewhere" / "c.txt"
    write_texts(outside.parent, ["c.txt"])
    (dest / "poison.txt").write_text("x")
    progress = Counting()
    assert isinstance(progress, Progress)
    paths = [dest / "a.txt", dest / "sub/b.txt", outside, dest / "missing.txt",
             dest / "poison.txt"]
    spec = "test_transform_helpers:kill_on_poison" if processes else UPPER
    report = process_paths(paths, [spec], dest=dest, processes=processes, progress=progress)
    by_url = {r.url: r for r in report.results}
    assert [r.url for r in report.results] == [str(p) for p in paths]
    assert by_url[str(dest / "a.txt")].outputs == [".fetcher/derived/upper/a.txt"]
    assert by_url[str(dest / "sub/b.txt")].outputs == [".fetcher/derived/upper/sub/b.txt"]
    assert by_url[str(dest / "sub/b.txt")].path == "sub/b.txt"
    assert by_url[str(outside)].outputs == [".fetcher/derived/upper/c.txt"]
    assert by_url[str(outside)].path == str(outside)
    missing = by_url[str(dest / "missing.txt")]
    assert missing.status == "failed" and missing.error_type == "ProcessingError"
    assert "no such file" in (missing.error or "")
    poisoned = by_url[str(dest / "poison.txt")]
    if processes:
        assert poisoned.status == "failed" and poisoned.error_type == "ProcessingError"
        assert "SIGKILL" in (poisoned.error or "")
    else:
        assert poisoned.status == "ok"
    assert report.counts["failed"] == (2 if processes else 1)
    assert not report.ok
    assert progress.total == 5 and progress.done == 5


def test_process_paths_defaults_to_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "n.txt").write_text("hi")
    report = process_paths(["n.txt"], [UPPER], processes=0)
    assert report.ok
    assert (tmp_path / ".fetcher/derived/upper/n.txt").read_text() == "HI"


def test_process_paths_refuses_name_clashes_outside_dest(dest: Path, tmp_path: Path) -> None:
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "same.txt").write_text(d)
    report = process_paths([tmp_path / "one/same.txt", tmp_path / "two/same.txt"], [UPPER],
                           dest=dest, processes=0)
    first, second = report.results
    assert first.status == "ok"
    assert second.status == "failed" and "same name" in (second.error or "")
    assert (dest / ".fetcher/derived/upper/same.txt").read_text() == "ONE"
