"""Dask distributed: ``parallel_map(mode="dask")`` and downloads spread over a cluster.

fetcher does not build a cluster of its own; it runs on Dask distributed, which is
imported only here and only when asked for (``pip install 'fetcher[dask]'``).

``parallel_map(fn, items, mode="dask", address=...)``
    ``_DaskBackend`` plugs into the executors driver, so chunking, the bounded window,
    ordering, per-item ``TaskError``\\ s with the worker's traceback and progress are the
    same as on the local backends. A chunk is one Dask task; at most two per worker
    thread are submitted at a time. A worker that dies mid-chunk: Dask runs the chunk
    again on another worker (items of that chunk that had finished run twice, their
    results are taken once). When Dask gives up on a chunk (``KilledWorker``), its
    items are retried one at a time, alone (Dask also fails tasks merely queued on a
    dying worker), and only an item that kills workers on its own gets a
    ``WorkerLostError``.

``fetch(urls, dest, cluster=ADDRESS)`` / ``fetcher get --cluster ADDRESS``
    The client reads and checks the list, names every item and applies the manifest's
    skip logic and ``--on-exists`` exactly as a local run does, then cuts the planned
    items into batches. Each batch is one Dask task: the worker downloads it with its
    own thread pool (``--threads`` per worker process, shared by the batches it runs,
    one keep-alive pool per thread) straight into DEST, which must be the same shared
    directory on every machine, runs ``--post`` there, and returns the Results. The
    client writes the manifest, feeds the sink and draws progress. At most two batches
    per worker thread are in flight.

Lost workers, and why nothing is duplicated or corrupted
    Dask re-runs a batch whose worker died on another worker. Every decision that could
    differ between two attempts (the name, ``--on-exists``) was made by the client
    before the batch left, so a second attempt downloads the same URLs to the same
    names. Each attempt streams into its own directory,
    ``DEST/.fetcher/partial/.b-<run>-<batch>-<attempt>/``, so two attempts (a worker
    declared dead that is in fact still running) never write into one partial file;
    publishing is ``os.replace`` of a complete, verified file, so the last attempt to
    finish leaves one whole copy. A resumable partial of an earlier run is claimed by
    ``rename`` (only one attempt can win it) and handed back when an item fails. The
    client records a batch once, from the one result Dask delivers, so each URL gets one
    manifest line. Workers also journal every published file in
    ``DEST/.fetcher/cluster/`` as it lands, so a client killed mid-run does not make the
    next run treat those files as foreign (and rename around them).

The package: ``_client`` (``get_client``, the shared-DEST check), ``_dask``
(``parallel_map(mode="dask")``), ``_run`` (the client side of a ``--cluster``
download), ``_worker`` (its worker side) and ``_commands`` (``process`` and ``write``).
"""

from __future__ import annotations

# Private names below are imported by the tests and bench/bench_cluster.py.
from ._client import INSTALL_HINT as INSTALL_HINT
from ._client import ClusterAddress, get_client, shutdown_clients
from ._client import check_shared_dest as check_shared_dest
from ._commands import load_on_cluster, process_on_cluster
from ._dask import open_backend as open_backend
from ._run import run_cluster as run_cluster
from ._worker import JOURNAL_DIR as JOURNAL_DIR
from ._worker import _end_run as _end_run
from ._worker import _run_batch as _run_batch
from ._worker import _Spec as _Spec

__all__ = [
    "ClusterAddress",
    "get_client",
    "load_on_cluster",
    "process_on_cluster",
    "shutdown_clients",
]
