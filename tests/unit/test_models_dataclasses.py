"""Job, Result, Report (and http.Prefetched) write out __init__, __repr__, __eq__ (and
Job's __hash__) instead of letting dataclasses generate them at import: they must
behave exactly like what dataclasses would generate from the same fields, a field
added later included."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fetcher.http import Prefetched
from fetcher.models import Job, Report, Result

CLASSES = [Job, Result, Report, Prefetched]


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


@pytest.mark.parametrize("cls", CLASSES)
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
        try:
            expected: object = hash(ra)
        except TypeError:
            expected = TypeError
        try:
            got: object = hash(a)
        except TypeError:
            got = TypeError
        assert got == expected
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


@pytest.mark.parametrize("cls", CLASSES)
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
