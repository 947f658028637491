"""Ingest benchmark: sequential vs pipelined ingest (reader thread), per backend, one run.

    .venv/bin/python benchmarks/bench_ingest.py [--data ../shared/data] [--rows 5000] [--no-torch]
        [--no-photos] [--all] [--pipelined-only]

Prints a markdown table on stdout (progress on stderr): products/s end to end (read, decode,
encode, upsert into a fresh Qdrant Edge store, HNSW build) for a slice of the Shopee `test`
split (titles + image_phash; `--all`: of all 34,250 rows) and the Grocery Store packaged-product
photos (1,776 JPEGs), each beside the text encoder's own throughput on the same titles, measured
in the same run. The encoders are loaded and their ONNX files built before any timing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from bench_pipeline import QUIET, grocery_catalog, shopee_test_catalog, table
from rich.console import Console

from prodsearch.catalog import Catalog, read_catalog
from prodsearch.encoders import EncoderInput, EncoderSet, InferenceOptions
from prodsearch.index import Index
from prodsearch.ingest import ingest_catalog
from prodsearch.recipes import load_recipe
from prodsearch.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def warm(encoders: EncoderSet) -> None:
    """Load every encoder (and build its ONNX file) so ingest timings exclude it."""
    from PIL import Image

    encoders.encode([EncoderInput(title="warm up", image=Image.new("RGB", (256, 256)))])


def text_encoder_rate(encoders: EncoderSet, catalog: Catalog, batch: int) -> float | None:
    """Titles/s of the text encoder alone on the catalog's titles, in ingest's batches: the
    baseline ingest is held to (None for a catalog without titles)."""
    titles = [r.title for r in catalog.rows if r.title]
    if not titles:
        return None
    start = time.perf_counter()
    for first in range(0, len(titles), batch):
        encoders["text"].encode([EncoderInput(title=t) for t in titles[first : first + batch]])
    return len(titles) / (time.perf_counter() - start)


def bench(
    label: str,
    backend: str,
    encoders: EncoderSet,
    catalog: Catalog,
    workdir: Path,
    modes: tuple[bool, ...] = (False, True),
) -> list[str]:
    """Ingest `catalog` sequentially and pipelined into fresh stores; one table row each, beside
    the text encoder's own throughput measured just before and just after that ingest (on a
    shared machine the load moves: the ratio is to their mean)."""
    rows = []
    for pipelined in modes:
        before = text_encoder_rate(encoders, catalog, Settings().batch_size)
        store = workdir / f"{label}-{backend}-{pipelined}".replace(" ", "_")
        with Index(str(store), "products", Settings(), encoders) as index:
            start = time.perf_counter()
            report = ingest_catalog(index, catalog, console=QUIET, pipelined=pipelined)
            seconds = time.perf_counter() - start
        after = text_encoder_rate(encoders, catalog, Settings().batch_size)
        rate = report.upserted / seconds
        text = (before + after) / 2 if before and after else None
        rows.append(
            [
                label,
                backend,
                "pipelined" if pipelined else "sequential",
                f"{report.upserted:,}",
                f"{seconds:.1f}",
                f"{rate:,.0f}",
                f"{before:,.0f} / {after:,.0f}" if text else "-",
                f"{rate / text:.0%}" if text else "-",
            ]
        )
    return rows


def cpu_model() -> str:
    """The CPU model (/proc/cpuinfo) and the core count."""
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        model = next(
            (ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?"
        )
    return f"{model}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--photos", type=int, default=None, help="only the first N photos")
    parser.add_argument("--no-torch", action="store_true", help="ONNX Runtime only")
    parser.add_argument("--no-photos", action="store_true", help="Shopee titles only")
    parser.add_argument("--all", action="store_true", help="all 34,250 Shopee rows, not test")
    parser.add_argument("--pipelined-only", action="store_true", help="skip the sequential ingest")
    args = parser.parse_args()
    log = Console(stderr=True)
    workdir = Path(tempfile.mkdtemp(prefix="prodsearch-bench-ingest-"))
    load_before = os.getloadavg()[0]

    shopee_csv = shopee_test_catalog(args.data, workdir)
    if args.all:
        pd.read_csv(args.data / "shopee" / "train.csv").to_csv(shopee_csv, index=False)
    pd.read_csv(shopee_csv).head(args.rows).to_csv(shopee_csv, index=False)
    shopee_label = f"Shopee {'train.csv' if args.all else 'test'}, first {args.rows:,} rows"
    grocery_csv = grocery_catalog(args.data, workdir)
    pd.read_csv(grocery_csv).head(args.photos).to_csv(grocery_csv, index=False)
    catalogs = {
        f"{shopee_label} (titles + phash)": read_catalog(shopee_csv, load_recipe("shopee")),
        "Grocery Packages photos (images + phash)": read_catalog(
            grocery_csv,
            load_recipe("generic"),
            images_dir=args.data / "grocery_store",
        ),
    }
    if args.no_photos:
        catalogs.popitem()
    backends = ["onnx"] if args.no_torch else ["onnx", "torch"]
    rows = []
    for backend in backends:
        encoders = EncoderSet.default(inference=InferenceOptions(backend=backend))  # type: ignore[arg-type]
        warm(encoders)
        for label, catalog in catalogs.items():
            log.print(f"ingest: {label}, {backend}")
            modes = (True,) if args.pipelined_only else (False, True)
            rows += bench(label, backend, encoders, catalog, workdir, modes)

    print(
        f"## Ingest, sequential vs pipelined (end to end into Qdrant Edge; {cpu_model()}; load "
        f"average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)\n"
    )
    header = ["catalog", "backend", "ingest", "products", "seconds", "products/s"]
    header += ["text encoder alone before / after, titles/s", "ingest / text encoder (mean)"]
    print(table(header, sorted(rows, key=lambda r: (r[0], r[1] != "onnx"))))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
