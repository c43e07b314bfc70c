"""Model runs over a grid of hyperparameters: a multi-argument function, four ways.

``train(learning_rate, l2, epochs)`` fits a logistic regression by mini-batch
gradient descent (NumPy on small batches inside a Python loop: CPU-bound, and the
GIL is held most of the time, so processes are the right pool) and returns its
validation accuracy. The grid is every combination of the three arguments -- the
``starmap`` case, where each item is a tuple of arguments:

* a plain loop;
* ``fetcher.parallel_map(train_star, grid)``: ``parallel_map`` passes one item per
  call, so a three-line top-level adapter unpacks the tuple (a lambda would not
  pickle without cloudpickle);
* ``multiprocessing.Pool().starmap(train, grid)``;
* joblib's idiom, ``Parallel(n_jobs=-1)(delayed(train)(lr, l2, ep) for lr, l2, ep in
  grid)`` (skipped when joblib is not installed).

All four must return the same scores (each run is seeded); the script prints the
timings and the best hyperparameters.

    python examples/hyperparameter_grid.py [--rows 20000] [--workers N]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import multiprocessing
import os
import sys
import time
from typing import Any

import numpy as np

from fetcher import parallel_map

FEATURES = 20
BATCH = 50


def dataset(rows: int) -> tuple[Any, Any, Any, Any]:
    """A fixed, seeded binary classification problem: (X_train, y_train, X_val, y_val).

    Rebuilt on every call (a few ms) rather than cached in a global: joblib sends
    functions of a script's ``__main__`` by value, and a cache would travel along."""
    rng = np.random.default_rng(42)
    X = rng.normal(size=(rows, FEATURES))
    w = rng.normal(size=FEATURES)
    y = (X @ w + rng.normal(scale=2.0, size=rows) > 0).astype(float)
    cut = int(rows * 0.8)
    return X[:cut], y[:cut], X[cut:], y[cut:]


def train(learning_rate: float, l2: float, epochs: int, *, rows: int = 20_000) -> float:
    """Fit logistic regression with mini-batch SGD; validation accuracy (0..1)."""
    X, y, Xv, yv = dataset(rows)
    rng = np.random.default_rng(0)
    w = np.zeros(X.shape[1])
    b = 0.0
    for _ in range(epochs):
        order = rng.permutation(len(X))
        for start in range(0, len(X), BATCH):
            idx = order[start:start + BATCH]
            xb, yb = X[idx], y[idx]
            p = 1.0 / (1.0 + np.exp(-(xb @ w + b)))
            grad = p - yb
            w -= learning_rate * (xb.T @ grad / len(idx) + l2 * w)
            b -= learning_rate * float(grad.mean())
    return float((((Xv @ w + b) > 0) == (yv > 0.5)).mean())


def train_star(params: tuple[float, float, int], *, rows: int = 20_000) -> float:
    """``train(*params)``: the adapter that turns one grid item into three arguments."""
    return train(*params, rows=rows)


GRID = list(itertools.product([0.003, 0.01, 0.03, 0.1], [0.0, 1e-3, 1e-2, 1e-1], [5, 10]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="dataset rows")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: cores)")
    args = parser.parse_args()
    workers = args.workers or len(os.sched_getaffinity(0))
    # Bind the non-grid argument once; partials of top-level functions pickle fine.
    fit = functools.partial(train, rows=args.rows)
    fit_star = functools.partial(train_star, rows=args.rows)

    timings: dict[str, float] = {}
    results: dict[str, list[float]] = {}

    def timed(name: str, fn: Any) -> None:
        t0 = time.perf_counter()
        results[name] = list(fn())
        timings[name] = time.perf_counter() - t0

    def pool_starmap() -> list[float]:
        with multiprocessing.Pool(workers) as pool:
            return pool.starmap(fit, GRID)

    # Every pooled run includes starting its pool, as a script that runs once does.
    timed("loop", lambda: [fit(*p) for p in GRID])
    timed("fetcher parallel_map", lambda: parallel_map(fit_star, GRID, workers=workers,
                                                       on_error="raise"))
    timed("multiprocessing starmap", pool_starmap)
    try:
        from joblib import Parallel, delayed
    except ImportError:
        print("(joblib not installed: skipping the Parallel/delayed idiom)")
    else:
        timed("joblib Parallel/delayed", lambda: Parallel(n_jobs=workers)(
            delayed(fit)(lr, l2, ep) for lr, l2, ep in GRID))

    base = timings["loop"]
    print(f"{len(GRID)} runs of train(learning_rate, l2, epochs) on {args.rows:,} rows, "
          f"{workers} processes")
    for name, secs in timings.items():
        same = "same scores" if results[name] == results["loop"] else "DIFFERENT SCORES"
        print(f"  {name:<26} {secs:7.2f} s  {base / secs:5.2f}x  {same}")
    if any(r != results["loop"] for r in results.values()):
        return 1
    best = max(zip(results["loop"], GRID, strict=True))
    print(f"best: learning_rate={best[1][0]}, l2={best[1][1]}, epochs={best[1][2]} "
          f"-> validation accuracy {best[0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
