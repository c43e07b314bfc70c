"""Sending functions to worker processes, and an unimportable ``__main__`` while they start."""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import ConfigError
from ._common import _PICKLE, _describe


def _cloudpickle() -> Any:
    try:
        import cloudpickle  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError:
        return None
    return cloudpickle


def _dump_callable(fn: Callable[..., Any]) -> bytes:
    """Pickle ``fn`` for worker processes, or raise a ConfigError that says what to do."""
    if not callable(fn):
        raise ConfigError(f"parallel_map needs a callable, got {type(fn).__name__}")
    in_unimportable_main = (getattr(fn, "__module__", None) == "__main__"
                            and not _main_is_importable())
    problem: BaseException | None = None
    if not in_unimportable_main:
        try:
            return pickle.dumps(fn, _PICKLE)
        except Exception as exc:  # PicklingError, AttributeError, TypeError
            problem = exc
    cp = _cloudpickle()
    if cp is not None:
        try:
            return bytes(cp.dumps(fn, _PICKLE))
        except Exception as exc:
            problem = exc
    why = f" ({type(problem).__name__}: {problem})" if problem is not None else \
        " (it lives in an interactive __main__ that workers cannot import)"
    hint = "" if cp is not None else ", or install cloudpickle"
    raise ConfigError(
        f"{_describe(fn)} cannot be sent to worker processes{why}: define it at module "
        f"top level, or use mode='thread'{hint}"
    ) from None


def _main_is_importable() -> bool:
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    path = getattr(main, "__file__", None)
    return spec_name is not None or (path is not None and os.path.isfile(path))


_START_LOCK = threading.Lock()


@contextlib.contextmanager
def _hide_unimportable_main() -> Iterator[None]:
    """Workers re-import the parent's ``__main__`` from its file; with ``python -``
    (``__file__ == "<stdin>"``) that fails and every worker dies while booting. Hide
    such a name while a worker starts, as if run with ``-c``."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or _main_is_importable():
        yield
        return
    with _START_LOCK:
        del main.__file__  # type: ignore[union-attr]
        try:
            yield
        finally:
            main.__file__ = path  # type: ignore[union-attr]
