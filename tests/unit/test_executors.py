"""parallel_map / parallel_imap / TaskPool: the same tests on every backend (joblib-style).

No sockets. Process-mode tests share the warm pool that parallel_map keeps, so each
test pays for worker start-up at most once per worker count.
"""

from __future__ import annotations

import itertools
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_exec_helpers import (
    Unpicklable,
    exit_at_once,
    fail_first_then_slow,
    fail_on_sevens,
    jitter_square,
    kill_every_tenth,
    kill_on,
    pid_of,
    raise_unpicklable,
    sleep_briefly,
    slow_first,
    square,
    unpicklable_result,
)

from fetcher import executors
from fetcher.errors import ConfigError, TaskError, WorkerLostError
from fetcher.executors import (
    RemoteError,
    TaskPool,
    parallel_imap,
    parallel_map,
    start_method,
    usable_cpu_count,
)
from tests.procutil import alive, descendants

MODES = ["sequential", "thread", "process"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class RecordingProgress:
    """A Progress that remembers every call."""

    def __init__(self) -> None:
        self.started: list[tuple[int | None, str]] = []
        self.totals: list[int] = []
        self.done = 0
        self.closed = 0
        self.lock = threading.Lock()

    def start(self, total: int | None, *, unit: str = "file", desc: str = "") -> None:
        self.started.append((total, unit))

    def set_total(self, total: int) -> None:
        self.totals.append(total)

    def update(self, n: int = 1, *, nbytes: int = 0) -> None:
        with self.lock:
            self.done += n

    def close(self) -> None:
        self.closed += 1


# --------------------------------------------------------------------------- results


def test_results_come_back_in_input_order(mode: str) -> None:
    assert parallel_map(jitter_square, range(500), mode=mode, workers=2) == \
        [x * x for x in range(500)]


@pytest.mark.parametrize("chunksize", [1, 7, "auto"])
def test_chunksize_does_not_change_results(mode: str, chunksize: Any) -> None:
    items = list(range(103))
    assert parallel_map(square, items, mode=mode, workers=2, chunksize=chunksize) == \
        [x * x for x in items]


def test_unordered_yields_as_completed(mode: str) -> None:
    out = parallel_map(slow_first, range(6), mode=mode, workers=2, chunksize=1,
                       ordered=False)
    assert sorted(out) == list(range(6))
    if mode != "sequential":  # item 0 sleeps while the other worker finishes the rest
        assert out[0] != 0
        assert out[-1] == 0


def test_empty_input(mode: str) -> None:
    progress = RecordingProgress()
    assert parallel_map(square, [], mode=mode, progress=progress) == []
    assert progress.started == [(0, "item")] and progress.closed == 1


@settings(max_examples=25, deadline=None)
@given(items=st.lists(st.integers(-10**6, 10**6), max_size=60),
       chunksize=st.one_of(st.just("auto"), st.integers(1, 9)),
       which=st.sampled_from(MODES))
def test_matches_builtin_map(items: list[int], chunksize: Any, which: str) -> None:
    assert parallel_map(square, items, mode=which, workers=2, chunksize=chunksize) == \
        list(map(square, items))


# --------------------------------------------------------------------------- laziness


def test_infinite_generator_is_consumed_lazily(mode: str) -> None:
    pulled = 0

    def numbers() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled = i + 1
            yield i

    it = parallel_imap(square, numbers(), mode=mode, workers=2, chunksize=4)
    first = list(itertools.islice(it, 10))
    assert first == [x * x for x in range(10)]
    # at most the window (4 * workers chunks of 4) beyond what was returned
    assert pulled <= 10 + 4 * 2 * 4 + 4
    it.close()


def test_auto_chunking_with_an_infinite_generator(mode: str) -> None:
    it = parallel_imap(square, itertools.count(), mode=mode, workers=2)
    assert list(itertools.islice(it, 20_000))[-1] == 19_999 ** 2


def test_imap_starts_no_work_until_iterated(mode: str) -> None:
    pulled = []

    def numbers() -> Iterator[int]:
        pulled.append(1)
        yield 1

    it = parallel_imap(square, numbers(), mode=mode)
    time.sleep(0.05)
    assert pulled == []
    assert list(it) == [1]


def test_progress_counts_items_for_an_unsized_input(mode: str) -> None:
    progress = RecordingProgress()
    out = parallel_map(square, (i for i in range(1000)), mode=mode, workers=2,
                       progress=progress)
    assert len(out) == 1000
    assert progress.started == [(None, "item")]
    assert progress.done == 1000
    assert progress.totals == [1000]
    assert progress.closed == 1


def test_progress_total_for_a_sized_input(mode: str) -> None:
    progress = RecordingProgress()
    parallel_map(square, list(range(300)), mode=mode, progress=progress)
    assert progress.started == [(300, "item")]
    assert progress.done == 300 and progress.totals == []


# --------------------------------------------------------------------------- errors


def test_collect_returns_task_errors_with_original_type_and_traceback(mode: str) -> None:
    out = parallel_map(fail_on_sevens, range(30), mode=mode, workers=2)
    for i, value in enumerate(out):
        if i % 7:
            assert value == i
            continue
        assert isinstance(value, TaskError) and not isinstance(value, WorkerLostError)
        assert value.index == i and value.item == i
        assert isinstance(value.original, ValueError)
        assert str(value.original) == f"seven divides {i}"
        assert "fail_on_sevens" in value.traceback_text
        assert "ValueError: seven divides" in value.traceback_text
        assert f"item {i} " in str(value)
    roundtrip = pickle.loads(pickle.dumps(out[7]))
    assert isinstance(roundtrip, TaskError) and roundtrip.index == 7


def test_raise_reraises_the_original_type_with_a_note(mode: str) -> None:
    with pytest.raises(ValueError, match="seven divides") as info:
        parallel_map(fail_on_sevens, range(30), mode=mode, workers=2, on_error="raise")
    # The first failure to arrive: with two workers, item 7's chunk may beat item 0's.
    failed = int(str(info.value).rsplit(" ", 1)[1])
    assert failed % 7 == 0
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert f"item {failed} ({failed})" in notes
    if mode == "process":  # the worker's traceback travels in the note
        assert "fail_on_sevens" in notes


def test_raise_stops_promptly_and_cancels_what_has_not_started(mode: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(KeyError):
        parallel_map(fail_first_then_slow, range(200), mode=mode, workers=2, chunksize=1,
                     on_error="raise")
    # running everything would take 200 * 0.05 / 2 = 5 s
    assert time.monotonic() - t0 < 1.5


def test_unpicklable_exception_is_reported_by_type_name(mode: str) -> None:
    out = parallel_map(raise_unpicklable, range(3), mode=mode)
    err = out[1]
    assert isinstance(err, TaskError)
    if mode == "process":
        assert isinstance(err.original, RemoteError)
        assert err.original.type_name.endswith("Unpicklable")
    else:
        assert isinstance(err.original, Unpicklable)
    assert out[0] == 0 and out[2] == 2


def test_a_failing_input_iterator_propagates(mode: str) -> None:
    def broken() -> Iterator[int]:
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        parallel_map(square, broken(), mode=mode)


# --------------------------------------------------------------------------- process-only


def test_unpicklable_items_and_results_fail_only_their_item() -> None:
    out = parallel_map(unpicklable_result, range(4), mode="process", workers=2)
    assert out[0] == 0 and out[1] == 1 and out[3] == 3
    assert isinstance(out[2], TaskError) and "cannot be pickled" in str(out[2])
    items: list[Any] = [1, threading.Lock(), 3]
    out = parallel_map(str, items, mode="process")
    assert out[0] == "1" and out[2] == "3"
    assert isinstance(out[1], TaskError) and isinstance(out[1].original, TypeError)


def test_sigkilled_worker_is_reported_with_its_item_and_the_pool_goes_on() -> None:
    t0 = time.monotonic()
    out = parallel_map(kill_on, range(40), mode="process", workers=2, chunksize=5)
    assert time.monotonic() - t0 < 10
    for i, value in enumerate(out):
        if i in (13, 31):
            assert isinstance(value, WorkerLostError)
            assert value.item == i and value.index == i
            assert "SIGKILL" in str(value)
        else:
            assert value == i + 1000
    # the pool replaced its workers and still works
    assert parallel_map(square, range(10), mode="process", workers=2) == \
        [x * x for x in range(10)]


def test_many_killed_workers_never_hang() -> None:
    out = parallel_map(kill_every_tenth, range(60), mode="process", workers=2)
    lost = [i for i, v in enumerate(out) if isinstance(v, WorkerLostError)]
    assert lost == [i for i in range(60) if i % 10 == 5]
    assert all(out[i] == i for i in range(60) if i % 10 != 5)


def test_killed_worker_raises_worker_lost_in_raise_mode() -> None:
    with pytest.raises(WorkerLostError, match="SIGKILL") as info:
        parallel_map(kill_on, range(20), mode="process", workers=2, on_error="raise")
    assert info.value.item == 13


def test_lambda_and_local_functions_work_or_fail_clearly(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    offset = 5

    def local(x: int) -> int:
        return x + offset

    if executors._callables._cloudpickle() is not None:
        assert parallel_map(lambda x: x * 2, range(4), mode="process") == [0, 2, 4, 6]
        assert parallel_map(local, range(3), mode="process") == [5, 6, 7]
    monkeypatch.setattr(executors._callables, "_cloudpickle", lambda: None)
    with pytest.raises(ConfigError, match="cannot be sent to worker processes") as info:
        parallel_map(local, range(3), mode="process")
    assert "module top level" in str(info.value) and "mode='thread'" in str(info.value)
    assert "local" in str(info.value)
    assert parallel_map(local, range(3), mode="thread") == [5, 6, 7]


def test_workers_default_to_usable_cpus_and_method_is_explicit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    n = usable_cpu_count()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    pids = set(parallel_map(pid_of, range(200), mode="process", chunksize=1))
    assert os.getpid() not in pids and len(pids) <= n
    assert start_method() in ("forkserver", "spawn")
    monkeypatch.setenv("FETCHER_START_METHOD", "spawn")
    assert start_method() == "spawn"
    monkeypatch.setenv("FETCHER_START_METHOD", "bogus")
    with pytest.raises(ConfigError):
        start_method()


def test_workers_that_cannot_start_give_a_clear_error(monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    monkeypatch.setattr(executors._worker, "_worker_main", exit_at_once)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="die while starting"):
        parallel_map(square, range(10), mode="process", workers=3)
    assert time.monotonic() - t0 < 10
    pool: TaskPool[int, int] = TaskPool(square, mode="process", workers=1)
    first = pool.submit(1)
    with pytest.raises(ConfigError, match="die while starting"):
        first.result(timeout=10)
    with pytest.raises(RuntimeError, match="failed"):
        pool.submit(2)
    pool.close()


def test_early_close_of_imap_leaves_the_pool_usable() -> None:
    it = parallel_imap(sleep_briefly, range(100), mode="process", workers=2, chunksize=1)
    assert next(it) == 0
    it.close()
    t0 = time.monotonic()
    assert parallel_map(square, range(5), mode="process", workers=2) == [0, 1, 4, 9, 16]
    assert time.monotonic() - t0 < 2


@pytest.mark.parametrize("kwargs", [
    {"mode": "bogus"}, {"chunksize": 0}, {"chunksize": "big"}, {"workers": 0},
    {"on_error": "ignore"},
])
def test_bad_options_are_config_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        parallel_map(square, [1], **kwargs)
    with pytest.raises(ConfigError):
        parallel_imap(square, [1], **kwargs)


CTRL_C_SCRIPT = """
import os, sys, time
from fetcher.executors import parallel_map

def slow(x):
    sys.stdout.write(f"started {os.getpid()}\\n")  # one write: threads do not interleave
    sys.stdout.flush()
    time.sleep(60)
    return x

if __name__ == "__main__":
    parallel_map(slow, range(10), mode=sys.argv[1], workers=2, chunksize=1)
"""


@pytest.mark.parametrize("which", ["process", "thread"])
def test_ctrl_c_leaves_no_child_process(tmp_path: Path, which: str) -> None:
    script = tmp_path / "ctrl_c.py"
    script.write_text(textwrap.dedent(CTRL_C_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), which], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        for _ in range(2):  # both workers are inside an item
            assert proc.stdout.readline().startswith("started")
        kids = descendants(proc.pid)
        if which == "process":
            assert len(kids) >= 2
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=3)
        while any(alive(k) for k in kids) and time.monotonic() - t0 < 3:
            time.sleep(0.02)
        elapsed = time.monotonic() - t0
        assert not [k for k in kids if alive(k)]
        assert elapsed < 2.0
        assert proc.returncode in (-signal.SIGINT, 130, 1)
        assert "KeyboardInterrupt" in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_workers_exit_when_the_parent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(CTRL_C_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), "process"], stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None
    for _ in range(2):
        assert proc.stdout.readline().startswith("started")
    kids = descendants(proc.pid)
    proc.kill()  # no cleanup code runs in the parent
    proc.wait()
    deadline = time.monotonic() + 3
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [k for k in kids if alive(k)]


# --------------------------------------------------------------------------- TaskPool


def test_taskpool_futures(mode: str) -> None:
    with TaskPool(fail_on_sevens, mode=mode, workers=2) as pool:  # type: ignore[arg-type]
        futures = [pool.submit(i) for i in range(1, 16)]
        results = [f.exception() or f.result() for f in futures]
    assert results[0] == 1
    assert isinstance(results[6], ValueError)  # item 7
    assert isinstance(results[13], ValueError)  # item 14
    assert results[14] == 15


def test_taskpool_blocks_submit_when_max_pending_unfinished() -> None:
    pool: TaskPool[int, int] = TaskPool(sleep_briefly, mode="thread", workers=1,
                                        max_pending=2)
    returned: list[float] = []
    t0 = time.monotonic()

    def producer() -> None:
        for i in range(4):
            pool.submit(i)
            returned.append(time.monotonic() - t0)

    th = threading.Thread(target=producer)
    th.start()
    th.join(5)
    pool.close()
    assert len(returned) == 4
    assert returned[1] < 0.1  # two fit at once
    assert returned[2] >= 0.15  # the third waited for the first to finish


def test_taskpool_reports_killed_worker_and_goes_on() -> None:
    with TaskPool(kill_on, mode="process", workers=2) as pool:
        futures = {i: pool.submit(i) for i in range(10, 16)}
    with pytest.raises(WorkerLostError, match="SIGKILL"):
        futures[13].result()
    assert [futures[i].result() for i in (10, 11, 12, 14, 15)] == [1010, 1011, 1012, 1014,
                                                                   1015]


def test_taskpool_exit_by_exception_terminates_quickly() -> None:
    t0 = time.monotonic()
    with pytest.raises(RuntimeError), TaskPool(sleep_briefly, mode="process",
                                               workers=2) as pool:
        futures = [pool.submit(i) for i in range(4)]
        raise RuntimeError("stop")
    assert time.monotonic() - t0 < 2
    assert all(f.done() for f in futures)
