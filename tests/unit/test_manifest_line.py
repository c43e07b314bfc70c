"""Result.json_line(): the manifest's fast encoder must match json.dumps exactly."""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from dataclasses import FrozenInstanceError, dataclass, field, fields, replace
from json.encoder import encode_basestring as _encode_str
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fetcher.models import Job, Result, encode_record

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


def _reference_json_line(result: Result) -> str:
    """json_line's fast path as it was before the status table and the one-conversion
    elapsed_s."""
    q = _encode_str
    path = "null" if result.path is None else q(result.path)
    sha = "null" if result.sha256 is None else q(result.sha256)
    http = "null" if result.http_status is None else str(int(result.http_status))
    return (f'{{"url": {q(result.url)}, "path": {path}, "status": {q(result.status)}, '
            f'"bytes": {int(result.bytes)}, "sha256": {sha}, "http_status": {http}, '
            f'"attempts": {int(result.attempts)}, '
            f'"elapsed_s": {float(round(result.elapsed_s, 4))!r}, '
            f'"error_type": null, "error": null, "outputs": []}}')


_seconds = st.one_of(
    st.floats(), st.floats(0, 1e10), st.floats(0, 1e-3), st.integers(-5, 10**12),
    st.sampled_from([0.0, -0.0, 5e-05, 4.9999e-05, 1e-4, 0.00015, 0.00025, 1.00005,
                     2.675e-4, 999999999.99995, 1e9 - 1e-7, 1e9, 1e16, True]),
    st.decimals(0, 10**9, places=6).map(float),
)


@settings(max_examples=1000)
@given(elapsed=_seconds, status=st.sampled_from(["ok", "skipped", "failed"]) | text)
def test_fast_path_equals_the_previous_one(elapsed: float, status: str) -> None:
    result = Result(url="http://h/x", path="x", status=status,  # type: ignore[arg-type]
                    bytes=1, sha256=None, http_status=200, attempts=1, elapsed_s=elapsed)
    assert result.json_line() == _reference_json_line(result)


# --- Job's own __init__ does what the generated one did --------------------------------

@dataclass(frozen=True, slots=True)
class _ReferenceJob:
    url: str
    path: str | None = None
    sha256: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    source: str = "<list>"
    line: int | None = None


_job_kwargs = st.fixed_dictionaries({}, optional={
    "path": st.none() | text, "sha256": st.none() | text,
    "extra": st.none() | st.dictionaries(text, text, max_size=2), "source": text,
    "line": st.none() | st.integers(),
})


@given(url=text, kwargs=_job_kwargs)
def test_job_init_is_the_dataclass_init(url: str, kwargs: dict[str, Any]) -> None:
    job, ref = Job(url, **kwargs), _ReferenceJob(url, **kwargs)
    assert [getattr(job, f.name) for f in fields(Job)] == \
        [getattr(ref, f.name) for f in fields(_ReferenceJob)]
    assert repr(job) == repr(ref).replace("_ReferenceJob", "Job")
    assert job == Job(url, **kwargs)
    assert pickle.loads(pickle.dumps(job)) == job
    assert replace(job, url="http://x/") == Job("http://x/", **kwargs)
    with pytest.raises(FrozenInstanceError):
        job.url = "x"  # type: ignore[misc]
    if "extra" not in kwargs:
        assert job.extra == {} and job.extra is not Job(url).extra
