"""The parent-worker link of a fan-out run: framing, sizes, what crosses it."""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any

LENGTH = struct.Struct("!I")
PICKLE = pickle.HIGHEST_PROTOCOL
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
    data = pickle.dumps(message, PICKLE)
    return LENGTH.pack(len(data)) + data


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
            (size,) = LENGTH.unpack_from(buf, start)
            if len(buf) - start - 4 < size:
                break
            out.append(pickle.loads(buf[start + 4:start + 4 + size]))
            start += 4 + size
        del buf[:start]
        return out


# -- the parent ---------------------------------------------------------------------------

