"""``parallel_map`` / ``parallel_imap`` over sequential, thread and process backends.

One driver, three backends (``mode``):

``"process"``  worker processes started explicitly with ``forkserver`` where the
               platform has it (safe when the parent runs threads; Python 3.14's
               default on Linux), else ``spawn``. Override with the environment
               variable ``FETCHER_START_METHOD``. The pool is pre-warmed and reused
               between calls (one idle pool per worker count; ``shutdown_pools()``
               or interpreter exit stops it).
``"thread"``   daemon threads (so Ctrl-C never waits for them); for I/O-bound or
               GIL-releasing work.
``"sequential"`` runs in the calling thread; for debugging and tiny inputs.
``"dask"``     each chunk is a task on a Dask cluster (``address=`` a scheduler address
               or a ``distributed.Client``; None: a LocalCluster); ``fetcher.cluster``.

Behaviour common to every backend:

* Input is consumed lazily: chunks are cut from the iterator only when a worker is
  free, fewer than ``4 * workers`` chunks are open (dispatched, not yet returned)
  and fewer than 524,288 items are open, so an infinite generator works and memory
  stays flat (about 40 MiB for small items, whatever the input's length).
* ``chunksize="auto"`` starts at one item per chunk and, from the worker-measured
  time per item, grows (at most doubling per finished chunk) towards chunks of
  about 20 ms, capped at 65,536 items (less with many workers, so each can have two
  chunks within the open-item bound). Tiny tasks then cost well under a microsecond
  of overhead each; slow tasks stay one per chunk.
* ``ordered=True`` yields results in input order; ``False`` as chunks complete.
* ``progress`` (a ``fetcher.progress.Progress``) gets ``start(total, unit="item")``
  (``total`` None when the input has no length), ``update(n)`` per finished chunk,
  ``set_total(n)`` when an unsized input ends, and ``close()``.

Errors (``on_error``):

``"collect"``  the failed item's slot holds a ``fetcher.errors.TaskError`` with
               ``.item``, ``.index`` (position in the input), ``.original`` (the
               exception raised, same type; ``RemoteError`` stands in when it
               cannot be pickled back) and ``.traceback_text`` (the worker's
               formatted traceback).
``"raise"``    the first failure to arrive re-raises the *original* exception (so
               ``except ValueError`` works) with a note carrying the item index and
               the worker's traceback; nothing further is dispatched, a worker stops
               its chunk at the failing item, chunks already running finish in the
               background and are discarded (closing a ``parallel_imap`` early does
               the same; a next call on the warm pool may wait for those workers).

``TaskPool`` gives single-item futures over the same backends with a bound on
unfinished items (``submit`` blocks): the post-processing pipeline uses it.

A process worker killed by the OS (SIGKILL, OOM killer) is detected through its
sentinel: the item it was running (known from a shared-memory slot the worker
updates per item) gets a ``WorkerLostError``, the worker is replaced and the rest
of its chunk is run again -- so items of that chunk that had already finished run
a second time (their results died with the worker). Ctrl-C (``KeyboardInterrupt``
in the parent) terminates the workers (SIGTERM, then SIGKILL after 1 s) before it
propagates; workers also exit on their own when the parent dies.

Functions for process mode must be picklable. Top-level functions are sent by
reference; a lambda, a local function, or a function defined in an interactive
``__main__`` is sent by value with ``cloudpickle`` when that is installed, and
otherwise fails up front with a ``ConfigError`` naming the function.

The package: ``_driver`` (``parallel_map``, ``parallel_imap``, chunking), ``_taskpool``
(``TaskPool``), ``_local`` (sequential and thread backends), ``_process`` (worker
processes, the warm pool), ``_worker`` (what runs inside a worker process),
``_callables`` (sending functions to workers) and ``_common`` (tasks, events and errors
they share). The ``"dask"`` backend lives in ``fetcher.cluster``.
"""

from __future__ import annotations

# Private names below are imported by fetcher.cluster.
from ._common import Mode as Mode
from ._common import OnError as OnError
from ._common import RemoteError, usable_cpu_count
from ._common import _Event as _Event
from ._common import _Task as _Task
from ._common import split_unpicklable as split_unpicklable
from ._driver import parallel_imap, parallel_map
from ._process import shutdown_pools, start_method
from ._taskpool import TaskPool
from ._worker import _dump_result as _dump_result
from ._worker import _run_tracked as _run_tracked

__all__ = [
    "RemoteError",
    "TaskPool",
    "parallel_imap",
    "parallel_map",
    "shutdown_pools",
    "start_method",
    "usable_cpu_count",
]
