"""The parent-worker link of a fan-out run: framing, sizes, what crosses it."""

from __future__ import annotations

import marshal
import socket
from typing import Any

PICKLED = 0x8000_0000
"""Set in a frame's length when the message is a pickle. Most messages (items, sequence
numbers, notices) hold only plain values and go as marshal data, which costs no import;
objects (Results, exceptions, a caller's extra values) are pickled."""
BUF = 1 << 20
"""Socket buffer size each way: room for thousands of reports, so a worker rarely waits."""
RECV = 64 * 1024
QUIT_GRACE = 10.0
"""Seconds a cancelled worker gets to journal its items and exit before it is killed."""


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` near-equal whole shares."""
    return [total // parts + (i < total % parts) for i in range(parts)]


JSON_SCALARS = (str, int, float, bool, type(None))


def portable(extra: Any) -> dict[str, Any] | None:
    """A job's carried columns as a worker can receive them: as they are when plain
    (the usual CSV strings), else as the manifest will show them (``str()`` of what
    JSON cannot hold), which pickles whatever the caller put there."""
    if not extra:
        return None
    if type(extra) is dict and all(type(v) in JSON_SCALARS for v in extra.values()):
        return extra
    import json

    from ..models import encode_record

    plain: dict[str, Any] = json.loads(encode_record(dict(extra)))
    return plain


def frame(message: tuple[Any, ...]) -> bytes:
    """One message as a length-prefixed frame (marshal when it can, else pickle)."""
    try:
        data = marshal.dumps(message)  # exact built-in types only, subclasses refused
        size = len(data)
    except ValueError:
        data = dumps(message)
        size = len(data) | PICKLED
    return size.to_bytes(4, "big") + data


def ready() -> None:
    """Import pickle before the workers are forked, so that no process of the run imports
    it later: a message with objects (a failure's Result) can come when no descriptor is
    left to open the module with, and in a child an import can wait forever on a lock
    another thread held at the fork."""
    _pickler()


def _pickler() -> Any:
    """The C pickler, ``_pickle``, which ``pickle.dumps`` and ``loads`` are: ``pickle``
    itself (its pure-Python fallbacks, and ``struct``) cost ~1.5 ms more of every fan-out
    start, before the fork. An interpreter without it gets ``pickle``."""
    try:
        import _pickle
    except ImportError:  # pragma: no cover - CPython always has it
        import pickle

        return pickle
    return _pickle


def dumps(obj: Any) -> bytes:
    """``obj`` pickled (raises what pickle raises for what cannot be pickled)."""
    data: bytes = _pickler().dumps(obj, -1)  # -1: the highest protocol
    return data


def read_link(sock: socket.socket) -> bytes | None:
    """What the link holds: bytes, b"" at EOF (or a broken link), None for nothing yet."""
    try:
        return sock.recv(RECV)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


class Inbox:
    """Bytes from a socket in, whole messages out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def messages(self, data: bytes) -> list[tuple[Any, ...]]:
        buf = self._buf
        buf += data
        out: list[tuple[Any, ...]] = []
        start = 0
        while len(buf) - start >= 4:
            size = int.from_bytes(buf[start:start + 4], "big")
            length = size & ~PICKLED
            if len(buf) - start - 4 < length:
                break
            chunk = buf[start + 4:start + 4 + length]
            if size & PICKLED:
                out.append(_pickler().loads(chunk))
            else:
                out.append(marshal.loads(chunk))
            start += 4 + length
        del buf[:start]
        return out


# -- the parent ---------------------------------------------------------------------------

