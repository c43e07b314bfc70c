"""Column types, schema inference from a batch of records, and row extraction.

The writer speaks a small, sink-neutral type vocabulary (``TYPES``); each sink maps it
to its own column types (PostgreSQL ``bigint``/``jsonb``..., SQLite ``INTEGER``/``TEXT``...,
Arrow ``int64``/``string``...).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

TYPES: tuple[str, ...] = (
    "int", "float", "bool", "text", "timestamp", "timestamptz", "date", "json", "bytes",
)
"""The logical column types. ``json`` holds lists and dicts (stored as JSON/JSONB text)."""

Record = dict[str, Any]
_INFER_ROWS = 10_000


@dataclass(frozen=True, slots=True)
class Column:
    """One column: its name and logical type (one of ``TYPES``)."""

    name: str
    type: str


@dataclass(frozen=True, slots=True)
class Schema:
    """An ordered list of columns."""

    columns: tuple[Column, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Column names in order."""
        return tuple(c.name for c in self.columns)

    @property
    def types(self) -> tuple[str, ...]:
        """Logical types in column order."""
        return tuple(c.type for c in self.columns)

    def as_dict(self) -> dict[str, str]:
        """``{name: type}`` in column order."""
        return {c.name: c.type for c in self.columns}

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str]) -> Schema:
        """Build from ``{name: type}``, validating the types."""
        cols = []
        for name, typ in mapping.items():
            if typ not in TYPES:
                raise ValueError(f"column {name!r}: unknown type {typ!r} "
                                 f"(one of {', '.join(TYPES)})")
            cols.append(Column(str(name), typ))
        return cls(tuple(cols))


class RowError(Exception):
    """A row of a batch does not fit (``index`` is its position inside the batch)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index
        self.message = message


def as_record(obj: Any) -> Record:
    """A record as a plain dict: dicts pass through, dataclasses and mappings are converted."""
    if type(obj) is dict:
        return obj
    if isinstance(obj, Mapping):
        return dict(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    raise TypeError(f"records must be dicts or dataclass instances, not {type(obj).__name__}")


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "text"
    if isinstance(v, dt.datetime):
        return "timestamptz" if v.tzinfo is not None else "timestamp"
    if isinstance(v, dt.date):
        return "date"
    if isinstance(v, (list, dict, tuple)):
        return "json"
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "bytes"
    return "text"


def unify(kinds: set[str]) -> str:
    """The one type that holds every kind of value seen in a column."""
    if not kinds:
        return "text"
    if len(kinds) == 1:
        return next(iter(kinds))
    if "json" in kinds:
        return "json"
    if kinds <= {"int", "float", "bool"}:
        return "float" if "float" in kinds else "int"
    if kinds <= {"timestamp", "timestamptz", "date"}:
        return "timestamptz" if "timestamptz" in kinds else "timestamp"
    return "text"


def infer_schema(rows: Sequence[Mapping[str, Any]],
                 hints: Mapping[str, str] | None = None) -> Schema:
    """Infer a schema from a batch: columns in order of first appearance, then any hinted
    columns not seen; a hinted type wins, otherwise the values decide (all ``None`` -> text)."""
    hints = dict(hints or {})
    for name, typ in hints.items():
        if typ not in TYPES:
            raise ValueError(f"column {name!r}: unknown type {typ!r} (one of {', '.join(TYPES)})")
    order: dict[str, set[str]] = {}
    for r in rows:
        for k in r:
            if k not in order:
                if not isinstance(k, str):
                    raise TypeError(f"column names must be strings, got {k!r}")
                order[k] = set()
    head = rows[:_INFER_ROWS]
    for name, kinds in order.items():
        if name in hints:
            continue
        for r in head:
            v = r.get(name)
            if v is not None:
                kinds.add(_kind(v))
        if not kinds:  # all None so far: look further for the first value
            for r in rows[_INFER_ROWS:]:
                v = r.get(name)
                if v is not None:
                    kinds.add(_kind(v))
                    break
    cols = [Column(n, hints.get(n) or unify(k)) for n, k in order.items()]
    cols += [Column(n, t) for n, t in hints.items() if n not in order]
    if not cols:
        raise ValueError("records have no columns")
    return Schema(tuple(cols))


def arrow_logical(typ: Any) -> str:
    """The logical type for an Arrow type (nested types are json)."""
    import pyarrow as pa

    t = pa.types
    if t.is_dictionary(typ):
        return arrow_logical(typ.value_type)
    if t.is_boolean(typ):
        return "bool"
    if t.is_integer(typ):
        return "int"
    if t.is_floating(typ) or t.is_decimal(typ):
        return "float"
    if t.is_string(typ) or t.is_large_string(typ):
        return "text"
    if t.is_timestamp(typ):
        return "timestamptz" if typ.tz is not None else "timestamp"
    if t.is_date(typ):
        return "date"
    if t.is_binary(typ) or t.is_large_binary(typ) or t.is_fixed_size_binary(typ):
        return "bytes"
    if t.is_list(typ) or t.is_large_list(typ) or t.is_struct(typ) or t.is_map(typ):
        return "json"
    return "text"


def schema_from_arrow(arrow_schema: Any, hints: Mapping[str, str] | None = None) -> Schema:
    """A schema from an Arrow schema; ``hints`` override column types."""
    hints = dict(hints or {})
    cols = [Column(f.name, hints.get(f.name) or arrow_logical(f.type)) for f in arrow_schema]
    names = {c.name for c in cols}
    cols += [Column(n, t) for n, t in hints.items() if n not in names]
    if not cols:
        raise ValueError("the Arrow data has no columns")
    return Schema(tuple(cols))


def extract(rows: Sequence[Mapping[str, Any]], names: Sequence[str],
            *, target: str) -> list[tuple[Any, ...]]:
    """Rows as tuples in column order. Missing keys become ``None``; a key the schema does
    not have raises :class:`RowError` naming the row and the column."""
    n = len(names)
    getter: Callable[[Mapping[str, Any]], tuple[Any, ...]]
    if n == 1:
        only = names[0]

        def getter(r: Mapping[str, Any]) -> tuple[Any, ...]:
            return (r[only],)
    else:
        getter = itemgetter(*names)
    # Fast path: every row has exactly the schema's keys (checked via len + KeyError).
    if all(len(r) == n for r in rows):
        try:
            return list(map(getter, rows))
        except KeyError:
            pass
    known = set(names)
    out: list[tuple[Any, ...]] = []
    for i, r in enumerate(rows):
        if len(r) > n or not known.issuperset(r):
            extra = sorted(str(k) for k in r if k not in known)
            if extra:
                raise RowError(i, f"column(s) {', '.join(map(repr, extra))} not in the schema of "
                                  f"{target} (columns: {', '.join(names)})")
        out.append(tuple(r.get(c) for c in names))
    return out


def extract_columns(rows: Sequence[Mapping[str, Any]], names: Sequence[str],
                    *, target: str) -> list[list[Any]]:
    """Like :func:`extract`, but column-wise (one list per column): the cheap way to
    feed columnar writers such as Arrow."""
    n = len(names)
    if all(len(r) == n for r in rows):
        try:
            return [[r[c] for r in rows] for c in names]
        except KeyError:
            pass
    tuples = extract(rows, names, target=target)
    if not tuples:
        return [[] for _ in names]
    return [list(col) for col in zip(*tuples, strict=True)]


def json_text(v: Any) -> str:
    """JSON text for a json column value (non-JSON values such as datetimes via ``str``)."""
    return json.dumps(v, default=str, ensure_ascii=False, separators=(",", ":"))


def iso(v: Any) -> Any:
    """ISO text for dates and datetimes; other values unchanged."""
    if isinstance(v, (dt.date, dt.datetime)):
        return v.isoformat(" ") if isinstance(v, dt.datetime) else v.isoformat()
    return v


Converter = Callable[[Any], Any]


def column_converters(types: Iterable[str],
                      table: Mapping[str, Converter]) -> list[tuple[int, Converter]]:
    """``(position, fn)`` for the columns whose type has a converter in ``table``."""
    return [(i, table[t]) for i, t in enumerate(types) if t in table]


def apply_converters(tuples: list[tuple[Any, ...]],
                     convs: Sequence[tuple[int, Callable[[Any], Any]]]) -> list[tuple[Any, ...]]:
    """Apply per-column converters (skipping ``None``) to every row; rows without any
    converter pass through untouched."""
    if not convs or not tuples:
        return tuples
    return list(map(_row_converter(len(tuples[0]), convs), tuples))


def _row_converter(width: int, convs: Sequence[tuple[int, Callable[[Any], Any]]]
                   ) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    """A compiled ``lambda t: (t[0], None if t[1] is None else c1(t[1]), ...)``: several
    times faster than a generic loop. Only integers go into the generated source."""
    by_pos = dict(convs)
    parts = []
    env: dict[str, Any] = {}
    for i in range(width):
        if i in by_pos:
            env[f"c{i}"] = by_pos[i]
            parts.append(f"None if t[{i}] is None else c{i}(t[{i}])")
        else:
            parts.append(f"t[{i}]")
    fn: Callable[[tuple[Any, ...]], tuple[Any, ...]] = eval(
        f"lambda t: ({', '.join(parts)},)", env)
    return fn


_IDENT_BAD = re.compile(r"[^0-9A-Za-z_]+")


def sanitize_name(stem: str, *, default: str = "data") -> str:
    """A safe table name from a file stem: ``"My File-2024"`` -> ``"my_file_2024"``."""
    name = _IDENT_BAD.sub("_", stem).strip("_").lower()
    if not name:
        return default
    if name[0].isdigit():
        name = "t_" + name
    return name[:63]
