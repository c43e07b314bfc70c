"""Schema inference, row extraction, URL handling and input-format helpers of the writers."""

from __future__ import annotations

import datetime as dt
import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest

from fetcher.errors import ConfigError, SinkError
from fetcher.writers import (
    MANIFEST_SCHEMA,
    InputRowError,
    Schema,
    WriteSummary,
    default_table,
    load_id_for,
    open_sink,
    redact_url,
)
from fetcher.writers.load import _infer_text_column, _LineMap, detect_format
from fetcher.writers.schema import (
    RowError,
    apply_converters,
    as_record,
    extract,
    infer_schema,
    sanitize_name,
    unify,
)


def test_infer_schema_types_and_order() -> None:
    rows = [
        {"i": 1, "f": 1.5, "b": True, "s": "x", "ts": dt.datetime(2024, 1, 1),
         "d": dt.date(2024, 1, 2), "j": [1, 2], "n": None},
        {"i": 2, "f": 2, "b": False, "s": None, "ts": None, "d": None, "j": {"a": 1}, "n": None,
         "late": b"\x00"},
    ]
    s = infer_schema(rows)
    assert s.as_dict() == {"i": "int", "f": "float", "b": "bool", "s": "text", "ts": "timestamp",
                           "d": "date", "j": "json", "n": "text", "late": "bytes"}


def test_infer_schema_hints_win_and_add_columns() -> None:
    s = infer_schema([{"url": "u", "http_status": None}], MANIFEST_SCHEMA)
    assert s.as_dict()["http_status"] == "int"
    assert s.as_dict()["outputs"] == "json"
    assert s.names[:2] == ("url", "http_status")
    with pytest.raises(ValueError, match="unknown type"):
        infer_schema([{"a": 1}], {"a": "integer"})


def test_infer_schema_looks_past_leading_nulls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fetcher.writers.schema._INFER_ROWS", 3)
    rows = [{"a": None}] * 10 + [{"a": 5}]
    assert infer_schema(rows).as_dict() == {"a": "int"}


@pytest.mark.parametrize(("kinds", "expected"), [
    (set(), "text"), ({"int", "float"}, "float"), ({"int", "bool"}, "int"),
    ({"timestamp", "timestamptz"}, "timestamptz"), ({"date", "timestamp"}, "timestamp"),
    ({"int", "text"}, "text"), ({"json", "int"}, "json"),
])
def test_unify(kinds: set[str], expected: str) -> None:
    assert unify(kinds) == expected


def test_aware_datetime_is_timestamptz() -> None:
    s = infer_schema([{"t": dt.datetime(2024, 1, 1, tzinfo=dt.UTC)}])
    assert s.as_dict() == {"t": "timestamptz"}


def test_extract_fast_and_slow_paths() -> None:
    names = ("a", "b")
    assert extract([{"a": 1, "b": 2}, {"b": 4, "a": 3}], names, target="t") == [(1, 2), (3, 4)]
    # a missing key is NULL
    assert extract([{"a": 1}, {"a": 2, "b": 3}], names, target="t") == [(1, None), (2, 3)]
    assert extract([{"a": 1}], ("a",), target="t") == [(1,)]


def test_extract_names_the_row_with_an_unknown_column() -> None:
    rows = [{"a": 1, "b": 2}, {"a": 1, "b": 2}, {"a": 1, "zzz": 2}]
    with pytest.raises(RowError) as info:
        extract(rows, ("a", "b"), target="t")
    assert info.value.index == 2
    assert "'zzz'" in info.value.message and "t" in info.value.message


def test_apply_converters_skips_none() -> None:
    rows = [(1, dt.date(2024, 1, 2), None), (2, None, [1])]
    out = apply_converters(rows, [(1, dt.date.isoformat), (2, str)])
    assert out == [(1, "2024-01-02", None), (2, None, "[1]")]
    assert apply_converters(rows, []) is rows


@dataclass
class Rec:
    id: int
    name: str


def test_as_record_accepts_dicts_dataclasses_mappings() -> None:
    d = {"a": 1}
    assert as_record(d) is d
    assert as_record(Rec(1, "x")) == {"id": 1, "name": "x"}
    with pytest.raises(TypeError):
        as_record([1, 2])


def test_sanitize_name() -> None:
    assert sanitize_name("My File-2024") == "my_file_2024"
    assert sanitize_name("2024 sales") == "t_2024_sales"
    assert sanitize_name("---") == "data"


def test_redact_url() -> None:
    assert redact_url("postgresql://u:secret@h:5433/db") == "postgresql://u:***@h:5433/db"
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"


def test_open_sink_rejects_unknown_and_malformed_urls(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown sink URL scheme"):
        open_sink("mysql://u@h/db")
    with pytest.raises(ConfigError, match="not a sink URL"):
        open_sink("just-a-path.db")
    with pytest.raises(ConfigError, match="absolute path"):
        open_sink("file://relative/dir?format=csv")
    with pytest.raises(ConfigError, match="format must be"):
        open_sink(f"file://{tmp_path}?format=xlsx")
    with pytest.raises(ConfigError, match="give a database file"):
        open_sink("sqlite:///:memory:")


def test_open_sink_kinds(tmp_path: Path) -> None:
    assert open_sink(f"sqlite:///{tmp_path}/x.db").max_workers == 1
    pg = open_sink("postgres://u:pw@127.0.0.1/db", table="t")
    assert pg.url == "postgres://u:***@127.0.0.1/db" and pg.table == "t" and pg.supports_key
    files = open_sink(f"file://{tmp_path}/out?format=parquet")
    assert not files.supports_key


def test_summary_as_dict() -> None:
    s = WriteSummary(rows=10, batches=2, skipped_batches=1, skipped_rows=5, seconds=2.0,
                     workers=2, sink="sqlite:///x.db", table="t", load_id="l")
    d = s.as_dict()
    assert d["rows_per_s"] == 5.0 and d["skipped_batches"] == 1 and d["table"] == "t"


def test_errors_pickle() -> None:
    e = InputRowError("f.csv line 3: bad", sink="sqlite:///x.db", batch=0, row=1)
    back = pickle.loads(pickle.dumps(e))
    assert isinstance(back, SinkError) and back.row == 1 and str(back) == str(e)


@pytest.mark.parametrize(("values", "expected"), [
    (["1", "-2", ""], "int"), (["007"], "text"), (["1", "2.5", "1e3"], "float"),
    (["true", "False"], "bool"), (["2024-01-02"], "date"), (["2024-02-30"], "text"),
    (["2024-01-02 03:04:05", "2024-01-02T03:04"], "timestamp"),
    (["2024-01-02T03:04:05+02:00", "2024-01-02T03:04:05Z"], "timestamptz"),
    (["2024-01-02T03:04:05+02:00", "2024-01-02T03:04:05"], "text"),
    (["", ""], "text"), (["a", "1"], "text"),
])
def test_csv_column_inference(values: list[str], expected: str) -> None:
    assert _infer_text_column(values) == expected


def test_detect_format_and_default_table() -> None:
    assert detect_format(Path("a.csv")) == ("csv", False)
    assert detect_format(Path("a.JSONL.gz")) == ("jsonl", True)
    assert detect_format(Path("x.parquet")) == ("parquet", False)
    with pytest.raises(ConfigError):
        detect_format(Path("x.parquet.gz"))
    with pytest.raises(ConfigError):
        detect_format(Path("x.xlsx"))
    assert default_table(Path("/d/Sales 2024.csv.gz")) == "sales_2024"
    assert load_id_for(Path("rel.csv"), "t") == f"file:t:{Path('rel.csv').resolve()}"


def test_line_map() -> None:
    m = _LineMap()
    for row in range(5):
        m.note(row, row + 2)          # header on line 1
    m.note(5, 9)                      # a multi-line record / blank lines before row 5
    m.note(6, 10)
    assert m.line(0) == 2 and m.line(4) == 6 and m.line(5) == 9 and m.line(6) == 10
    assert m.line(100) == 104


def test_schema_from_mapping_validates() -> None:
    assert Schema.from_mapping({"a": "int"}).names == ("a",)
    with pytest.raises(ValueError):
        Schema.from_mapping({"a": "varchar"})


def test_missing_extras_are_config_errors(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ConfigError, match=r"pip install 'fetcher\[postgres\]'"):
        open_sink("postgresql://u@h/db")
    with pytest.raises(ConfigError, match=r"pip install 'fetcher\[parquet\]'"):
        open_sink(f"file://{tmp_path}?format=parquet")
    assert open_sink(f"file://{tmp_path}?format=csv").url.endswith("format=csv")
