"""Custom ``--post module:function`` transforms for the tests (imported by workers).

No tests here; kept free of pytest imports so worker processes start fast.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from fetcher.transforms import derived_path


def upper_copy(path: Path, dest: Path) -> Path:
    """Write an upper-cased copy of a text file to the conventional place."""
    out = derived_path(path, dest, "upper")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(path.read_text().upper())
    return out


def relative_output(path: Path, dest: Path) -> list[str]:
    out = dest / "notes" / (path.name + ".txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("seen")
    return [f"notes/{path.name}.txt"]


def nothing(path: Path, dest: Path) -> None:
    return None


def outside(path: Path, dest: Path) -> Path:
    return Path("/etc/hostname")


def in_place(path: Path, dest: Path) -> Path:
    return path


def explode(path: Path, dest: Path) -> Path:
    raise RuntimeError(f"cannot handle {path.name}")


def slow_copy(path: Path, dest: Path) -> Path:
    time.sleep(0.3)
    return upper_copy(path, dest)


def kill_on_poison(path: Path, dest: Path) -> Path:
    """SIGKILLs its worker for a file named poison.txt."""
    if path.name == "poison.txt":
        os.kill(os.getpid(), signal.SIGKILL)
    return upper_copy(path, dest)


NOT_CALLABLE = 42


def very_slow_copy(path: Path, dest: Path) -> Path:
    time.sleep(0.6)
    return upper_copy(path, dest)
