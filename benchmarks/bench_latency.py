"""match() latency on a 34k-product catalog, encoding included, with a per-stage breakdown.

    .venv/bin/python benchmarks/bench_latency.py [--data ../shared/data] [--queries 300]

The catalog: all 34,250 Shopee rows (titles, sparse chars, phash), ingested through
`ingest_catalog` with the default (fine-tuned, ONNX) encoders, plus an `image` vector on every
product. Only 33 Shopee photos exist here, so the image vectors are those of the 5,502 real
Grocery Store photos, encoded once and dealt round-robin (each photo's vector on ~6 products):
the image HNSW graph is full-size, which is what the query time depends on.

Queries, one per call, as a user calls `Index.match`: a Shopee title (different titles each
call, so no cache helps), and the same title plus a Grocery Store `test` photo given as a file
path (read, decoded, phash, crop, encode). The stage table splits one call into its parts:
title encoders (MiniLM + sparse chars), image (decode + phash + crop + Lite0), and the engine
part (`match_vectors`: the fused query plus per-modality scores). Prints markdown on stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from bench_pipeline import QUIET, table
from rich.console import Console

from prodsearch.catalog import read_catalog
from prodsearch.encoders import EncoderInput, EncoderSet, compute_phash
from prodsearch.images import load_image
from prodsearch.index import Index, Product
from prodsearch.ingest import ingest_catalog
from prodsearch.recipes import load_recipe
from prodsearch.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def quantiles(samples_ms: Sequence[float]) -> list[str]:
    """p50, p95, p99 and max of millisecond samples, formatted."""
    values = np.percentile(samples_ms, [50, 95, 99, 100])
    return [f"{v:.1f}" for v in values]


def timed_each(call: Callable[[int], object], n: int) -> list[float]:
    """Milliseconds of call(i) for i in range(n), after two warm-up calls."""
    call(0)
    call(1)
    out = []
    for i in range(n):
        start = time.perf_counter()
        call(i)
        out.append((time.perf_counter() - start) * 1000)
    return out


def shopee_catalog(data: Path, workdir: Path, rows: int | None) -> Path:
    """Write the whole Shopee catalog (34,250 rows; or its first `rows`) as a catalog CSV."""
    path = workdir / "shopee-all.csv"
    frame = pd.read_csv(data / "shopee" / "train.csv").drop(columns=["image"])
    frame.head(rows).to_csv(path, index=False)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--rows", type=int, default=None, help="only the first N Shopee rows")
    args = parser.parse_args()
    log = Console(stderr=True)
    workdir = Path(tempfile.mkdtemp(prefix="prodsearch-bench-latency-"))
    encoders = EncoderSet.default()
    frame = pd.read_csv(args.data / "shopee" / "train.csv")
    catalog = read_catalog(shopee_catalog(args.data, workdir, args.rows), load_recipe("shopee"))
    grocery = pd.read_csv(args.data / "grocery_store" / "images.csv")
    photos = [args.data / "grocery_store" / p for p in grocery["image"]]
    test_photos = [
        args.data / "grocery_store" / p for p in grocery.loc[grocery["split"] == "test", "image"]
    ]

    with Index(str(workdir / "store"), "products", Settings(), encoders) as index:
        log.print(f"ingest {len(catalog.rows):,} Shopee rows")
        start = time.perf_counter()
        ingest_catalog(index, catalog, console=QUIET)
        log.print(f"  {time.perf_counter() - start:.0f} s; image vectors for every product")
        image_vectors = encode_photos(encoders, photos)
        attach_images(index, [r.product_id for r in catalog.rows], image_vectors)

        rng = np.random.default_rng(0)
        titles = frame["title"].iloc[rng.permutation(len(frame))[: args.queries + 2]].tolist()
        queries = [test_photos[i % len(test_photos)] for i in rng.permutation(len(test_photos))]
        log.print("timing")
        calls = {
            "title": timed_each(lambda i: index.match(titles[i]), args.queries),
            "title + image (file path)": timed_each(
                lambda i: index.match(titles[i], image=queries[i]), args.queries
            ),
        }
        stages = stage_times(index, titles, queries, args.queries)
        count = index.count()

    load = os.getloadavg()[0]
    print(
        f"\n## match() on {count:,} products, one query per call, encoding included "
        f"(ms; {args.queries} calls each; load average {load:.1f} at the end)\n"
    )
    print(
        table(["query", "p50", "p95", "p99", "max"], [[k, *quantiles(v)] for k, v in calls.items()])
    )
    print("\n### Where one call's time goes (ms)\n")
    print(
        table(
            ["stage", "p50", "p95", "p99", "max"], [[k, *quantiles(v)] for k, v in stages.items()]
        )
    )


def encode_photos(encoders: EncoderSet, photos: Sequence[Path]) -> list[np.ndarray]:
    """Return the image vectors of `photos` (decoded and cropped as ingest does)."""
    encoder = encoders["image"]
    out: list[np.ndarray] = []
    for start in range(0, len(photos), 64):
        chunk = [EncoderInput(image=load_image(p)) for p in photos[start : start + 64]]
        out += [np.asarray(v) for v in encoder.encode(encoder.prepare(chunk))]
    return out


def attach_images(
    index: Index, product_ids: Sequence[str], image_vectors: Sequence[np.ndarray]
) -> None:
    """Re-upsert every product with its stored vectors plus an image vector (round-robin)."""
    for start in range(0, len(product_ids), 512):
        ids = product_ids[start : start + 512]
        stored = {p.product_id: p for p in index.products(ids, with_vectors=True)}
        products = []
        for offset, product_id in enumerate(ids):
            product = stored[product_id]
            vectors = dict(product.vectors)
            vectors["image"] = image_vectors[(start + offset) % len(image_vectors)]
            products.append(Product(product_id, product.payload, vectors))
        index.upsert(products)
    index.build()


def stage_times(
    index: Index, titles: Sequence[str], photos: Sequence[Path], n: int
) -> dict[str, list[float]]:
    """Milliseconds per stage of a title + image call."""
    encoders = index.encoders
    text, chars, image = (encoders[m] for m in ("text", "chars", "image"))
    decoded = [load_image(p) for p in photos[: n + 2]]
    vectors = [index.encode_query(titles[i], image=decoded[i]) for i in range(n + 2)]
    return {
        "text encoder (MiniLM, 1 title)": timed_each(
            lambda i: text.encode([EncoderInput(title=titles[i])]), n
        ),
        "sparse chars (1 title)": timed_each(
            lambda i: chars.encode([EncoderInput(title=titles[i])]), n
        ),
        "image: read + decode": timed_each(lambda i: load_image(photos[i]), n),
        "image: phash": timed_each(lambda i: compute_phash(decoded[i]), n),
        "image: crop + Lite0": timed_each(
            lambda i: image.encode(image.prepare([EncoderInput(image=decoded[i])])), n
        ),
        "engine: fused query + per-modality scores": timed_each(
            lambda i: index.match_vectors([vectors[i]]), n
        ),
    }


if __name__ == "__main__":
    sys.exit(main())
