"""``fetcher process --cluster`` and ``fetcher write --cluster``."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..models import Report
from ..progress import NullProgress, Progress
from ._client import ClusterAddress, _distributed, _worker_threads, check_shared_dest, get_client

if TYPE_CHECKING:
    from ..writers import WriteSummary

def process_on_cluster(paths: Sequence[str | os.PathLike[str]], specs: Sequence[str], *,
                       dest: str | os.PathLike[str] | None = None,
                       address: ClusterAddress = None,
                       progress: Progress | None = None) -> Report:
    """``fetcher process --cluster``: ``process_paths`` with the chains run on Dask workers.

    Same Results, in the same order, as ``transforms.process_paths``; every path and
    ``dest`` must be reachable at the same absolute path from every worker.
    """
    from ..transforms import parse_chain, process_paths

    parse_chain(specs)  # a bad spec is a usage error before the cluster is contacted
    root = Path(os.path.abspath(dest if dest is not None else os.getcwd()))
    client = get_client(address)
    check_shared_dest(client, root, specs)
    return process_paths(paths, specs, dest=root, progress=progress, address=client)


# --------------------------------------------------------------------------- write


def _load_one(path: str, sink_url: str, table: str, workers: int, key: str | None,
              batch_size: int | None) -> WriteSummary:
    """Worker side of ``fetcher write --cluster``: one input file, one exactly-once load."""
    from ..writers import load_file

    return load_file(Path(path), sink_url, table=table, workers=workers, key=key,
                     progress=None, batch_size=batch_size)


def _absolute_sink(url: str) -> str:
    """``sqlite:///relative.db`` names a file relative to *this* process: make it absolute."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        rest, sep, query = url[len(prefix):].partition("?")
        return prefix + os.path.abspath(rest) + sep + query
    return url


def load_on_cluster(input_path: str | os.PathLike[str], sink_url: str, *,
                    address: ClusterAddress = None, table: str | None = None,
                    workers: int = 2, key: str | None = None, batch_size: int | None = None,
                    progress: Progress | None = None) -> WriteSummary:
    """``fetcher write --cluster``: load files into a sink from Dask workers.

    ``input_path`` is one file or a directory of them (``.csv .tsv .jsonl .ndjson
    .parquet``, optionally ``.gz``; names starting with ``.`` or ``_`` are ignored).
    Each file is one ``load_file`` on a worker, with its own load id and ledger, so it
    is exactly once on its own and a load re-run after a lost worker continues after
    the batches it committed. The first file loads alone (it creates the table), the
    others then run in parallel, one per worker thread. ``table`` defaults to the file
    or directory name. Inputs and the sink must be reachable from every worker (a
    relative ``sqlite:///`` path is made absolute here). One file gains nothing but
    placement; the parallelism is across files.
    """
    from ..writers import WriteSummary, default_table, redact_url
    from ..writers.load import detect_format

    src = Path(os.path.abspath(input_path))
    if src.is_dir():
        files = []
        for p in sorted(src.iterdir()):
            if p.name.startswith((".", "_")) or not p.is_file():
                continue
            with contextlib.suppress(ConfigError):
                detect_format(p)
                files.append(p)
        if not files:
            raise ConfigError(f"{src}: no .csv, .tsv, .jsonl or .parquet files in it")
    elif src.is_file():
        detect_format(src)
        files = [src]
    else:
        raise ConfigError(f"input not found: {src}")
    table = table or default_table(src)
    sink_url = _absolute_sink(sink_url)
    client = get_client(address)
    prog: Progress = progress if progress is not None else NullProgress()
    prog.start(len(files), unit="file", desc=table)
    t0 = time.perf_counter()
    summaries: list[WriteSummary] = []
    try:
        def submit(p: Path) -> Any:
            return client.submit(_load_one, str(p), sink_url, table, workers, key, batch_size,
                                 pure=False, key=f"fetcher-write-{uuid.uuid4().hex}")

        summaries.append(submit(files[0]).result())
        prog.update(1)
        dist = _distributed()
        window = max(1, _worker_threads(client))
        rest = iter(files[1:])
        running = dist.as_completed([submit(p) for p in itertools.islice(rest, window)],
                                    loop=client.loop)
        for fut in running:
            summaries.append(fut.result())
            prog.update(1)
            nxt = next(rest, None)
            if nxt is not None:
                running.add(submit(nxt))
    finally:
        prog.close()
    first = summaries[0]
    return WriteSummary(
        rows=sum(s.rows for s in summaries), batches=sum(s.batches for s in summaries),
        skipped_batches=sum(s.skipped_batches for s in summaries),
        skipped_rows=sum(s.skipped_rows for s in summaries),
        seconds=time.perf_counter() - t0, workers=first.workers,
        sink=redact_url(sink_url), table=table,
        load_id=first.load_id if len(summaries) == 1 else f"{len(summaries)} loads")
