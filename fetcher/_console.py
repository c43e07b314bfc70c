"""The console script's first module: it defers what a command never uses, before the
rest of fetcher (and the standard library modules it imports) is loaded, and it leaves
the process without the interpreter's teardown when nothing needs it
(``fetcher.entry.leave``).

Only the ``fetcher`` command and ``python -m fetcher`` start here; a library caller's
process, ``fetcher.entry.main`` called from Python included, is never touched.
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
from typing import Any


class _Deferred(types.ModuleType):
    """A module in ``sys.modules`` that imports itself on first attribute access."""

    _lock = threading.Lock()

    def __init__(self, name: str) -> None:
        super().__init__(name)
        del self.__dict__["__spec__"]  # answered by the property below, without importing

    @property
    def __spec__(self) -> Any:
        """Where the module is (found, not loaded): the import system reads it at every
        ``import`` of the name, and ``importlib.util.find_spec`` returns it."""
        spec = self.__dict__.get("_spec")
        if spec is None:
            import importlib.machinery

            spec = self.__dict__["_spec"] = importlib.machinery.PathFinder.find_spec(
                self.__name__)
        return spec

    @__spec__.setter
    def __spec__(self, spec: Any) -> None:
        self.__dict__["_spec"] = spec

    def __getattr__(self, attr: str) -> Any:
        name = self.__name__
        with _Deferred._lock:
            if sys.modules.get(name) is self:
                del sys.modules[name]
            real = importlib.import_module(name)
        self.__dict__.update(real.__dict__)  # later lookups through this stub hit these
        return getattr(real, attr)


def defer_unneeded() -> None:
    """Modules the standard library imports for code a run never calls, loaded on first
    use instead (the command owns its process).

    - inspect: dataclasses imports it (and with it ast, dis and tokenize: ~30 M
      instructions, ~10 ms, a sixth of a one-file run's start-up) but only calls it for
      a class without a docstring, and fetcher's all have one; typer uses it for --help.
    - ipaddress: urllib.parse (which pathlib imports) imports it to check ``[IPv6]``
      hosts: ~6 M instructions, 3% of a one-file run.
    """
    for name in ("inspect", "ipaddress"):
        if name not in sys.modules:
            sys.modules[name] = _Deferred(name)


def main() -> None:
    """Console entry point: ``fetcher ...`` (see ``fetcher.entry.main``), leaving
    through ``fetcher.entry.leave``."""
    defer_unneeded()
    from .entry import leave
    from .entry import main as command

    try:
        command()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            leave(exc.code or 0)
        raise
