"""The ``fetcher`` command. Thin: parse, build config, call the library, render, exit.

Exit codes: 0 every item ok or skipped; 1 some item failed; 2 bad usage or bad input
(nothing downloaded); 130 interrupted.
"""

# No `from __future__ import annotations` here: typer would then eval() every
# option's annotation string at each start (~45 M instructions, ~14 ms).
import json
from pathlib import Path
from typing import Annotated

import typer

from .entry import EXIT_FAILED, die, err, main, render, run_get

__all__ = ["app", "main"]

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
    pipeline: Annotated[int, typer.Option(help="Requests sent ahead on one connection for small files (HTTP/1.1 pipelining; 1: off).")] = 1,
    expect_type: Annotated[str | None, typer.Option(help="Required Content-Type, e.g. 'image/*'.")] = None,
    header: Annotated[list[str] | None, typer.Option("-H", "--header", help="Extra header 'Name: value' (repeatable).")] = None,
    max_redirects: Annotated[int, typer.Option(help="Redirect hops to follow.")] = 10,
    insecure: Annotated[bool, typer.Option(help="Do not verify TLS certificates.")] = False,
    post: Annotated[list[str] | None, typer.Option(help="Post-process: NAME[:ARGS] or package.module:function (repeatable, chained).")] = None,
    processes: Annotated[int | None, typer.Option(help="Post-processing processes (default: CPU count).")] = None,
    download_processes: Annotated[int | None, typer.Option(help="Processes sharing the transfers of a long list (default: one per core when that pays; 1: this process only).")] = None,
    sink: Annotated[str | None, typer.Option(help="Also write every manifest record to this sink URL.")] = None,
    sink_table: Annotated[str, typer.Option(help="Table (or shard prefix) the sink writes to.")] = "downloads",
    cluster: Annotated[str | None, typer.Option(help="Dask scheduler address (tcp://host:8786): download and --post on its workers; DIR must be shared by all of them.")] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress bar or summary.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Download every URL of a list concurrently, with retries, resume and a manifest."""
    run_get(urls=urls, output=output, threads=threads, retries=retries, timeout=timeout,
            manifest=manifest, on_exists=on_exists, force=force,
            content_disposition=content_disposition, per_host=per_host, rate=rate,
            split=split, pipeline=pipeline, expect_type=expect_type, header=header,
            max_redirects=max_redirects, insecure=insecure, post=post, processes=processes,
            download_processes=download_processes, sink=sink, sink_table=sink_table,
            cluster=cluster, quiet=quiet, as_json=as_json)


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
        die(f"not a file: {', '.join(missing[:5])}")
    try:
        bar = TqdmProgress(disable=True if quiet else None)
        if cluster is not None:
            from .cluster import process_on_cluster

            report = process_on_cluster(paths, post, dest=output, address=cluster, progress=bar)
        else:
            report = process_paths(paths, post, dest=output, processes=processes, progress=bar)
    except ConfigError as exc:
        die(str(exc))
    raise typer.Exit(render(report, as_json=as_json, quiet=quiet, what="files processed"))


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
        die(f"input not found: {input}")
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
        die(str(exc))
    except SinkError as exc:
        die(str(exc), EXIT_FAILED)
    data = summary.as_dict()
    if as_json:
        typer.echo(json.dumps(data))
    if not quiet:
        err(", ".join(f"{k} {v}" for k, v in data.items()))


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
        die(str(exc))
    raise typer.Exit(code)
