"""The fan-out link's framing: plain messages as marshal data, objects as pickles, and
whole messages out of bytes that arrive in any pieces."""

from __future__ import annotations

from typing import Any

from fetcher.errors import DownloadProcessError
from fetcher.fanout._link import PICKLED, Inbox, frame
from fetcher.models import Result


class Tag(str):
    """A str subclass marshal would refuse: it must cross as a pickle, type and all."""


def _flagged(data: bytes) -> bool:
    return bool(int.from_bytes(data[:4], "big") & PICKLED)


def test_plain_and_object_messages_round_trip_in_any_pieces() -> None:
    plain = ("items", [(1, "http://h/a", "a", None, {"k": "v", "n": 2.5, "b": True})])
    failed = Result("http://h/b", "b", "failed").fail(DownloadProcessError("gone", url="u"))
    objects: tuple[Any, ...] = ("results", [], 0, [(2, failed)])
    done = ("done", [3, 4])
    assert not _flagged(frame(plain)) and _flagged(frame(objects))

    tagged = ("stop", Tag("full"))
    assert _flagged(frame(tagged))
    stream = b"".join(frame(m) for m in (plain, objects, done, tagged))
    for step in (1, 7, len(stream)):
        inbox, out = Inbox(), []
        for i in range(0, len(stream), step):
            out += inbox.messages(stream[i:i + step])
        assert out[0] == plain and out[2] == done
        assert out[1][3][0][1].error_type == "DownloadProcessError"
        assert type(out[3][1]) is Tag and out[3][1] == "full"
