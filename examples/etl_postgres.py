"""ETL into PostgreSQL: a CSV of URLs with metadata -> fetch -> parse in processes ->
ParallelWriter -> SQL.

Extract: ``products.csv`` lists one JSON document per product (``url``) with the
columns a catalogue export would have (``sku``, ``category``, ``supplier``).
``fetch("products.csv", dest, threads=16)`` downloads them concurrently; the CSV's
extra columns are carried through to every record of the report.

Transform: ``parallel_map(summarise, jobs)`` parses each downloaded file in a worker
process (JSON decoding and review statistics are pure-Python CPU work) into one flat
row: title, price, review count, average stars, plus the carried metadata and the
file's SHA-256 from the report.

Load: ``ParallelWriter(dsn, table=..., key="sku", workers=2)`` COPYs the rows in
batches over two connections; every batch is an upsert on ``sku``, so running the
script again updates the same rows instead of duplicating them.

Query: average price and rating per category, straight from PostgreSQL.

No internet needed: the documents are generated and served from 127.0.0.1.

    python examples/etl_postgres.py [--products 2000]
        [--dsn postgresql://postgres@127.0.0.1:5432/test] [--table etl_products] [--drop]

``--drop`` removes the table (and the writer's bookkeeping rows for it) at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _local_server import serve_directory

from fetcher import ParallelWriter, fetch, parallel_map

CATEGORIES = ("books", "garden", "kitchen", "music", "toys")
WORDS = ("great", "fine", "broken", "fast", "slow", "value", "quality", "returned", "love")


def make_catalogue(site: Path, products: int, seed: int = 3) -> list[dict[str, str]]:
    """Write one JSON document per product under site/products; the CSV rows."""
    rng = random.Random(seed)
    (site / "products").mkdir(parents=True)
    rows = []
    for i in range(products):
        sku = f"P{i:06d}"
        doc = {
            "sku": sku,
            "title": f"{rng.choice(WORDS).title()} {rng.choice(CATEGORIES)} item {i}",
            "price_cents": rng.randint(199, 49_999),
            "reviews": [{"stars": rng.randint(1, 5),
                         "text": " ".join(rng.choices(WORDS, k=rng.randint(5, 40)))}
                        for _ in range(rng.randint(0, 60))],
        }
        (site / "products" / f"{sku}.json").write_text(json.dumps(doc))
        rows.append({"path": f"products/{sku}.json", "sku": sku,
                     "category": CATEGORIES[i % len(CATEGORIES)],
                     "supplier": f"supplier-{rng.randint(1, 40):02d}"})
    return rows


def summarise(job: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """Transform step (runs in a worker): one downloaded document -> one flat row."""
    path, meta = job
    doc = json.loads(Path(path).read_text())
    stars = [r["stars"] for r in doc["reviews"]]
    words = sum(len(r["text"].split()) for r in doc["reviews"])
    return {
        "sku": doc["sku"],
        "title": doc["title"],
        "category": meta["category"],
        "supplier": meta["supplier"],
        "price": doc["price_cents"] / 100,
        "reviews": len(stars),
        "avg_stars": sum(stars) / len(stars) if stars else None,
        "review_words": words,
        "sha256": meta["sha256"],
        "bytes": meta["bytes"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=2000)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--table", default="etl_products")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--drop", action="store_true", help="drop the table at the end")
    args = parser.parse_args()
    try:
        import psycopg
        from psycopg import sql
    except ImportError:
        print("this example needs psycopg: pip install 'fetcher[postgres]'", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        site, dest = Path(tmp) / "site", Path(tmp) / "downloads"
        catalogue = make_catalogue(site, args.products)
        with serve_directory(site, latency=0.005) as base:
            url_list = Path(tmp) / "products.csv"
            with url_list.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, ["url", "sku", "category", "supplier"])
                writer.writeheader()
                for row in catalogue:
                    writer.writerow({"url": f"{base}/{row['path']}", "sku": row["sku"],
                                     "category": row["category"], "supplier": row["supplier"]})

            t0 = time.perf_counter()
            report = fetch(url_list, dest, threads=args.threads)  # extract
            t_fetch = time.perf_counter() - t0
        if not report.ok:
            print(f"download failures: {report.failures[:3]}", file=sys.stderr)
            return 1

        t0 = time.perf_counter()
        jobs = [(str(dest / rec["path"]), rec) for rec in report.records()]
        rows = parallel_map(summarise, jobs, on_error="raise")  # transform
        t_parse = time.perf_counter() - t0

        t0 = time.perf_counter()
        with ParallelWriter(args.dsn, table=args.table, key="sku", workers=2) as out:  # load
            out.write_many(rows)
        summary = out.close()
        t_load = time.perf_counter() - t0

    print(f"extract:   fetched {report.counts['ok']} documents in {t_fetch:.2f} s")
    print(f"transform: parsed {len(rows)} documents in worker processes in {t_parse:.2f} s")
    print(f"load:      {summary.rows} rows in {summary.batches} batch(es) into {args.table} "
          f"in {t_load:.2f} s")

    table = sql.Identifier(args.table)
    with psycopg.connect(args.dsn) as conn:
        (count,) = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone() \
            or (0,)
        (ours,) = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE sku = ANY(%s)")
                               .format(table), ([r["sku"] for r in rows],)).fetchone() or (0,)
        per_category = conn.execute(sql.SQL(
            "SELECT category, count(*), round(avg(price)::numeric, 2), "
            "round(avg(avg_stars)::numeric, 2), sum(reviews) FROM {} "
            "GROUP BY category ORDER BY category").format(table)).fetchall()
        print(f"\nSELECT ... FROM {args.table} GROUP BY category   ({count} rows)")
        print(f"  {'category':<9} {'items':>5} {'avg price':>9} {'avg stars':>9} {'reviews':>8}")
        for cat, n, price, stars, reviews in per_category:
            print(f"  {cat:<9} {n:>5} {price:>9} {stars:>9} {reviews:>8}")
        if args.drop:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
            # The writer keeps one bookkeeping row per committed batch in _fetcher_ledger.
            if conn.execute("SELECT to_regclass('_fetcher_ledger')").fetchone() != (None,):
                conn.execute("DELETE FROM _fetcher_ledger WHERE target = %s", (args.table,))
            print(f"dropped {args.table}")
    if ours != args.products:
        print(f"expected {args.products} rows for this run's products, found {ours}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
