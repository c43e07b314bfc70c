"""The transform registry: ``--post`` specs, output naming, chains.

A spec is ``NAME[:ARGS]`` for a built-in transform (ARGS comma-separated, positional
or ``key=value``), or ``package.module:function`` for your own. Built-ins register
themselves with ``@register("name")``; a Transform instance is a plain picklable
object, called in a worker as ``transform(path, dest) -> list[Path]``.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import re
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ConfigError, ProcessingError

DERIVED = (".fetcher", "derived")
"""Outputs live under ``DEST/.fetcher/derived/<stage>/``."""

_REGISTRY: dict[str, type[Transform]] = {}


class Transform:
    """A named post-processing step: ``transform(path, dest) -> list[Path]``.

    Subclasses set ``name``, parse their arguments in ``__init__`` (raising
    ConfigError) and implement ``apply``. ``suffixes`` lists the file name endings a
    later stage of a chain picks up (None: every file).
    """

    name: ClassVar[str] = ""
    suffixes: ClassVar[tuple[str, ...] | None] = None
    positional: ClassVar[tuple[str, ...]] = ()
    """Names of positional arguments, in order."""

    def __init__(self, spec: str, args: dict[str, str]) -> None:
        self.spec = spec

    def __call__(self, path: Path, dest: Path) -> list[Path]:
        return self.apply(Path(path), Path(dest))

    def apply(self, path: Path, dest: Path) -> list[Path]:
        """Process ``path``; write outputs under ``dest``; return their paths."""
        raise NotImplementedError

    def accepts(self, path: Path) -> bool:
        """Whether a later chain stage should take ``path`` (by its name's ending)."""
        if self.suffixes is None:
            return True
        name = path.name.lower()
        return any(name.endswith(s) for s in self.suffixes)

    def __repr__(self) -> str:
        return f"<transform {self.spec}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Transform) and type(other) is type(self) \
            and other.spec == self.spec

    def __hash__(self) -> int:
        return hash((type(self), self.spec))


def register(name: str) -> Callable[[type[Transform]], type[Transform]]:
    """Class decorator: make a Transform available as ``--post name``."""

    def deco(cls: type[Transform]) -> type[Transform]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    """Names of the built-in transforms."""
    _load_builtins()
    return sorted(_REGISTRY)


def _load_builtins() -> None:
    from . import archive, digest, image  # noqa: F401  (they register on import)


# --------------------------------------------------------------------------- parsing


def _split_args(spec: str, cls: type[Transform], text: str) -> dict[str, str]:
    args: dict[str, str] = {}
    if not text:
        return args
    pos = 0
    for token in text.split(","):
        token = token.strip()
        if not token:
            continue
        if "=" in token:
            key, _, value = token.partition("=")
            args[key.strip().replace("-", "_")] = value.strip()
        else:
            if pos >= len(cls.positional):
                raise ConfigError(f"--post {spec}: unexpected argument {token!r}")
            args[cls.positional[pos]] = token
            pos += 1
    return args


def parse_post(spec: str) -> Transform:
    """Parse one ``--post`` spec into a Transform; ConfigError if it is not valid.

    ``NAME[:ARGS]`` names a built-in (see ``available()``); anything else with a colon
    is taken as ``package.module:function``, imported now so that a typo fails before
    any work starts.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("--post needs a transform name, e.g. --post thumbnail:256")
    spec = spec.strip()
    _load_builtins()
    name, _, text = spec.partition(":")
    cls = _REGISTRY.get(name.lower())
    if cls is not None:
        args = _split_args(spec, cls, text)
        transform = cls(spec, args)
        return transform
    if text and re.fullmatch(r"[A-Za-z_][\w.]*", name) and re.fullmatch(r"[A-Za-z_][\w.]*", text):
        return CustomTransform(spec)
    raise ConfigError(
        f"--post {spec}: unknown transform {name!r}; built-ins are {', '.join(available())}, "
        f"and your own is written package.module:function"
    )


def parse_chain(specs: Iterable[str | Transform]) -> tuple[Transform, ...]:
    """Parse every spec (or pass Transforms through); ConfigError on the first bad one."""
    chain = tuple(s if isinstance(s, Transform) else parse_post(s) for s in specs)
    if not chain:
        raise ConfigError("no --post transform given")
    return chain


def take(args: dict[str, str], spec: str, allowed: Sequence[str]) -> None:
    """Raise ConfigError if ``args`` has a key outside ``allowed``."""
    extra = sorted(set(args) - set(allowed))
    if extra:
        raise ConfigError(f"--post {spec}: unknown argument {extra[0]!r}"
                          f" (accepted: {', '.join(allowed) or 'none'})")


def parse_int(spec: str, key: str, value: str, *, minimum: int = 1) -> int:
    """An integer argument, with K/M/G (binary) suffixes allowed."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", value)
    if not m:
        raise ConfigError(f"--post {spec}: {key} must be a whole number, got {value!r}")
    n = int(m.group(1)) * int(1024 ** "_kmgt".index(m.group(2).lower() or "_"))
    if n < minimum:
        raise ConfigError(f"--post {spec}: {key} must be at least {minimum}, got {value!r}")
    return n


# --------------------------------------------------------------------------- custom


class CustomTransform(Transform):
    """``package.module:function``, called as ``fn(path, dest)``.

    The function may return a Path, an iterable of Paths, or None. Relative paths
    are taken relative to ``dest``; every returned path must exist inside ``dest``
    and must not be the input itself. ``derived_path(path, dest, name)`` gives the
    conventional place for an output.
    """

    name = "custom"

    def __init__(self, spec: str, args: dict[str, str] | None = None) -> None:
        super().__init__(spec, args or {})
        self.module, _, self.attr = spec.partition(":")
        self.stage = f"{self.module}.{self.attr}"
        resolve_callable(spec)

    def apply(self, path: Path, dest: Path) -> list[Path]:
        fn = resolve_callable(self.spec)
        got = fn(path, dest)
        if got is None:
            items: list[Any] = []
        elif isinstance(got, (str, os.PathLike)):
            items = [got]
        else:
            items = list(got)
        outs: list[Path] = []
        root = Path(os.path.abspath(dest))
        for item in items:
            p = Path(item)
            p = Path(os.path.abspath(root / p if not p.is_absolute() else p))
            if not p.is_relative_to(root):
                raise ProcessingError(f"returned {str(p)!r}, which is outside {root}",
                                      transform=self.spec, path=display_path(path, dest))
            if not p.exists():
                raise ProcessingError(f"returned {str(p)!r}, which does not exist",
                                      transform=self.spec, path=display_path(path, dest))
            if p == Path(os.path.abspath(path)):
                raise ProcessingError("returned its input as an output; write outputs "
                                      "elsewhere (see derived_path)",
                                      transform=self.spec, path=display_path(path, dest))
            outs.append(p)
        return outs


_RESOLVED: dict[str, Callable[..., Any]] = {}


def resolve_callable(spec: str) -> Callable[..., Any]:
    """Import ``package.module:function`` (dotted attributes allowed); ConfigError if not."""
    fn = _RESOLVED.get(spec)
    if fn is not None:
        return fn
    module, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module)
    except Exception as exc:  # ImportError and anything the module raises
        raise ConfigError(f"--post {spec}: cannot import {module!r}: "
                          f"{type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"--post {spec}: module {module!r} has no {attr!r}") from None
    if not callable(obj):
        raise ConfigError(f"--post {spec}: {attr!r} is not callable")
    _RESOLVED[spec] = obj
    return obj  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- outputs


def display_path(path: Path, dest: Path) -> str:
    """``path`` relative to ``dest`` when inside it, else as given (for messages)."""
    p = Path(os.path.abspath(path))
    root = Path(os.path.abspath(dest))
    return p.relative_to(root).as_posix() if p.is_relative_to(root) else str(path)


def derived_path(path: Path, dest: Path, stage: str, *, suffix: str | None = None,
                 append: str = "") -> Path:
    """Where a transform named ``stage`` puts its output for input ``path``.

    ``DEST/.fetcher/derived/<stage>/<path relative to DEST>``; an input outside DEST
    is named by its base name. An input that is itself an output of stage ``x``
    (``derived/x/<rel>``) goes to ``derived/x+<stage>/<rel>``, so a chain never
    writes over its own input. ``suffix`` replaces the last extension; ``append`` is
    added to the name.
    """
    p = Path(os.path.abspath(path))
    root = Path(os.path.abspath(dest))
    if p.is_relative_to(root):
        parts = p.relative_to(root).parts
        if parts[:2] == DERIVED and len(parts) > 3:
            stage = f"{parts[2]}+{stage}"
            parts = parts[3:]
    else:
        parts = (p.name,)
    out = root.joinpath(*DERIVED, stage, *parts)
    if suffix is not None:
        out = out.with_suffix(suffix)
    if append:
        out = out.with_name(out.name + append)
    if out == p:  # pragma: no cover - impossible by construction; belt and braces
        raise ProcessingError("output would overwrite the input", transform=stage,
                              path=display_path(path, dest))
    return out


@contextlib.contextmanager
def atomic_output(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it into place on success."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# --------------------------------------------------------------------------- chains


def run_chain(transforms: Sequence[str | Transform], path: str | os.PathLike[str],
              dest: str | os.PathLike[str]) -> list[str]:
    """Run a chain on one file; return every output, relative to ``dest``.

    ``path`` may be relative to ``dest``. The first transform gets the file; each later
    one gets every output of the one before that it ``accepts`` (by name ending;
    other outputs pass through untouched). Any failure raises ProcessingError naming
    the transform and the file; outputs already written stay.
    """
    chain = parse_chain(transforms)
    root = Path(os.path.abspath(dest))
    src = Path(path)
    if not src.is_absolute():
        src = root / src
    if not src.is_file():
        raise ProcessingError("no such file", transform=chain[0].spec,
                              path=display_path(src, root))
    current = [src]
    outputs: list[Path] = []
    for k, t in enumerate(chain):
        produced: list[Path] = []
        for p in current:
            if k > 0 and not t.accepts(p):
                continue
            produced.extend(_apply(t, p, root))
        outputs.extend(produced)
        current = produced
    return [display_path(o, root) for o in outputs]


def _apply(t: Transform, path: Path, root: Path) -> list[Path]:
    try:
        return list(t(path, root))
    except ProcessingError as exc:
        if not exc.traceback_text:
            exc.traceback_text = traceback.format_exc()
        raise
    except ConfigError as exc:
        raise ProcessingError(str(exc), transform=t.spec, path=display_path(path, root),
                              traceback_text=traceback.format_exc()) from exc
    except Exception as exc:
        raise ProcessingError(f"{type(exc).__name__}: {exc}", transform=t.spec,
                              path=display_path(path, root),
                              traceback_text=traceback.format_exc()) from exc


class ChainTask:
    """A picklable ``rel_path -> list[str]`` that runs a chain under ``dest``.

    ``nice`` lowers the priority of the worker process that runs it (once per process):
    post-processing beside downloads uses it, so that on a busy machine the scheduler
    serves the I/O threads first and the downloads keep their pace.
    """

    def __init__(self, chain: Sequence[Transform], dest: Path, *, nice: int = 0) -> None:
        self.chain = tuple(chain)
        self.dest = Path(os.path.abspath(dest))
        self.nice = nice

    def __call__(self, rel_path: str) -> list[str]:
        global _niced
        if self.nice and not _niced and multiprocessing.parent_process() is not None:
            _niced = True
            with contextlib.suppress(OSError):
                os.nice(self.nice)
        return run_chain(self.chain, rel_path, self.dest)


_niced = False
"""Whether this (worker) process has lowered its priority already."""
