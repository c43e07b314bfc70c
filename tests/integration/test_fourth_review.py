"""Faults a fourth independent review found in ca59823 (the progress bar drawn late, from
a timer thread, since fixed) and 0f091dd (annotation-only typing imports under
TYPE_CHECKING, since reverted); each test failed before. Real components only; every
test under ~5 s."""

from __future__ import annotations

import dataclasses
import inspect
import io
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path

import pytest

from fetcher.progress import TqdmProgress

ROOT = Path(__file__).resolve().parents[2]


# 1 --------------------------------------------------------------------------------------
def test_a_bar_due_before_its_mininterval_shows_the_run_so_far() -> None:
    """The late bar "starts where the run is, without another update (a single large file
    may not end for minutes)". ``_draw`` replayed the count with ``bar.update(count)``,
    which tqdm draws only once ``mininterval`` has passed since its last print: with
    ``delay`` below ``mininterval`` (0.05 s vs 0.2 s) the bar appeared as "0/5 [00:00<?"
    with no bytes until the next item ended. It is now refreshed as it opens."""
    out = io.StringIO()
    bar = TqdmProgress(file=out, disable=False, delay=0.05)
    bar.start(5, unit="file", desc="fetch")
    bar.update(4, nbytes=4096)  # four small files; the fifth is large and still going
    try:
        deadline = time.monotonic() + 1.5
        while "4/5" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.02)
        shown = out.getvalue().replace("\r", "\n").strip()
        assert shown, "no bar at all"
        last = shown.splitlines()[-1]
        assert "4/5" in last and "4.0 KiB" in last, last
    finally:
        bar.close()


# 2 --------------------------------------------------------------------------------------
def test_closing_one_bar_from_two_threads_at_once_raises_nothing() -> None:
    """fetcher/progress.py says "Calls may come from any thread; implementations must be
    thread-safe". ``close`` read ``self._timer`` outside the lock, check then use: when
    one closer set it to None between another's check and its ``.cancel()`` /
    ``.join()``, that one raised AttributeError. It is now taken under the lock."""
    errors: list[BaseException] = []

    def close(bar: TqdmProgress) -> None:
        try:
            bar.close()
        except BaseException as exc:  # the failure under test
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the window is a few bytecodes
    try:
        end = time.monotonic() + 3.0
        while time.monotonic() < end and not errors:
            bar = TqdmProgress(file=io.StringIO(), disable=False, delay=0.001)
            bar.start(3)
            time.sleep(0.002)  # the timer has fired: close() has a thread to join
            closers = [threading.Thread(target=close, args=(bar,)) for _ in range(2)]
            for t in closers:
                t.start()
            for t in closers:
                t.join(5)
    finally:
        sys.setswitchinterval(old)
    assert not errors, repr(errors[0])


# 3 --------------------------------------------------------------------------------------
def _public_api() -> dict[str, object]:
    import fetcher

    return {"FetchConfig": fetcher.FetchConfig, "Result": fetcher.Result,
            "Report": fetcher.Report, "Job": fetcher.Job, "fetch": fetcher.fetch,
            "Fetcher.__init__": fetcher.Fetcher.__init__,
            "TqdmProgress.__init__": fetcher.TqdmProgress.__init__}


@pytest.mark.parametrize("name", list(_public_api()))
def test_the_type_hints_of_the_public_api_resolve(name: str) -> None:
    """0f091dd moved ``Any``, ``IO``, ``Literal``, the ``OnExists`` / ``Status`` /
    ``UrlSource`` aliases and ``Progress`` (in downloader.py) under ``TYPE_CHECKING``. The
    annotations still name them, so ``typing.get_type_hints`` -- what dataclass
    converters (cattrs, dacite, pydantic's TypeAdapter) do to build a FetchConfig from a
    YAML file, and ``inspect.signature(fetch, eval_str=True)`` -- raised NameError (e.g.
    "name 'OnExists' is not defined") on every public class and on fetch(). Reverted."""
    target = _public_api()[name]
    typing.get_type_hints(target)
    if dataclasses.is_dataclass(target):
        return
    inspect.signature(target, eval_str=True)  # type: ignore[arg-type]


# 4 --------------------------------------------------------------------------------------
_LISTING = r"""
import pydoc
import fetcher.progress as p

ns = {}
exec("from fetcher.progress import *", ns)
doc = pydoc.render_doc(p, renderer=pydoc.plaintext)
print("Progress" in dir(p), "Progress" in ns, "class Progress" in doc)
"""


def test_the_progress_module_still_lists_its_protocol() -> None:
    """With 0f091dd ``Progress`` existed in fetcher.progress only once something had asked
    for it (module ``__getattr__``): in a fresh interpreter it was missing from
    ``dir(fetcher.progress)``, from ``from fetcher.progress import *``, and from
    ``help(fetcher.progress)`` / pydoc / autodoc ``:members:``. Reverted."""
    done = subprocess.run([sys.executable, "-c", _LISTING], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, check=True)
    assert done.stdout.split() == ["True", "True", "True"], done.stdout


def test_the_source_of_the_progress_protocol_can_be_found() -> None:
    """With 0f091dd ``Progress.__module__`` said "fetcher.progress" while the class lived
    in _progress_protocol.py: ``inspect.getsource`` (IPython's ``Progress??``, sphinx's
    viewcode) raised OSError "could not find class definition". Reverted."""
    from fetcher.progress import Progress

    assert "class Progress" in inspect.getsource(Progress)
