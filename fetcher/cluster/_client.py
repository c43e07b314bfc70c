"""Connecting to a Dask cluster (``get_client``) and checking that its workers share DEST."""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..executors import usable_cpu_count

ClusterAddress = Any
"""A scheduler address (``"tcp://host:8786"``), a ``distributed.Client``, or None (the
process's default client if there is one, else a LocalCluster on this machine)."""

INSTALL_HINT = "pip install 'fetcher[dask]'"


def _distributed() -> Any:
    """``distributed``, imported on first use; ConfigError saying how to install it."""
    try:
        import distributed
    except ImportError as exc:
        raise ConfigError(f"Dask distributed is not installed; --cluster and mode='dask' "
                          f"need it: {INSTALL_HINT}") from exc
    return distributed


_LOCK = threading.Lock()
_CLIENTS: dict[tuple[str, int], tuple[Any, Any]] = {}  # key -> (client, owned LocalCluster)


def get_client(address: ClusterAddress = None, *, workers: int | None = None,
               timeout: float = 10.0) -> Any:
    """A ``distributed.Client`` for ``address``, kept open for the life of the process.

    ``address`` is a scheduler address (``"tcp://10.0.0.5:8786"``; a bare ``host:port``
    works too), an existing ``Client`` (used as is), or None: the process's default
    client if one exists, else a ``LocalCluster`` of ``workers`` single-threaded worker
    processes (default: the usable CPU count) on 127.0.0.1, started once. Raises
    ConfigError when Dask is missing, the scheduler cannot be reached, or no worker
    joins within ``timeout`` seconds.
    """
    distributed = _distributed()
    if isinstance(address, distributed.Client):
        return address
    if address is not None and not isinstance(address, str):
        raise ConfigError(f"cluster address must be a string or a distributed.Client, "
                          f"got {type(address).__name__}")
    if address is None:
        with contextlib.suppress(ValueError):
            return distributed.default_client()
    key = (address or "local", workers or 0)
    with _LOCK:
        got = _CLIENTS.get(key)
        if got is not None and got[0].status in ("running", "connecting", "newly-created"):
            return got[0]
        cluster = None
        try:
            if address is None:
                cluster = distributed.LocalCluster(
                    n_workers=workers or usable_cpu_count(), threads_per_worker=1,
                    processes=True, host="127.0.0.1", dashboard_address=":0")
                client = distributed.Client(cluster, set_as_default=False)
            else:
                client = _connect(distributed, address, timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            if cluster is not None:
                cluster.close()
            raise ConfigError(f"cannot reach the Dask scheduler at {address}: "
                              f"{type(exc).__name__}: {exc}") from None
        _CLIENTS[key] = (client, cluster)
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (TimeoutError, OSError) as exc:
        raise ConfigError(f"the Dask cluster at {address or 'local'} has no workers "
                          f"(waited {timeout:g} s): {exc}") from None
    return client


def _connect(distributed: Any, address: str, timeout: float) -> Any:
    """A Client of the scheduler at ``address``. distributed's handshake asserts that
    the scheduler's first answer is one message; now and then (seen once in a loaded CI
    run) the scheduler batches another with it, and the AssertionError says nothing
    about the cluster: connect again."""
    for _ in range(2):
        with contextlib.suppress(AssertionError):
            return distributed.Client(address, timeout=f"{timeout}s", set_as_default=False)
    return distributed.Client(address, timeout=f"{timeout}s", set_as_default=False)


def shutdown_clients() -> None:
    """Close every client (and LocalCluster) ``get_client`` opened (also run at exit)."""
    with _LOCK:
        items = list(_CLIENTS.values())
        _CLIENTS.clear()
    for client, cluster in items:
        with contextlib.suppress(Exception):
            client.close(timeout=5)
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close(timeout=5)


atexit.register(shutdown_clients)


def _worker_threads(client: Any) -> int:
    return max(1, int(sum(client.nthreads().values())))


def _probe(dest: str, marker: str, token: str, post: tuple[str, ...]) -> str | None:
    """Run on every worker: can it see the client's DEST and load the transforms?"""
    from .. import __version__

    try:
        found = (Path(dest) / marker).read_text(encoding="utf-8")
    except OSError as exc:
        return f"cannot read {dest}/{marker} ({exc.strerror or exc})"
    if found != token:
        return f"{dest} is a different directory there (not shared)"
    if not os.access(dest, os.W_OK):
        return f"{dest} is not writable there"
    if post:
        from ..transforms import parse_chain

        try:
            parse_chain(post)
        except Exception as exc:
            return f"--post: {exc}"
    return f"version:{__version__}"


def check_shared_dest(client: Any, dest: Path, post: Sequence[str] = ()) -> None:
    """Raise ConfigError unless every worker sees ``dest`` (same path, writable, the same
    directory as here) and can load the ``post`` transforms and this fetcher version."""
    from .. import __version__

    token = uuid.uuid4().hex
    marker = Path(".fetcher") / f"probe-{token}"
    (dest / ".fetcher").mkdir(parents=True, exist_ok=True)
    (dest / marker).write_text(token, encoding="utf-8")
    try:
        answers = client.run(_probe, str(dest), str(marker), token, tuple(post),
                             on_error="return")
    finally:
        with contextlib.suppress(OSError):
            (dest / marker).unlink()
    bad = []
    for worker, answer in sorted(answers.items()):
        if isinstance(answer, BaseException):
            bad.append(f"{worker}: {type(answer).__name__}: {answer} (is fetcher installed "
                       "there?)")
        elif answer != f"version:{__version__}":
            bad.append(f"{worker}: " + (f"fetcher {answer[8:]} there, {__version__} here"
                                        if str(answer).startswith("version:") else str(answer)))
    if bad:
        raise ConfigError(
            f"{len(bad)} of {len(answers)} Dask workers cannot work in {dest}: "
            + "; ".join(bad[:5]) + ". The directory must be on storage every worker mounts "
            "at the same path, and every worker needs the same fetcher installed.")
