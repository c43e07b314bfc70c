"""Result.json_line(): the manifest's fast encoder must match json.dumps exactly."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from fetcher.models import Result, encode_record

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@given(url=text, path=st.none() | text, status=st.sampled_from(["ok", "skipped", "failed"]),
       nbytes=st.integers(0, 2**53), sha=st.none() | text,
       http=st.none() | st.integers(100, 599), attempts=st.integers(0, 50),
       elapsed=st.floats(0, 1e6, allow_nan=False, allow_infinity=False),
       error=st.none() | text, outputs=st.lists(text, max_size=2),
       extra=st.dictionaries(text, st.integers() | text, max_size=2))
def test_json_line_is_json_dumps_of_the_record(url: str, path: str | None, status: str,
                                               nbytes: int, sha: str | None,
                                               http: int | None, attempts: int,
                                               elapsed: float, error: str | None,
                                               outputs: list[str],
                                               extra: dict[str, object]) -> None:
    result = Result(url=url, path=path, status=status, bytes=nbytes,  # type: ignore[arg-type]
                    sha256=sha, http_status=http, attempts=attempts, elapsed_s=elapsed,
                    error=error, error_type=None if error is None else "X",
                    outputs=outputs, extra=extra)
    line = result.json_line()
    assert line == encode_record(result.record())
    assert json.loads(line) == json.loads(json.dumps(result.record(), default=str))
    assert "\n" not in line


@given(url=text, path=st.none() | text, nbytes=st.integers(0, 2**53), sha=st.none() | text,
       http=st.none() | st.integers(100, 599),
       elapsed=st.floats(0, 1e6, allow_nan=False, allow_infinity=False))
def test_the_fast_path_itself(url: str, path: str | None, nbytes: int, sha: str | None,
                              http: int | None, elapsed: float) -> None:
    result = Result(url=url, path=path, status="ok", bytes=nbytes, sha256=sha,
                    http_status=http, attempts=1, elapsed_s=elapsed)
    assert result.json_line() == encode_record(result.record())
