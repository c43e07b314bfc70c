"""Average efficiency per employee and month from two CSVs, computed in parallel chunks.

The scenario: ``employees.csv`` (id, name, department) and ``daily.csv`` (one row per
employee and working day: tasks done, hours worked). Efficiency for a day is tasks per
hour; the question is each employee's average efficiency per month, and each
department's.

The parallel shape is map-reduce. The daily file is read in chunks; each worker turns
its chunk into *sums and counts* per (employee, month) and returns them; the parent
adds the partial sums and counts up and divides once at the end. Workers share
nothing -- no dict or DataFrame written from many processes -- and nobody averages
averages: a month split over two chunks (or a department of employees with different
numbers of working days) would give a wrong mean. The script shows by how much, and
checks the parallel result against pandas' single-pass ``groupby().mean()``.

    python examples/employee_efficiency.py [--employees 500] [--days 730]
        [--chunk-rows 50000] [--workers N] [--out DIR]

Writes ``DIR/employees.csv``, ``DIR/daily.csv`` (generated), ``DIR/efficiency.csv``
(employee, month, average) and ``DIR/efficiency.png`` (department averages per month).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fetcher import parallel_map

DEPARTMENTS = ("engineering", "sales", "support", "operations")


def generate(out: Path, employees: int, days: int, seed: int = 7) -> tuple[Path, Path]:
    """Write employees.csv and daily.csv (weekdays, ~90% attendance); their paths."""
    rng = np.random.default_rng(seed)
    emp = pd.DataFrame({
        "employee_id": np.arange(1, employees + 1),
        "name": [f"employee-{i:05d}" for i in range(1, employees + 1)],
        "department": rng.choice(DEPARTMENTS, size=employees),
    })
    skill = rng.uniform(0.6, 1.6, size=employees)  # tasks per hour, per person
    dates = pd.bdate_range("2024-01-01", periods=days)
    ids = np.repeat(emp["employee_id"].to_numpy(), len(dates))
    when = np.tile(dates.to_numpy(), employees)
    present = rng.random(ids.size) < 0.9
    ids, when = ids[present], when[present]
    hours = rng.uniform(4.0, 10.0, size=ids.size).round(2)
    season = 1.0 + 0.15 * np.sin(pd.DatetimeIndex(when).month.to_numpy() / 12 * 2 * np.pi)
    tasks = rng.poisson(skill[ids - 1] * season * hours)
    daily = pd.DataFrame({"employee_id": ids, "date": pd.DatetimeIndex(when).strftime("%Y-%m-%d"),
                          "tasks_done": tasks, "hours": hours})
    daily = daily.sample(frac=1.0, random_state=seed)  # records arrive in no useful order
    emp_path, daily_path = out / "employees.csv", out / "daily.csv"
    emp.to_csv(emp_path, index=False)
    daily.to_csv(daily_path, index=False)
    return emp_path, daily_path


def partial_sums(chunk: pd.DataFrame) -> pd.DataFrame:
    """Map step (runs in a worker): efficiency sum and day count per (employee, month)."""
    month = chunk["date"].str.slice(0, 7)
    eff = chunk["tasks_done"] / chunk["hours"]
    frame = pd.DataFrame({"employee_id": chunk["employee_id"], "month": month, "eff": eff})
    grouped = frame.groupby(["employee_id", "month"])["eff"]
    return pd.DataFrame({"eff_sum": grouped.sum(), "days": grouped.count()})


def partial_means(chunk: pd.DataFrame) -> pd.DataFrame:
    """The tempting mistake: each chunk's *average* per (employee, month)."""
    p = partial_sums(chunk)
    return pd.DataFrame({"eff_mean": p["eff_sum"] / p["days"]})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--employees", type=int, default=500)
    parser.add_argument("--days", type=int, default=730, help="working days generated")
    parser.add_argument("--chunk-rows", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: cores)")
    parser.add_argument("--out", type=Path, default=Path("example-output/employee_efficiency"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    emp_path, daily_path = generate(args.out, args.employees, args.days)
    print(f"generated {emp_path} and {daily_path}")

    # Map: chunks are read lazily and handed to worker processes as they free up.
    t0 = time.perf_counter()
    chunks = pd.read_csv(daily_path, chunksize=args.chunk_rows)
    partials = parallel_map(partial_sums, chunks, workers=args.workers, on_error="raise")
    # Reduce: add sums and counts (an employee-month may appear in every chunk), then divide.
    totals = pd.concat(partials).groupby(level=["employee_id", "month"]).sum()
    per_employee = (totals["eff_sum"] / totals["days"]).rename("avg_efficiency")
    elapsed = time.perf_counter() - t0

    employees = pd.read_csv(emp_path)
    result = (per_employee.reset_index()
              .merge(totals["days"].reset_index(), on=["employee_id", "month"])
              .merge(employees, on="employee_id")
              [["employee_id", "name", "department", "month", "avg_efficiency", "days"]]
              .sort_values(["employee_id", "month"]))
    result.to_csv(args.out / "efficiency.csv", index=False)

    # Department averages come from the same sums and counts, not from employee averages.
    dept = (totals.reset_index().merge(employees, on="employee_id")
            .groupby(["department", "month"])[["eff_sum", "days"]].sum())
    dept_avg = (dept["eff_sum"] / dept["days"]).unstack("department")

    # Check against the one-pass answer, and show what averaging averages would do.
    daily = pd.read_csv(daily_path)
    daily["month"] = daily["date"].str.slice(0, 7)
    daily["eff"] = daily["tasks_done"] / daily["hours"]
    truth = daily.groupby(["employee_id", "month"])["eff"].mean()
    max_err = float((per_employee - truth.reindex(per_employee.index)).abs().max())
    if not np.isclose(max_err, 0.0, atol=1e-9) or len(truth) != len(per_employee):
        print(f"MISMATCH with pandas groupby().mean(): max error {max_err}", file=sys.stderr)
        return 1
    naive = (pd.concat(parallel_map(partial_means, pd.read_csv(daily_path,
                                                               chunksize=args.chunk_rows),
                                    workers=args.workers, on_error="raise"))
             .groupby(level=["employee_id", "month"])["eff_mean"].mean())
    naive_err = (naive - truth.reindex(naive.index)).abs() / truth.reindex(naive.index)
    dept_naive = (result.groupby(["department", "month"])["avg_efficiency"].mean()
                  .unstack("department"))
    dept_err = ((dept_naive - dept_avg).abs() / dept_avg).to_numpy().max()

    print(f"{len(daily):,} daily records -> {len(result):,} employee-months from "
          f"{len(partials)} chunks in {elapsed:.2f} s; "
          f"matches pandas groupby().mean() (max difference {max_err:.1e})")
    print(f"averaging the chunk averages instead would be off by up to "
          f"{100 * float(naive_err.max()):.1f}% for an employee-month, and averaging "
          f"employee averages by up to {100 * float(dept_err):.2f}% for a department-month")
    print(result.head(6).to_string(index=False))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name in dept_avg.columns:
        ax.plot(dept_avg.index, dept_avg[name], marker="o", label=name)
    ax.set_title("Average efficiency per department and month")
    ax.set_xlabel("month")
    ax.set_ylabel("efficiency (tasks per hour)")
    ax.legend(title="department")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "efficiency.png", dpi=100)
    print(f"wrote {args.out / 'efficiency.csv'} and {args.out / 'efficiency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
