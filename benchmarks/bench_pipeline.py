"""Pipeline benchmark: ingest rates, query latency, Edge vs qdrant-client local, memory, eval F1.

    .venv/bin/python benchmarks/bench_pipeline.py [--data ../shared/data] [--skip-eval]

Prints markdown tables on stdout (progress on stderr). Data: the Shopee `test` split (7,061
titles + image_phash) and the Grocery Store packaged-product photos (1,776 JPEGs).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
from rich.console import Console

from prodsearch.catalog import Catalog, read_catalog
from prodsearch.encoders import EncoderSet
from prodsearch.eval.report import format_table
from prodsearch.eval.shopee import run_evaluation
from prodsearch.index import Index
from prodsearch.ingest import ingest_catalog
from prodsearch.query import MatchOptions
from prodsearch.recipes import load_recipe
from prodsearch.settings import Settings
from prodsearch.store import PointRecord, open_store

REPO = Path(__file__).resolve().parents[1]
QUIET = Console(stderr=True, quiet=True)
N_QUERIES = 500


def rss_gb() -> float:
    """Current resident memory of this process in GB."""
    return psutil.Process().memory_info().rss / 1e9


def percentiles(samples_ms: Sequence[float]) -> str:
    """'p50 / p95' of millisecond samples."""
    q = statistics.quantiles(samples_ms, n=100)
    return f"{statistics.median(samples_ms):.2f} / {q[94]:.2f}"


def timed(call: Callable[[], object], repeat: int) -> list[float]:
    """Milliseconds per call over `repeat` calls (after one warm-up call)."""
    call()
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        out.append((time.perf_counter() - start) * 1000)
    return out


def shopee_test_catalog(data: Path, workdir: Path) -> Path:
    """Write the Shopee test split as its own catalog CSV."""
    frame = pd.read_csv(data / "shopee" / "train.csv").merge(
        pd.read_csv(data / "shopee" / "split.csv"), on="posting_id"
    )
    path = workdir / "shopee-test.csv"
    frame[frame["split"] == "test"].drop(columns="split").to_csv(path, index=False)
    return path


def grocery_catalog(data: Path, workdir: Path) -> Path:
    """Write the packaged-product photos (all splits + catalogue images) as a catalog CSV."""
    frame = pd.read_csv(data / "grocery_store" / "images.csv")
    frame = frame[frame["category"] == "Packages"]
    out = pd.DataFrame(
        {
            "id": "gs-" + frame["id"].astype(str),
            "title": frame["title"].fillna(""),
            "image": frame["image"],
            "label_group": frame["label_group"],
        }
    )
    path = workdir / "grocery.csv"
    out.to_csv(path, index=False)
    return path


def bench_ingest(label: str, index: Index, catalog: Catalog, rows: list[list[str]]) -> None:
    before = rss_gb()
    start = time.perf_counter()
    report = ingest_catalog(index, catalog, console=QUIET)
    seconds = time.perf_counter() - start
    rows.append(
        [
            label,
            f"{report.upserted:,}",
            f"{seconds:.1f}",
            f"{report.upserted / seconds:,.0f}",
            f"{rss_gb() - before:+.2f}",
        ]
    )


def bench_upsert_backends(index: Index, rows: list[list[str]], workdir: Path) -> dict[str, Index]:
    """Copy the encoded collection into each backend (no re-encoding) and time the upserts."""
    stored, offset = [], None
    while True:
        page, offset = index.store.scroll(index.collection, offset, 1000, with_vectors=True)
        stored += page
        if offset is None:
            break
    points = [PointRecord(p.point_id, p.vectors, p.payload) for p in stored]
    indexes = {}
    for name, location in (
        ("Qdrant Edge", str(workdir / "edge-copy")),
        ("qdrant-client local", ":memory:"),
    ):
        copy = Index(open_store(location), "products", index.settings, index.encoders)
        copy.ensure_collection()
        start = time.perf_counter()
        for i in range(0, len(points), 256):
            copy.store.upsert("products", points[i : i + 256])
        upserted = time.perf_counter() - start
        start = time.perf_counter()
        copy.store.build_index("products")
        built = time.perf_counter() - start
        rows.append([name, f"{len(points):,}", f"{len(points) / upserted:,.0f}", f"{built:.1f}"])
        indexes[name] = copy
    return indexes


def bench_queries(indexes: dict[str, Index], frame: pd.DataFrame, rows: list[list[str]]) -> None:
    rng = np.random.default_rng(0)
    picks = frame.iloc[rng.choice(len(frame), N_QUERIES, replace=False)]
    titles, hashes = picks["title"].tolist(), picks["image_phash"].tolist()
    any_index = next(iter(indexes.values()))
    vectors = [any_index.encode_query(t, phash=h) for t, h in zip(titles, hashes, strict=True)]
    batches = [vectors[i : i + 32] for i in range(0, N_QUERIES - 31, 32)]
    for name, index in indexes.items():
        queries = iter(vectors * 4)
        fused = [index.fused_request(v, MatchOptions(fusion="rrf")) for v in vectors]
        fused_iter = iter(fused * 4)
        engine = timed(
            lambda i=index, f=fused_iter: i.store.query_batch(i.collection, [next(f)]),
            N_QUERIES if name == "Qdrant Edge" else 100,
        )
        single = timed(
            lambda i=index, q=queries: i.match_vectors([next(q)]),
            N_QUERIES if name == "Qdrant Edge" else 100,
        )
        batch_iter = iter(batches * 4)
        batch = timed(lambda i=index, b=batch_iter: i.match_vectors(next(b)), len(batches))
        rows.append([name, "engine fused query only, 1/call", percentiles(engine)])
        rows.append([name, "match (fused + per-modality scores), 1/call", percentiles(single)])
        rows.append([name, "match, 32/call: ms per call", percentiles(batch)])
        rows.append([name, "match, 32/call: ms per query", percentiles([b / 32 for b in batch])])
    index = indexes["Qdrant Edge"]
    title_iter = iter(titles * 4)
    with_encoding = timed(lambda: index.match(next(title_iter)), 200)
    title_batches = iter([titles[i : i + 32] for i in range(0, N_QUERIES - 31, 32)] * 4)

    def encode_and_match() -> None:
        chunk = next(title_batches)
        index.match_vectors(index.encoders.encode([_input(t) for t in chunk]))

    batch_with_encoding = timed(encode_and_match, len(batches))
    rows.append(
        ["Qdrant Edge", "title -> match incl. encoding, 1/call", percentiles(with_encoding)]
    )
    rows.append(
        [
            "Qdrant Edge",
            "titles -> match incl. encoding, 32/call: ms per query",
            percentiles([b / 32 for b in batch_with_encoding]),
        ]
    )


def _input(title: str):
    from prodsearch.encoders import EncoderInput

    return EncoderInput(title=title)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--skip-eval", action="store_true")
    args = parser.parse_args()
    log = Console(stderr=True)
    workdir = Path(tempfile.mkdtemp(prefix="prodsearch-bench-"))
    settings = Settings()
    encoders = EncoderSet.default()
    ingest_rows: list[list[str]] = []

    log.print("ingest: Shopee test split, titles + phash")
    shopee_csv = shopee_test_catalog(args.data, workdir)
    shopee = read_catalog(shopee_csv, load_recipe("shopee"))
    encoders["text"].encode_titles(["warm up"])  # model load is not ingest throughput
    edge = Index(str(workdir / "edge"), "products", settings, encoders)
    bench_ingest("Shopee test, titles + phash (Edge)", edge, shopee, ingest_rows)

    log.print("ingest: grocery packaged-product photos")
    grocery = read_catalog(
        grocery_catalog(args.data, workdir),
        load_recipe("generic"),
        images_dir=args.data / "grocery_store",
    )
    encoders["image"].encode_images([])
    with Index(str(workdir / "grocery"), "products", settings, encoders) as photos:
        bench_ingest(
            "Grocery Packages, images + phash (+ titles on 31)", photos, grocery, ingest_rows
        )

    log.print("upsert + index build per backend")
    backend_rows: list[list[str]] = []
    indexes = bench_upsert_backends(edge, backend_rows, workdir)
    log.print("query latency")
    query_rows: list[list[str]] = []
    bench_queries(indexes, pd.read_csv(shopee_csv), query_rows)

    print("## Ingest (end to end: read, decode, encode, upsert, HNSW build)\n")
    print(table(["catalog", "products", "seconds", "products/s", "RSS growth GB"], ingest_rows))
    print("\n## Upsert of encoded vectors and index build, same 7,061 products\n")
    print(table(["backend", "points", "upsert points/s", "index build s"], backend_rows))
    print(
        f"\n## Query latency on the 7,061-product Shopee test catalog ({N_QUERIES} queries, ms)\n"
    )
    print(table(["backend", "what", "p50 / p95 ms"], query_rows))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"\nPeak RSS of the benchmark process: {peak:.2f} GB\n")
    sys.stdout.flush()
    edge.close()
    for index in indexes.values():
        index.close()
    if not args.skip_eval:
        log.print("eval on Shopee (tune on val, report on test)")
        result = run_evaluation(
            args.data / "shopee" / "train.csv",
            args.data / "shopee" / "split.csv",
            encoders=encoders,
            console=QUIET,
        )
        print("## Shopee F1 (thresholds and fusion tuned on val, reported on test)\n")
        rows = [
            [
                m.method,
                f"{m.val.f1:.4f}",
                f"{m.test.precision:.4f}",
                f"{m.test.recall:.4f}",
                f"{m.test.f1:.4f}",
            ]
            for m in result.methods
        ]
        print(table(["method", "val F1", "test P", "test R", "test F1"], rows))
        Console(stderr=True).print(format_table(result))


if __name__ == "__main__":
    main()
