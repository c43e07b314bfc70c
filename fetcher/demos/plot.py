"""Charts of demo records: PNG/SVG/PDF with matplotlib, interactive HTML with plotly.

One panel per (experiment, workload). Scaling experiments (io, cpu, pipeline) plot
speedup over sequential against the number of workers, with the ideal line
(speedup = workers) and the core count marked; the overhead experiment plots wall
time against input size on log-log axes, one line per backend, so the crossover with
the sequential line is visible. matplotlib and plotly are imported only when a chart
is drawn; matplotlib draws on a bare ``Figure`` (Agg canvas, no display needed, pyplot
untouched).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .common import Record

MATPLOTLIB_SUFFIXES = (".png", ".svg", ".pdf")
HTML_SUFFIXES = (".html", ".htm")

_TITLES = {
    "io": "I/O-bound", "cpu": "CPU-bound", "overhead": "pool overhead",
    "pipeline": "pipeline",
}
_STYLE = {  # mode -> (colour, marker)
    "sequential": ("#444444", "s"), "threads": ("#1f77b4", "o"),
    "processes": ("#d62728", "^"), "threads+processes": ("#9467bd", "D"),
    "fetcher": ("#d62728", "^"), "fetcher c=1": ("#ff9896", "v"),
    "fetcher warm": ("#8c564b", "P"), "mp.Pool": ("#2ca02c", "o"),
    "mp.Pool c=1": ("#98df8a", "x"), "futures c=1": ("#aec7e8", "<"),
    "futures chunked": ("#1f77b4", ">"), "joblib": ("#ff7f0e", "*"),
}


@dataclass
class Series:
    """One line: a mode's (x, y) points, plus CPU utilisation for hover text."""

    mode: str
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    cpu: list[float | None] = field(default_factory=list)


@dataclass
class Panel:
    """One subplot: titles, axis labels and units, log axes, its lines."""

    title: str
    xlabel: str
    ylabel: str
    kind: str  # "scaling" or "overhead"
    cores: int
    series: list[Series]
    ideal_up_to: int = 0
    ideal_capped: bool = False  # CPU-bound: ideal speedup stops at the core count

    def ideal(self) -> tuple[list[int], list[float], str]:
        """The ideal-speedup line: x values, y values, legend label."""
        xs = [x for x in (1, 2, 4, 8, 16, 32, 64, 128) if x <= max(self.ideal_up_to, 1)]
        if self.ideal_capped:
            return xs, [float(min(x, self.cores)) for x in xs], "ideal (min(workers, cores))"
        return xs, [float(x) for x in xs], "ideal (speedup = workers)"


def check_target(path: Path) -> None:
    """Fail early (ConfigError) if ``path`` has no supported suffix or its library is missing."""
    suffix = path.suffix.lower()
    if suffix in MATPLOTLIB_SUFFIXES:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"--plot {path}: needs matplotlib "
                              "(pip install 'fetcher[demo]')") from exc
    elif suffix in HTML_SUFFIXES:
        try:
            import plotly  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"--plot {path}: an interactive chart needs plotly "
                              "(pip install plotly), or use a .png file") from exc
    else:
        raise ConfigError(f"--plot {path}: use a file ending in "
                          f"{', '.join(MATPLOTLIB_SUFFIXES + HTML_SUFFIXES)}")


def panels(records: Sequence[Record]) -> list[Panel]:
    """Group records into chart panels, in the order the experiments ran."""
    keys: list[tuple[str, str]] = []
    for r in records:
        k = (r["experiment"], r["workload"])
        if k not in keys:
            keys.append(k)
    out: list[Panel] = []
    for exp, workload in keys:
        rs = [r for r in records if r["experiment"] == exp and r["workload"] == workload]
        cores = int(rs[0]["cores"])
        modes: list[str] = []
        for r in rs:
            if r["mode"] not in modes:
                modes.append(r["mode"])
        if exp == "overhead":
            series = [_series(rs, m, x="size", y="wall_s") for m in modes]
            unit = rs[0]["unit"]
            note = str(rs[0].get("note", "")).split(";")[0]
            out.append(Panel(title=f"{_TITLES.get(exp, exp)}: {workload} ({note})",
                             xlabel=f"input size ({unit}, log scale)",
                             ylabel="wall time (s, log scale)", kind="overhead",
                             cores=cores, series=series))
            continue
        series = [_series(rs, m, x="workers", y="speedup") for m in modes if m != "sequential"]
        size, unit = rs[0]["size"], rs[0]["unit"]
        top = max((int(x) for s in series for x in s.x), default=1)
        xlabel = ("download threads" if exp == "pipeline" else "workers (threads or processes)")
        out.append(Panel(title=f"{_TITLES.get(exp, exp)}: {workload} ({size:,} {unit})",
                         xlabel=f"{xlabel}, log scale", ylabel="speedup over sequential (x)",
                         kind="scaling", cores=cores, series=series, ideal_up_to=top,
                         ideal_capped=exp == "cpu"))
    return out


def _series(rs: Sequence[Record], mode: str, *, x: str, y: str) -> Series:
    pts = sorted((r for r in rs if r["mode"] == mode and r.get(y) is not None),
                 key=lambda r: r[x])
    s = Series(mode)
    for r in pts:
        s.x.append(float(r[x]))
        s.y.append(max(float(r[y]), 1e-6))  # log axes cannot show 0
        s.cpu.append(r.get("cpu_util"))
    return s


def _suptitle(records: Sequence[Record]) -> str:
    cores = records[0]["cores"] if records else "?"
    return (f"fetcher demo, measured on this machine ({cores} usable cores); "
            "CPU busy = CPU time / (wall time x cores)")


def plot(records: Sequence[Record], path: str | Path) -> Path:
    """Draw ``records`` to ``path`` (.png/.svg/.pdf or .html); returns the path."""
    target = Path(path)
    check_target(target)
    ps = panels(records)
    if not ps:
        raise ConfigError("nothing to plot: no measurements")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix.lower() in HTML_SUFFIXES:
        _plotly(ps, target, _suptitle(records))
    else:
        _matplotlib(ps, target, _suptitle(records))
    return target


def _matplotlib(ps: list[Panel], target: Path, suptitle: str) -> None:
    # A bare Figure draws with the Agg canvas and leaves pyplot's global state (and a
    # notebook's backend) alone.
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ncols = 1 if len(ps) == 1 else 2
    nrows = math.ceil(len(ps) / ncols)
    fig = Figure(figsize=(7.0 * ncols, 4.6 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, p in zip(axes.flat, ps, strict=False):
        for s in p.series:
            colour, marker = _STYLE.get(s.mode, (None, "o"))
            ax.plot(s.x, s.y, marker=marker, color=colour, label=s.mode)
        if p.kind == "scaling":
            ax.set_xscale("log", base=2)
            ax.axhline(1.0, color="#444444", linestyle=":", linewidth=1,
                       label="sequential (1x)")
            xs, ys, label = p.ideal()
            ax.plot(xs, ys, color="#999999", linestyle="--", linewidth=1, label=label)
            ax.axvline(p.cores, color="#2ca02c", linestyle="-.", linewidth=1,
                       label=f"{p.cores} cores")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            top = max([y for s in p.series for y in s.y] + [1.0])
            if p.ideal_capped:  # CPU-bound: show how far the ideal (the core count) is
                top = max(top, max(ys))
            ax.set_ylim(0, top * 1.15)
        else:
            ax.set_xscale("log")
            ax.set_yscale("log")
            sizes = sorted({x for s in p.series for x in s.x})
            ax.set_xticks(sizes)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ys = [y for s in p.series for y in s.y]
            decades = math.log10(max(ys) / min(ys)) if ys else 0.0
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if decades <= 3
                                                  else (1.0,)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(p.title, fontsize=10)
        ax.set_xlabel(p.xlabel)
        ax.set_ylabel(p.ylabel)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(ps):]:
        ax.set_visible(False)
    fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.35 / (4.6 * nrows)))
    fig.savefig(target, dpi=110)


def _plotly(ps: list[Panel], target: Path, suptitle: str) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    ncols = 1 if len(ps) == 1 else 2
    nrows = math.ceil(len(ps) / ncols)
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=[p.title for p in ps],
                        vertical_spacing=min(0.12, 0.6 / max(nrows, 1)))
    for i, p in enumerate(ps):
        row, col = i // ncols + 1, i % ncols + 1
        group = p.title.split(" (")[0]
        for s in p.series:
            colour, _ = _STYLE.get(s.mode, (None, "o"))
            cpu = ["n/a" if c is None else f"{100 * c:.0f}%" for c in s.cpu]
            fig.add_trace(go.Scatter(
                x=s.x, y=s.y, mode="lines+markers", name=f"{group}: {s.mode}",
                legendgroup=group, line={"color": colour}, customdata=cpu,
                hovertemplate=(f"{s.mode}<br>x=%{{x}}<br>y=%{{y:.3g}}"
                               "<br>CPU busy %{customdata}<extra></extra>")),
                row=row, col=col)
        if p.kind == "scaling":
            xs, ys, label = p.ideal()
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=f"{group}: {label}",
                                     legendgroup=group, line={"dash": "dash", "color": "#999"}),
                          row=row, col=col)
            # reference lines as traces: add_vline mis-places annotations on log axes
            top = max([y for s in p.series for y in s.y] + ys + [1.0])
            fig.add_trace(go.Scatter(x=[xs[0], xs[-1]], y=[1.0, 1.0], mode="lines",
                                     name=f"{group}: sequential (1x)", legendgroup=group,
                                     line={"dash": "dot", "color": "#444"}), row=row, col=col)
            fig.add_trace(go.Scatter(x=[p.cores, p.cores], y=[0.0, top], mode="lines",
                                     name=f"{group}: {p.cores} cores", legendgroup=group,
                                     line={"dash": "dashdot", "color": "#2ca02c"}),
                          row=row, col=col)
            fig.update_xaxes(type="log", title_text=p.xlabel, row=row, col=col)
        else:
            fig.update_xaxes(type="log", title_text=p.xlabel, row=row, col=col)
            fig.update_yaxes(type="log", row=row, col=col)
        fig.update_yaxes(title_text=p.ylabel, row=row, col=col)
    fig.update_layout(title_text=suptitle, height=420 * nrows, width=620 * ncols,
                      legend_title_text="experiment: mode")
    fig.write_html(str(target), include_plotlyjs=True, full_html=True)
