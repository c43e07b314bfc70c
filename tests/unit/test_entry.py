"""The typer-free parser of ``fetcher get`` agrees with typer on everything it accepts."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import typer.main
from hypothesis import given, settings
from hypothesis import strategies as st

from fetcher.cli import app
from fetcher.entry import GET_OPTIONS, parse_get
from tests.procutil import bare_python, cli_modules

GET = typer.main.get_command(app).commands["get"]  # type: ignore[attr-defined]


def _click_kind(param: Any) -> str:
    if getattr(param, "is_flag", False):
        return "flag"
    if param.multiple:
        return "list"
    return {"path": "path", "int": "int", "float": "float", "str": "str"}[param.type.name]


def test_table_matches_typer_parameters() -> None:
    options = [p for p in GET.params if p.param_type_name == "option"]
    ours = {dest: (names, kind, default) for dest, names, kind, default in GET_OPTIONS}
    assert [p.name for p in options] == [dest for dest, *_ in GET_OPTIONS]
    for param in options:
        names, kind, default = ours[param.name]  # type: ignore[index]
        flat = [n for name in names for n in name.split("/")]
        assert flat == param.opts + param.secondary_opts, param.name
        assert kind == _click_kind(param), param.name
        assert default == param.default, param.name
    arguments = [p.name for p in GET.params if p.param_type_name == "argument"]
    assert arguments == ["urls"]


def _typer_parse(args: list[str]) -> dict[str, Any] | None:
    try:
        ctx = GET.make_context("get", list(args))
    except Exception:  # click's usage errors, and Exit after --help
        return None
    params = dict(ctx.params)
    for param in GET.params:  # what typer's wrapper makes of click's values
        value = params[param.name]  # type: ignore[index]
        if isinstance(value, tuple):
            params[param.name] = list(value) or None  # type: ignore[index]
        elif param.type.name == "path" and value is not None:
            params[param.name] = Path(value)  # type: ignore[index]
    return params


VALUES = st.sampled_from([
    "0", "1", "16", "-3", "2.5", "x", "", "-", "a b", "--", "-q", "1e3", "0x10", " 7",
    "\uff11", "out/dir", "X-A: b", "rename", "inf", "1_0", "=", "-o", "--threads",
])
NAMES = st.sampled_from([*sorted({n for _, names, _, _ in GET_OPTIONS
                                  for name in names for n in name.split("/")}),
                         "--help", "--nope", "-x", "-qo"])


GOOD = {"int": st.sampled_from(["0", "1", "16", "-3", "007"]),
        "float": st.sampled_from(["2.5", "0", "-1.0", "30", ".5", "5."]),
        "path": st.sampled_from(["out", "a/b", "-", ".", "x y"]),
        "str": st.sampled_from(["rename", "image/*", "-", "a=b", "sqlite:///x.db"]),
        "list": st.sampled_from(["A: b", "sha256", "thumbnail:64", "-", "x:y=z"])}
KINDS = {n: kind for _, names, kind, _ in GET_OPTIONS
         for name in names for n in name.split("/")}


@st.composite
def argvs(draw: st.DrawFn) -> list[str]:
    """Mostly well-formed command lines (one list argument), some of them not."""
    args: list[str] = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(NAMES)
        kind = KINDS.get(name, "str")
        good = draw(st.integers(0, 9)) < 8
        value = draw(GOOD[kind] if kind in GOOD and good else VALUES)
        shape = draw(st.integers(0, 9))
        if shape == 0:
            args.append(draw(st.sampled_from(["list.txt", "-", "--"])))
        elif kind == "flag" or shape == 1:
            args.append(name)
        elif shape == 2:
            args.append(f"{name}={value}")
        elif shape == 3:
            args.append(name[:2] + value)
        else:
            args += [name, value]
    if draw(st.integers(0, 9)) < 9:
        args.insert(draw(st.integers(0, len(args))), "urls.txt")
    return args


@settings(max_examples=1500, deadline=None)
@given(argvs())
def test_fast_parse_equals_click_whenever_it_answers(args: list[str]) -> None:
    fast = parse_get(args)
    if fast is None:
        return  # typer decides: the same as without the fast path
    assert fast == _typer_parse(args), args


def test_common_command_lines_take_the_fast_path() -> None:
    for args in (["urls.txt"], ["urls.txt", "-o", "out", "--threads", "16", "--quiet"],
                 ["-", "--output=out", "-H", "A: b", "-H", "C: d", "--post", "sha256",
                  "--timeout", "2.5", "--no-force", "--json"],
                 ["u.csv", "-oout", "--download-processes", "2", "--", "-"][:-2]):
        fast = parse_get(args)
        assert fast is not None, args
        assert fast == _typer_parse(args), args


def test_help_and_mistakes_go_to_typer() -> None:
    for args in (["--help"], [], ["a", "b"], ["a", "--threads"], ["a", "--threads", "x"],
                 ["a", "--bogus"], ["a", "--quiet=1"], ["a", "-o", "--threads"]):
        assert parse_get(args) is None, args


def test_console_script_fast_path_skips_typer(tmp_path: Path) -> None:
    """A real process: `fetcher get` on a bad list never imports typer and still fails
    with the library's error and exit code 2."""
    bad = tmp_path / "list.txt"
    bad.write_text("not a url\n")
    code, loaded, err = cli_modules(["get", str(bad), "-o", str(tmp_path / "o"), "-q"],
                                    ["typer", "ast", "inspect", "ipaddress"], bare=True)
    assert code == 2
    assert "list.txt:1" in err
    assert loaded == [False, False, False, False]  # no typer; inspect, ipaddress deferred


def test_a_deferred_ipaddress_still_checks_ipv6_hosts(tmp_path: Path) -> None:
    """The entry point defers ipaddress; a list with an [IPv6] host loads it and a bad
    literal is still refused with its file and line."""
    bad = tmp_path / "list.txt"
    bad.write_text("http://[::1]:9/fine\nhttp://[::zz]/x\n")
    code, loaded, err = cli_modules(["get", str(bad), "-o", str(tmp_path / "o"), "-q"],
                                    ["ipaddress"], bare=True)
    assert code == 2
    assert "list.txt:2" in err
    assert loaded == [True]


def test_a_deferred_module_loads_on_first_use() -> None:
    """inspect and ipaddress, deferred by the entry point, are the real modules from
    their first use on, through the name any module bound before that, and from then on
    in sys.modules."""
    probe = ("import sys\n"
             "from fetcher._console import defer_unneeded\n"
             "defer_unneeded()\n"
             "import dataclasses, inspect, importlib.util\n"
             "assert 'ast' not in sys.modules\n"
             "for name in ('inspect', 'ipaddress'):\n"  # found, not loaded
             "    assert importlib.util.find_spec(name).origin.endswith(name + '.py')\n"
             "assert 'ast' not in sys.modules\n"
             "assert type(sys.modules['ipaddress']).__name__ == '_Deferred'\n"
             "@dataclasses.dataclass\n"
             "class NoDoc:\n    x: int = 1\n"  # dataclasses calls inspect.signature here
             "assert NoDoc.__doc__ == 'NoDoc(x: int = 1)', NoDoc.__doc__\n"
             "real = sys.modules['inspect']\n"
             "assert type(real).__name__ == 'module' and 'ast' in sys.modules\n"
             "assert inspect.signature is real.signature\n"
             "import urllib.parse\n"  # binds the ipaddress stub
             "assert type(sys.modules['ipaddress']).__name__ == '_Deferred'\n"
             "assert urllib.parse.urlsplit('http://[::1]:8/x').hostname == '::1'\n"
             "assert type(sys.modules['ipaddress']).__name__ == 'module'\n"
             "try:\n    urllib.parse.urlsplit('http://[::zz]/x')\n"
             "except ValueError:\n    pass\n"
             "else:\n    raise AssertionError('a bad IPv6 literal passed')\n"
             "print('ok')\n")
    python, env = bare_python()
    done = subprocess.run([*python, "-c", probe], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
