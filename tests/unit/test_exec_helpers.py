"""Top-level functions for the executor tests: worker processes import them by name.

Kept free of pytest imports so that worker processes start fast. No tests here.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from typing import Any


class Unpicklable(Exception):
    """An exception whose constructor signature defeats unpickling."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")
        self.a = a
        self.b = b


def square(x: int) -> int:
    return x * x


def jitter_square(x: int) -> int:
    if x % 17 == 0:
        time.sleep(random.random() * 0.01)
    return x * x


def fail_on_sevens(x: int) -> int:
    if x % 7 == 0:
        raise ValueError(f"seven divides {x}")
    return x


def fail_first_then_slow(x: int) -> int:
    if x == 0:
        raise KeyError("first")
    time.sleep(0.05)
    return x


def kill_on(x: int) -> int:
    """SIGKILLs its own worker process for items 13 and 31."""
    if x in (13, 31):
        os.kill(os.getpid(), signal.SIGKILL)
    return x + 1000


def kill_every_tenth(x: int) -> int:
    if x % 10 == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def slow_first(x: int) -> int:
    if x == 0:
        time.sleep(0.5)
    return x


def sleep_briefly(x: int) -> int:
    time.sleep(0.2)
    return x


def unpicklable_result(x: int) -> Any:
    return threading.Lock() if x == 2 else x


def raise_unpicklable(x: int) -> int:
    if x == 1:
        raise Unpicklable(1, 2)
    return x


def pid_of(x: int) -> int:
    return os.getpid()


def exit_at_once(*args: Any) -> None:
    """Stands in for the worker entry point: a worker that dies while booting."""
    os._exit(3)
