"""The ``fetcher`` command. Thin: parse, build config, call the library, render, exit.

Exit codes: 0 every item ok or skipped; 1 some item failed; 2 bad usage or bad input
(nothing downloaded); 130 interrupted.
"""

# No `from __future__ import annotations` here: typer would then eval() every
# option's annotation string at each start (~45 M instructions, ~14 ms).
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from .models import Report

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

app = typer.Typer(
    name="fetcher",
    help="Concurrent downloads, post-processing on every core, parallel writes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: typer's rich formatting imports rich and markdown-it (~90 ms), a
    # third of the start-up budget, to draw boxes around the same text.
    rich_markup_mode=None,
)


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _die(message: str, code: int = EXIT_USAGE) -> NoReturn:
    _err(f"fetcher: error: {message}")
    raise typer.Exit(code)


def _parse_headers(values: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for value in values:
        name, sep, content = value.partition(":")
        if not sep or not name.strip():
            _die(f"--header {value!r}: expected 'Name: value'")
        headers[name.strip()] = content.strip()
    return headers


class _Interrupts:
    """First Ctrl-C: stop scheduling and wind down. Second: exit at once."""

    def __init__(self, cancel: threading.Event) -> None:
        self.cancel = cancel
        self._previous: Any = None

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.cancel.is_set():
            os._exit(EXIT_INTERRUPTED)
        self.cancel.set()
        _err("\nfetcher: interrupted; finishing the manifest (Ctrl-C again to quit now)")

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _render(report: "Report", *, as_json: bool, quiet: bool, what: str = "files") -> int:
    from .progress import human_bytes

    summary = report.summary()
    if as_json:
        typer.echo(json.dumps(summary))
    for shown, failure in enumerate(report.failures):
        if shown == 20:
            _err(f"  ... {report.counts['failed'] - 20} more failures in {report.manifest}")
            break
        _err(f"  FAILED {failure.url}: {failure.error_type}: {failure.error}")
    if report.stopped:
        _err(f"fetcher: stopped starting new items: {report.stopped}")
    if not quiet or report.failures:
        secs = summary["elapsed_s"]
        rate = human_bytes(report.bytes / secs) + "/s" if secs else "-"
        _err(f"{summary['ok']} ok, {summary['skipped']} skipped, {summary['failed']} failed "
             f"{what}; {human_bytes(report.bytes)} in {secs:.2f} s ({rate})"
             + (f"; manifest {report.manifest}" if report.manifest else ""))
    if report.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if report.ok else EXIT_FAILED


@app.command()
def get(
    urls: Annotated[str, typer.Argument(help="URL list file (text, .csv, .tsv, .jsonl) or - for stdin.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output directory.")] = Path("."),
    threads: Annotated[int, typer.Option(help="Concurrent transfers (connections).")] = 8,
    retries: Annotated[int, typer.Option(help="Retries per file after the first attempt.")] = 5,
    timeout: Annotated[float, typer.Option(help="Connect and read timeout, seconds.")] = 30.0,
    manifest: Annotated[Path | None, typer.Option(help="Manifest path (default DIR/.fetcher/manifest.jsonl).")] = None,
    on_exists: Annotated[str, typer.Option(help="A foreign file at the target: rename|skip|overwrite|error.")] = "rename",
    force: Annotated[bool, typer.Option(help="Download again what the manifest records as complete.")] = False,
    content_disposition: Annotated[bool, typer.Option(help="Name files from Content-Disposition (sanitised).")] = False,
    per_host: Annotated[int | None, typer.Option(help="Max connections per host (default: --threads).")] = None,
    rate: Annotated[float | None, typer.Option(help="Max requests per second per host.")] = None,
    split: Annotated[int, typer.Option(help="Segments per large file (Range requests).")] = 1,
    expect_type: Annotated[str | None, typer.Option(help="Required Content-Type, e.g. 'image/*'.")] = None,
    header: Annotated[list[str] | None, typer.Option("-H", "--header", help="Extra header 'Name: value' (repeatable).")] = None,
    max_redirects: Annotated[int, typer.Option(help="Redirect hops to follow.")] = 10,
    insecure: Annotated[bool, typer.Option(help="Do not verify TLS certificates.")] = False,
    post: Annotated[list[str] | None, typer.Option(help="Post-process: NAME[:ARGS] or package.module:function (repeatable, chained).")] = None,
    processes: Annotated[int | None, typer.Option(help="Post-processing processes (default: CPU count).")] = None,
    sink: Annotated[str | None, typer.Option(help="Also write every manifest record to this sink URL.")] = None,
    sink_table: Annotated[str, typer.Option(help="Table (or shard prefix) the sink writes to.")] = "downloads",
    cluster: Annotated[str | None, typer.Option(help="Dask scheduler address (tcp://host:8786): download and --post on its workers; DIR must be shared by all of them.")] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress bar or summary.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Download every URL of a list concurrently, with retries, resume and a manifest."""
    from .config import FetchConfig
    from .downloader import Fetcher
    from .errors import ConfigError, SinkError
    from .progress import TqdmProgress

    try:
        config = FetchConfig(
            threads=threads, retries=retries, timeout=timeout, manifest=manifest,
            on_exists=on_exists,  # type: ignore[arg-type]  # validated by FetchConfig
            force=force, content_disposition=content_disposition, per_host=per_host,
            rate=rate, split=split, expect_type=expect_type,
            headers=_parse_headers(header or []), max_redirects=max_redirects,
            verify=not insecure, keep_results=False,
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
        with _Interrupts(cancel):
            report = fetcher.run(urls, output, cancel=cancel)
    except (ConfigError, SinkError) as exc:  # a sink that cannot open: nothing downloaded
        _die(str(exc))
    raise typer.Exit(_render(report, as_json=as_json, quiet=quiet))


@app.command()
def process(
    paths: Annotated[list[Path], typer.Argument(help="Files to process.")],
    post: Annotated[list[str], typer.Option(help="NAME[:ARGS] or package.module:function (repeatable, chained).")],
    processes: Annotated[int | None, typer.Option(help="Worker processes (default: CPU count).")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory the outputs go under.")] = Path("."),
    cluster: Annotated[str | None, typer.Option(help="Dask scheduler address: run the transforms on its workers (paths and -o shared).")] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress bar or summary.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Run post-processing transforms over local files on a process pool."""
    from .errors import ConfigError
    from .progress import TqdmProgress
    from .transforms import process_paths

    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        _die(f"not a file: {', '.join(missing[:5])}")
    try:
        bar = TqdmProgress(disable=True if quiet else None)
        if cluster is not None:
            from .cluster import process_on_cluster

            report = process_on_cluster(paths, post, dest=output, address=cluster, progress=bar)
        else:
            report = process_paths(paths, post, dest=output, processes=processes, progress=bar)
    except ConfigError as exc:
        _die(str(exc))
    raise typer.Exit(_render(report, as_json=as_json, quiet=quiet, what="files processed"))


@app.command()
def write(
    input: Annotated[Path, typer.Argument(help="CSV, JSONL or Parquet file of records.")],
    sink_url: Annotated[str, typer.Argument(help="sqlite:///x.db, postgresql://..., file:///dir?format=...")],
    table: Annotated[str | None, typer.Option(help="Target table (default: the input's name).")] = None,
    workers: Annotated[int, typer.Option(help="Parallel writer connections.")] = 2,
    key: Annotated[str | None, typer.Option(help="Unique key column: replays upsert, never duplicate.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per batch (default: chosen per sink).")] = None,
    cluster: Annotated[str | None, typer.Option(help="Dask scheduler address: load on its workers, one file per task; INPUT may then be a directory of files.")] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress bar or summary.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Load records into a datastore in parallel, exactly once per batch."""
    from .errors import ConfigError, SinkError
    from .progress import TqdmProgress
    from .writers import load_file

    if not input.is_file() and not (cluster and input.is_dir()):
        _die(f"input not found: {input}")
    try:
        bar = TqdmProgress(disable=True if quiet else None)
        if cluster is not None:
            from .cluster import load_on_cluster

            summary = load_on_cluster(input, sink_url, address=cluster, table=table,
                                      workers=workers, key=key, batch_size=batch_size,
                                      progress=bar)
        else:
            summary = load_file(input, sink_url, table=table, workers=workers, key=key,
                                batch_size=batch_size, progress=bar)
    except ConfigError as exc:
        _die(str(exc))
    except SinkError as exc:
        _die(str(exc), EXIT_FAILED)
    data = summary.as_dict()
    if as_json:
        typer.echo(json.dumps(data))
    if not quiet:
        _err(", ".join(f"{k} {v}" for k, v in data.items()))


@app.command()
def demo(
    name: Annotated[str, typer.Argument(help="io | cpu | overhead | pipeline | all")] = "all",
    quick: Annotated[bool, typer.Option(help="Small sizes: 'all' finishes in under a minute.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Draw a chart: FILE.png (matplotlib) or FILE.html (plotly).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the measurements as JSON records.")] = False,
) -> None:
    """Measure I/O-bound and CPU-bound work sequentially, in threads and in processes."""
    from .demos import cli_demo
    from .errors import ConfigError

    try:
        code = cli_demo(name, quick=quick, plot=plot, as_json=as_json)
    except ConfigError as exc:
        _die(str(exc))
    raise typer.Exit(code)


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
