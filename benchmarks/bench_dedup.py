"""Whole-catalog matching benchmark: `dedup` from CSV to clusters, and how it grows with size.

    .venv/bin/python benchmarks/bench_dedup.py [--data DIR] [--sizes 5000,10000,20000,34250]

For each size, a random sample of whole Shopee label groups (the full catalog at 34,250) is
ingested into a fresh embedded collection (encoding included) and deduplicated with the shipped
settings (post-processing as tuned); prints where the time goes, products/s and peak memory.
Each size runs in its own process so the memory figures do not mix.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def one_size(data: Path, size: int, workdir: Path) -> dict:
    """Ingest + dedup `size` products in this process; return the timings."""
    from rich.console import Console

    from prodsearch.catalog import read_catalog
    from prodsearch.index import Index
    from prodsearch.ingest import ingest_catalog
    from prodsearch.matching.dedup import run_dedup
    from prodsearch.recipes import load_recipe

    frame = pd.read_csv(data / "shopee" / "train.csv")
    if size < len(frame):
        groups = frame["label_group"].drop_duplicates().sample(frac=1.0, random_state=0)
        sizes = frame.groupby("label_group").size()
        chosen = groups[sizes.loc[groups].cumsum().to_numpy() <= size]
        frame = frame[frame["label_group"].isin(chosen)]
    catalog_path = workdir / "catalog.csv"
    frame.to_csv(catalog_path, index=False)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    index = Index(str(workdir / "store"), "products")
    index.encoders.encode([])  # nothing to encode: model loading is counted on its own below
    for encoder in index.encoders:
        getattr(encoder, "model", None) or getattr(encoder, "network", None)
    timings["load models"] = time.perf_counter() - start
    start = time.perf_counter()
    ingest_catalog(
        index,
        read_catalog(catalog_path, load_recipe("shopee")),
        console=Console(stderr=True, quiet=True),
    )
    timings["ingest (read, encode, upsert, HNSW)"] = time.perf_counter() - start
    result = run_dedup(index)
    timings.update(result.seconds)
    start = time.perf_counter()
    result.write(workdir / "matches.csv")
    timings["write csv"] = time.perf_counter() - start
    index.close()
    return {
        "products": len(frame),
        "timings": timings,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "clusters": len(set(result.clusters.values())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--sizes", default="5000,10000,20000,34250")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory(prefix="prodsearch-dedup-") as workdir:
            print(json.dumps(one_size(args.data, args.one, Path(workdir))))
        return
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        print(f"size {size}", file=sys.stderr)
        out = subprocess.run(
            [sys.executable, __file__, "--data", str(args.data), "--one", str(size)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    stages = list(rows[-1]["timings"])
    print(
        "| products | " + " | ".join(stages) + " | total s | products/s (total) | "
        "products/s (dedup only) | peak RSS GB | clusters |"
    )
    print("|" + "---|" * (len(stages) + 6))
    for row in rows:
        t = row["timings"]
        total = sum(t.values())
        dedup_only = sum(v for k, v in t.items() if not k.startswith(("load", "ingest", "write")))
        cells = [
            f"{row['products']:,}",
            *(f"{t.get(s, 0):.1f}" for s in stages),
            f"{total:.0f}",
            f"{row['products'] / total:,.0f}",
            f"{row['products'] / dedup_only:,.0f}",
            f"{row['peak_rss_gb']:.2f}",
            f"{row['clusters']:,}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
