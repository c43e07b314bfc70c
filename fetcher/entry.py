"""The console entry point, and what the commands share without importing typer.

typer (``cli.py``) defines the command line: every command, ``--help``, usage errors.
Importing it, with the click it vendors, costs about a third of a small run's start-up
(~85 M instructions, plus ~20 M to build the command from the signatures), so the
hot path, a well-formed ``fetcher get`` command line, is parsed here from
``GET_OPTIONS``, a table a test holds equal to typer's own parameters and whose
parses it compares with click's. Anything this parser is not certain of (help, an
unknown option, a value it would have to convert in a way click might not) goes to
typer, so errors and help always come from one place. Both paths end in ``run_get``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from .models import Report

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# dest, option names, kind, default. Kinds: str, int, float, path, flag (with a
# --no-NAME twin when named here with a "/"), list (repeatable str).
GET_OPTIONS: tuple[tuple[str, tuple[str, ...], str, Any], ...] = (
    ("output", ("-o", "--output"), "path", Path(".")),
    ("threads", ("--threads",), "int", 8),
    ("retries", ("--retries",), "int", 5),
    ("timeout", ("--timeout",), "float", 30.0),
    ("manifest", ("--manifest",), "path", None),
    ("on_exists", ("--on-exists",), "str", "rename"),
    ("force", ("--force/--no-force",), "flag", False),
    ("content_disposition", ("--content-disposition/--no-content-disposition",), "flag",
     False),
    ("per_host", ("--per-host",), "int", None),
    ("rate", ("--rate",), "float", None),
    ("split", ("--split",), "int", 1),
    ("pipeline", ("--pipeline",), "int", 1),
    ("expect_type", ("--expect-type",), "str", None),
    ("header", ("-H", "--header"), "list", None),
    ("max_redirects", ("--max-redirects",), "int", 10),
    ("insecure", ("--insecure/--no-insecure",), "flag", False),
    ("post", ("--post",), "list", None),
    ("processes", ("--processes",), "int", None),
    ("download_processes", ("--download-processes",), "int", None),
    ("sink", ("--sink",), "str", None),
    ("sink_table", ("--sink-table",), "str", "downloads"),
    ("cluster", ("--cluster",), "str", None),
    ("quiet", ("-q", "--quiet"), "flag", False),
    ("as_json", ("--json",), "flag", False),
)


def _option_index() -> dict[str, tuple[str, str, Any]]:
    index: dict[str, tuple[str, str, Any]] = {}
    for dest, names, kind, _ in GET_OPTIONS:
        for name in names:
            on, _, off = name.partition("/")
            index[on] = (dest, kind, True)
            if off:
                index[off] = (dest, kind, False)
    return index


def parse_get(args: list[str]) -> dict[str, Any] | None:
    """``fetcher get`` arguments as ``run_get`` keywords, or None to let typer decide."""
    index = _option_index()
    values: dict[str, Any] = {dest: default for dest, _, _, default in GET_OPTIONS}
    positional: list[str] = []
    it = iter(args)
    for arg in it:
        if arg == "--":
            positional.extend(it)
            break
        if arg[:1] != "-" or arg == "-":
            positional.append(arg)
            continue
        if arg[:2] == "--":
            name, eq, value = arg.partition("=")
        else:
            name, value = arg[:2], arg[2:]
            eq = "=" if value else ""
        found = index.get(name)
        if found is None:
            return None
        dest, kind, on = found
        if kind == "flag":
            if eq:
                return None
            values[dest] = on
            continue
        if not eq:
            following = next(it, None)
            if following is None or (following[:1] == "-" and following != "-"):
                return None  # click may read that differently: let it say
            value = following
        converted = _convert(kind, value)
        if converted is None:
            return None
        if kind == "list":
            values[dest] = [*(values[dest] or ()), converted]
        else:
            values[dest] = converted
    if len(positional) != 1:
        return None
    values["urls"] = positional[0]
    return values


def _convert(kind: str, value: str) -> Any:
    """What click would make of ``value``; None where that is not certain."""
    if not value:
        return None
    if kind in ("str", "list"):
        return value
    if kind == "path":  # click.Path(readable=True) refuses an existing unreadable one
        return Path(value) if not os.path.exists(value) or os.access(value, os.R_OK) \
            else None
    digits = value[1:] if value[0] == "-" else value
    if not digits.isascii():
        return None
    if kind == "int":
        return int(value) if digits.isdigit() else None
    whole, _, frac = digits.partition(".")
    if (whole + frac).isdigit():  # kind == "float": plain decimals only
        return float(value)
    return None


def err(message: str) -> None:
    """A line on stderr."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def die(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``fetcher: error: message`` and exit with ``code``."""
    err(f"fetcher: error: {message}")
    raise SystemExit(code)


def parse_headers(values: list[str]) -> dict[str, str]:
    """``-H 'Name: value'`` options as a dict; a malformed one is a usage error."""
    headers: dict[str, str] = {}
    for value in values:
        name, sep, content = value.partition(":")
        if not sep or not name.strip():
            die(f"--header {value!r}: expected 'Name: value'")
        headers[name.strip()] = content.strip()
    return headers


class Interrupts:
    """First Ctrl-C: stop scheduling and wind down. Second: exit at once."""

    def __init__(self, cancel: threading.Event) -> None:
        self.cancel = cancel
        self._previous: Any = None

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.cancel.is_set():
            os._exit(EXIT_INTERRUPTED)
        self.cancel.set()
        err("\nfetcher: interrupted; finishing the manifest (Ctrl-C again to quit now)")

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def render(report: Report, *, as_json: bool, quiet: bool, what: str = "files") -> int:
    """Print the summary (and up to 20 failures); return the exit code."""
    from .progress import human_bytes

    summary = report.summary()
    if as_json:
        import json

        sys.stdout.write(json.dumps(summary) + "\n")
        sys.stdout.flush()
    for shown, failure in enumerate(report.failures):
        if shown == 20:
            err(f"  ... {report.counts['failed'] - 20} more failures in {report.manifest}")
            break
        err(f"  FAILED {failure.url}: {failure.error_type}: {failure.error}")
    if report.stopped:
        err(f"fetcher: stopped starting new items: {report.stopped}")
    if not quiet or report.failures:
        secs = summary["elapsed_s"]
        rate = human_bytes(report.bytes / secs) + "/s" if secs else "-"
        err(f"{summary['ok']} ok, {summary['skipped']} skipped, {summary['failed']} failed "
            f"{what}; {human_bytes(report.bytes)} in {secs:.2f} s ({rate})"
            + (f"; manifest {report.manifest}" if report.manifest else ""))
    if report.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if report.ok else EXIT_FAILED


def run_get(*, urls: str, output: Path, threads: int, retries: int, timeout: float,
            manifest: Path | None, on_exists: str, force: bool, content_disposition: bool,
            per_host: int | None, rate: float | None, split: int, pipeline: int,
            expect_type: str | None,
            header: list[str] | None, max_redirects: int, insecure: bool,
            post: list[str] | None, processes: int | None, download_processes: int | None,
            sink: str | None, sink_table: str, cluster: str | None, quiet: bool,
            as_json: bool) -> NoReturn:
    """``fetcher get``: build the configuration, run, render, exit with the code."""
    from .config import FetchConfig
    from .downloader import Fetcher
    from .errors import ConfigError, SinkError
    from .progress import TqdmProgress

    try:
        config = FetchConfig(
            threads=threads, retries=retries, timeout=timeout, manifest=manifest,
            on_exists=on_exists,  # type: ignore[arg-type]  # validated by FetchConfig
            force=force, content_disposition=content_disposition, per_host=per_host,
            rate=rate, split=split, pipeline=pipeline, expect_type=expect_type,
            headers=parse_headers(header or []), max_redirects=max_redirects,
            verify=not insecure, keep_results=False, download_processes=download_processes,
        )
        fetcher = Fetcher(config, progress=TqdmProgress(disable=True if quiet else None),
                          post=post or (), processes=processes, sink=sink,
                          sink_table=sink_table, cluster=cluster)
        # Everything imported so far lives until exit: moved out of the collector's
        # sight, the cyclic GC's full passes stop re-walking it thousands of times
        # during a run of small files (~10% of the CPU of 2,000 x 10 KiB).
        import gc

        gc.freeze()
        cancel = threading.Event()
        with Interrupts(cancel):
            report = fetcher.run(urls, output, cancel=cancel)
    except (ConfigError, SinkError) as exc:  # a sink that cannot open: nothing downloaded
        die(str(exc))
    raise SystemExit(render(report, as_json=as_json, quiet=quiet))


def leave(code: int) -> NoReturn:
    """Exit the command's own process with ``code``, without the interpreter's teardown
    when nothing is left for it to do (the console script only: ``fetcher._console``).

    Tearing down ~80 modules (and the objects ``gc.freeze`` kept) costs a one-URL
    ``get`` ~5.6 M instructions, 3% of it. It is skipped only when it could do no more
    than free memory: no other thread is alive, no ``atexit`` callback is registered
    (multiprocessing's, a coverage tool's, an embedding script's), no profiler or tracer
    (``python -m cProfile``, pdb, trace) is waiting to report, and the standard streams
    flush cleanly. Otherwise the process exits the ordinary way.
    """
    import atexit

    pending = getattr(atexit, "_ncallbacks", None)
    if pending is not None and pending() == 0 and threading.active_count() == 1 \
            and sys.getprofile() is None and sys.gettrace() is None \
            and not sys.flags.inspect:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass
        else:
            os._exit(code)
    raise SystemExit(code)


def main() -> None:
    """Console entry point: ``fetcher ...``."""
    # Started with stdout or stderr closed (``>&-``), Python leaves it None: what would
    # go there is dropped, as with /dev/null, rather than failing the command.
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115
    _command(sys.argv[1:])


def _command(args: list[str]) -> None:
    try:
        if args[:1] == ["get"]:
            options = parse_get(args[1:])
            if options is not None:
                run_get(**options)
        from .cli import app

        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:  # `fetcher get ... --json | head`: as click does, quietly
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        sys.exit(EXIT_FAILED)
