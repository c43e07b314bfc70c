"""Job, Result, Report, FetchConfig (and http.Prefetched) write out __init__,
__repr__, __eq__ (and the frozen ones' __hash__) instead of letting dataclasses generate
them at import: they must behave exactly like what dataclasses would generate from the
same fields, a field added later included."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fetcher.config import ON_EXISTS, FetchConfig
from fetcher.errors import ConfigError
from fetcher.http import Prefetched
from fetcher.models import Job, Report, Result

CLASSES = [Job, Result, Report, Prefetched]
WRITTEN_OUT = [*CLASSES, FetchConfig]  # FetchConfig validates: its values below


def _generated(cls: type) -> type:
    """The dataclass dataclasses would make from ``cls``'s fields and parameters."""
    params = cls.__dataclass_params__  # type: ignore[attr-defined]
    specs = []
    for f in dataclasses.fields(cls):
        kw: dict[str, Any] = {"repr": f.repr, "compare": f.compare, "hash": f.hash}
        if f.default is not dataclasses.MISSING:
            kw["default"] = f.default
        if f.default_factory is not dataclasses.MISSING:
            kw["default_factory"] = f.default_factory
        specs.append((f.name, f.type, dataclasses.field(**kw)))
    return dataclasses.make_dataclass(cls.__name__, specs, frozen=params.frozen, slots=True)


def _required(cls: type) -> list[str]:
    return ["x" for p in inspect.signature(cls).parameters.values() if p.default is p.empty]


@pytest.mark.parametrize("cls", WRITTEN_OUT)
def test_signature_and_defaults_are_the_generated_ones(cls: type) -> None:
    ref = _generated(cls)
    ours, theirs = inspect.signature(cls).parameters, inspect.signature(ref).parameters
    assert list(ours) == list(theirs)
    assert [p.default is p.empty for p in ours.values()] == \
        [p.default is p.empty for p in theirs.values()]
    a, b = cls(*_required(cls)), ref(*_required(cls))
    for f in dataclasses.fields(cls):
        assert getattr(a, f.name) == getattr(b, f.name), f.name
        if isinstance(getattr(a, f.name), list | dict):  # made per instance
            assert getattr(a, f.name) is not getattr(cls(*_required(cls)), f.name)


def _hash_or_error(obj: object) -> object:
    """hash(obj), or TypeError when a field is unhashable."""
    try:
        return hash(obj)
    except TypeError:
        return TypeError


_value = st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=3),
                   st.lists(st.integers(0, 2), max_size=2),
                   st.dictionaries(st.sampled_from("ab"), st.integers(0, 2), max_size=2),
                   st.floats(allow_nan=False, max_value=10, min_value=-10))


@settings(max_examples=400, deadline=None)
@given(cls=st.sampled_from(CLASSES), data=st.data())
def test_repr_eq_hash_replace_and_pickle_are_the_generated_ones(cls: type,
                                                                data: st.DataObject) -> None:
    ref = _generated(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    one = {n: data.draw(_value, label=n) for n in names}
    two = dict(one)
    if data.draw(st.booleans(), label="differ"):
        changed = data.draw(st.sampled_from(names), label="changed")
        two[changed] = data.draw(_value, label="to")
    a, b = cls(**one), cls(**two)
    ra, rb = ref(**one), ref(**two)
    assert repr(a) == repr(ra)
    assert (a == b) == (ra == rb)
    assert (a == b) == (a.__eq__(b) is True)
    assert a.__eq__(object()) is NotImplemented
    assert a.__eq__(type("Sub", (cls,), {})(**one)) is NotImplemented
    assert (cls.__hash__ is None) == (ref.__hash__ is None)
    if cls.__hash__ is not None:
        assert _hash_or_error(a) == _hash_or_error(ra)
    changed = dataclasses.replace(a, **{names[0]: "z"})
    assert repr(changed) == repr(dataclasses.replace(ra, **{names[0]: "z"}))
    assert repr(pickle.loads(pickle.dumps(a))) == repr(a)
    assert dataclasses.asdict(a) == dataclasses.asdict(ra)
    assert cls.__match_args__ == ref.__match_args__  # type: ignore[attr-defined]


def test_repr_of_a_cycle_is_the_generated_one() -> None:
    report = Report()
    report.sink = {"self": report}  # type: ignore[dict-item]
    ref = _generated(Report)()
    ref.sink = {"self": ref}
    assert repr(report) == repr(ref)


@pytest.mark.parametrize("cls", WRITTEN_OUT)
def test_frozenness_is_unchanged(cls: type) -> None:
    ref = _generated(cls)
    assert cls.__dataclass_params__.frozen == ref.__dataclass_params__.frozen  # type: ignore[attr-defined]
    obj = cls(*_required(cls))
    name = dataclasses.fields(cls)[0].name
    if cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, "y")
    else:
        setattr(obj, name, "y")
        assert getattr(obj, name) == "y"


# A valid value other than the default for every field of FetchConfig.
_CONFIG_VALUES: dict[str, list[Any]] = {
    "threads": [1, 16], "retries": [0, 9], "timeout": [0.5], "on_exists": list(ON_EXISTS),
    "force": [True], "content_disposition": [True], "per_host": [2], "rate": [1.5],
    "split": [4], "split_min_size": [1], "pipeline": [4],
    "expect_type": ["image/*"], "max_redirects": [0],
    "headers": [{"X-A": "1"}, {}], "auth": [("u", "p")], "proxies": [{"http": "http://p:1"}],
    "verify": [False, "/ca.pem"], "cert": ["c.pem", ("c", "k")], "chunk_size": [4096],
    "backoff_base": [0.1], "backoff_max": [1.0], "retry_after_max": [5.0],
    "download_processes": [1, 3], "window": [7], "manifest": [Path("m.jsonl")],
    "keep_results": [False], "user_agent": ["x/1"],
}


def test_every_config_field_has_test_values() -> None:
    assert set(_CONFIG_VALUES) == {f.name for f in dataclasses.fields(FetchConfig)}


def _config_kwargs(data: st.DataObject, label: str) -> dict[str, Any]:
    chosen = data.draw(st.sets(st.sampled_from(sorted(_CONFIG_VALUES)), max_size=6), label=label)
    return {name: data.draw(st.sampled_from(_CONFIG_VALUES[name]), label=name)
            for name in sorted(chosen)}


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_config_repr_eq_hash_replace_and_pickle_are_the_generated_ones(
        data: st.DataObject) -> None:
    ref = _generated(FetchConfig)
    one, two = _config_kwargs(data, "one"), _config_kwargs(data, "two")
    a, b = FetchConfig(**one), FetchConfig(**two)
    ra, rb = ref(**one), ref(**two)
    assert repr(a) == repr(ra) and repr(b) == repr(rb)
    assert (a == b) == (ra == rb)
    assert (a == FetchConfig(**one)) and a.__eq__(object()) is NotImplemented
    for ours, theirs in ((a, ra), (b, rb)):  # a dict of headers: TypeError in both
        assert _hash_or_error(ours) == _hash_or_error(theirs)
    assert repr(dataclasses.replace(a, threads=3)) == repr(dataclasses.replace(ra, threads=3))
    assert pickle.loads(pickle.dumps(a)) == a
    assert dataclasses.asdict(a) == dataclasses.asdict(ra)
    assert FetchConfig.__match_args__ == ref.__match_args__  # type: ignore[attr-defined]


def test_config_validates_when_made_and_when_replaced() -> None:
    with pytest.raises(ConfigError, match="threads"):
        FetchConfig(threads=0)
    with pytest.raises(ConfigError, match="on_exists"):
        dataclasses.replace(FetchConfig(), on_exists="explode")
    with pytest.raises(ConfigError, match="retries"):
        FetchConfig().replace(retries=-1)
    assert FetchConfig().headers is not FetchConfig().headers  # a new dict each time
