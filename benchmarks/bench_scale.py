"""Scale benchmark of the embedded engine: build, size and fused-query latency/recall at N points.

    nice -n 19 .venv/bin/python benchmarks/bench_scale.py [--n 1000000] [--queries 200]
        [--datatype float16|float32] [--ef default,64,128,256,auto] [--batch 1000] [--seed 0]
        [--dir /tmp/somewhere (kept; default: a temporary directory, removed)]
    nice -n 19 .venv/bin/python benchmarks/bench_scale.py --compare [--n 20000]
        [--sparse-query-terms 16] [--sparse-candidates 200]

`--compare` prints both sides of the two settings' claims from one run: the same points built
into a float32 and a float16 collection, each queried with chars searched by the whole query and
cut to its `--sparse-query-terms` heaviest terms (default 16); recall@10 of every row is against
one reference (the float32 collection's exact answer to the whole query), so the rows compare.

Synthetic products with the real vectors' dimensions and structure (as in QDRANT.md, "Scale"):
N/4 products with 4 near-duplicate variants each, in 2,000 topic groups.
- `text`: 384-d unit vectors; a product is its topic centre plus as much noise (cosine ~0.5 between
  products of a topic), a variant adds noise on that (cosine ~0.86 between two variants);
- `chars`: sparse hashed character 3-grams, drawn from a Zipf-distributed vocabulary of 30,000
  3-grams (12 from the product's topic, 72 of its own, fewer once repeats merge; a variant
  drops ~15% and adds 7 typo grams: ~58 non-zeros), values normalised as the chars encoder
  does (sqrt(idf) / norm);
- `phash`: 64 bits as +-1/8 (Dot); a variant flips 3 bits of its product's hash.
Each query is a new, 5th variant of a random product (so its 4 variants are the true matches).

The data is generated batch by batch (seeded), upserted through prodsearch's EdgeStore, then one
`build_index` (HNSW, blocking). Queries are the FusedQuery that `Index.match` builds (one
prefetch per modality with the default thresholds, RRF k=2, top 10; built by Index itself), run
through `Store.query_batch` one at a time; recall@10 is against the same query with
`exact=True` (a returned point counts when it is in the exact top 10 or ties with its 10th
fused score). `match` is the whole `Index.match_vectors` path (the fused query plus the exact
per-modality rescoring of the hits). Prints a markdown table on stdout, progress on stderr.
Set RAYON_NUM_THREADS=1 (the default here) to keep the engine on one thread.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before the engine loads: one thread
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scale_catalog import MANIFEST, VARIANTS, Catalog, make_queries  # noqa: E402

from prodsearch.encoders import EncoderSet  # noqa: E402
from prodsearch.index import Index  # noqa: E402
from prodsearch.settings import Settings  # noqa: E402
from prodsearch.store import FusedQuery, Hit  # noqa: E402
from prodsearch.store.edge import EdgeStore  # noqa: E402

COLLECTION = "products"


def log(message: str) -> None:
    """Progress on stderr."""
    print(message, file=sys.stderr, flush=True)


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def disk_gb(path: Path) -> float:
    """Disk space allocated under `path`, in GB (as `du`: the engine preallocates sparse files)."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file()) / 1e9


def percentiles(times: Sequence[float]) -> tuple[float, float, float]:
    """p50 / p95 / p99 in ms."""
    p50, p95, p99 = np.percentile(np.asarray(times) * 1e3, [50, 95, 99])
    return float(p50), float(p95), float(p99)


def timed_queries(
    store: EdgeStore, queries: list[FusedQuery]
) -> tuple[list[float], list[list[Hit]]]:
    """Run each query alone after 20 warm-up calls (the first run after opening also pages the
    store in); return seconds per query and the hits."""
    for q in queries[:20]:
        store.query_batch(COLLECTION, [q])
    times, results = [], []
    for q in queries:
        started = time.perf_counter()
        results.append(store.query_batch(COLLECTION, [q])[0])
        times.append(time.perf_counter() - started)
    return times, results


def recall_at_10(approx: list[Hit], exact: list[Hit], k: int = 10) -> float | None:
    """Share of the exact top k found; a point tying with the exact kth fused score counts."""
    top = exact[:k]
    if not top:
        return None
    kth = top[-1].score
    accepted = {h.point_id for h in top} | {
        h.point_id for h in exact if abs(h.score - kth) <= 1e-6 * max(1.0, abs(kth))
    }
    return sum(h.point_id in accepted for h in approx[:k]) / len(top)


def near_dups_found(results: list[list[Hit]], truth: list[set[str]]) -> float:
    """Mean share of each query's 4 true variants among its hits."""
    return float(
        np.mean(
            [
                len(t & {h.point_id for h in a}) / VARIANTS
                for a, t in zip(results, truth, strict=True)
            ]
        )
    )


def build(
    store: EdgeStore, catalog: Catalog, batches: int, root: Path
) -> tuple[float, float, float, float]:
    """Upsert every batch, then build the index; return upsert seconds, build seconds, peak RSS
    (GB) and disk size (GB)."""
    upsert_time, t_generate = 0.0, time.perf_counter()
    n = 0
    store.create_collection(COLLECTION, MANIFEST)
    for b in range(batches):
        points = catalog.batch(b)
        started = time.perf_counter()
        store.upsert(COLLECTION, points)
        upsert_time += time.perf_counter() - started
        n += len(points)
        if (b + 1) % max(1, batches // 20) == 0:
            log(f"  upserted {n:,} ({n / upsert_time:,.0f}/s)")
    generate_time = time.perf_counter() - t_generate - upsert_time
    log(f"upsert {n / upsert_time:,.0f} points/s (+{generate_time:.0f} s generating)")
    started = time.perf_counter()
    store.build_index(COLLECTION)
    build_s = time.perf_counter() - started
    log(f"build_index {build_s:.0f} s, peak RSS {peak_rss_gb():.2f} GB")
    return upsert_time, build_s, peak_rss_gb(), disk_gb(root)


def run(args: argparse.Namespace) -> None:
    per_batch = args.batch // VARIANTS
    batches = max(1, args.n // (per_batch * VARIANTS))
    n = batches * per_batch * VARIANTS
    catalog = Catalog(args.seed, per_batch)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_scale_"))
    log(f"N={n:,} datatype={args.datatype} store={root}")
    rss_start = peak_rss_gb()
    store = EdgeStore(root, dense_datatype=args.datatype)
    try:
        if store.has_collection(COLLECTION):
            # --dir of an earlier run: its build figures were printed then; time queries only.
            log(f"reusing the store in {root} (same --n, --batch, --seed as when it was built)")
            upsert_time = build_s = rss_build = size = float("nan")
        else:
            upsert_time, build_s, rss_build, size = build(store, catalog, batches, root)

        queries, truth = make_queries(catalog, args.seed, args.queries, batches)

        settings = Settings(
            sparse_query_terms=args.sparse_query_terms, sparse_candidates=args.sparse_candidates
        )
        base = Index(store, COLLECTION, settings, EncoderSet({}))
        base.check_encoders()

        def fused(index: Index) -> list[FusedQuery]:
            return [index.fused_request(q) for q in queries]

        exact_queries = [
            dataclasses.replace(q, exact=True, limit=q.limit + 40) for q in fused(base)
        ]
        started = time.perf_counter()
        exact = [store.query_batch(COLLECTION, [q])[0] for q in exact_queries]
        exact_ms = (time.perf_counter() - started) / len(exact) * 1e3
        log(f"exact fused: {exact_ms:.0f} ms/query")

        rows = []
        for ef in args.ef:
            # auto: prodsearch's settings (hnsw_ef_large from 500k points); default: the engine's
            index = (
                base
                if ef == "auto"
                else Index(
                    store,
                    COLLECTION,
                    settings.model_copy(
                        update={
                            "hnsw_ef": None if ef == "default" else int(ef),
                            "hnsw_ef_large": None,
                        }
                    ),
                    EncoderSet({}),
                )
            )
            times, results = timed_queries(store, fused(index))
            match_times = []
            for q in queries:
                started = time.perf_counter()
                index.match_vectors([q])
                match_times.append(time.perf_counter() - started)
            recalls = [
                r
                for a, e in zip(results, exact, strict=True)
                if (r := recall_at_10(a, e)) is not None
            ]
            dups = near_dups_found(results, truth)
            rows.append(
                (
                    ef,
                    *percentiles(times),
                    *percentiles(match_times)[:2],
                    float(np.mean(recalls)),
                    float(dups),
                )
            )
            log(f"hnsw_ef={ef}: p95 {rows[-1][2]:.2f} ms, recall@10 {rows[-1][6]:.4f}")
        modality_rows = []
        for modality in MANIFEST.vectors:
            alone = [base.fused_request({modality: q[modality]}) for q in queries]
            times, _ = timed_queries(store, alone)
            modality_rows.append((modality, *percentiles(times)))
            log(f"{modality} alone: p95 {modality_rows[-1][2]:.2f} ms")
        rss_end = peak_rss_gb()
    finally:
        store.close()
        size_closed = disk_gb(root)
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    sparse = (
        f"chars candidates from the query's {args.sparse_query_terms} heaviest terms "
        f"(top {args.sparse_candidates}), rescored with the whole query"
        if args.sparse_query_terms
        else "chars searched with the whole query"
    )
    print(f"### bench_scale: N={n:,}, dense datatype {args.datatype}; {sparse}\n")
    print(
        f"upsert {n / upsert_time:,.0f} points/s (batches of {per_batch * VARIANTS}); "
        f"build_index {build_s:.1f} s; disk {size:.2f} GB open after the build, "
        f"{size_closed:.2f} GB closed; peak RSS {rss_build:.2f} GB after the "
        f"build, {rss_end:.2f} GB at the end (start {rss_start:.2f} GB); exact fused query "
        f"{exact_ms:.1f} ms; RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS')}\n"
    )
    print(
        "| hnsw_ef | fused p50 / p95 / p99 ms | match p50 / p95 ms | recall@10 fused vs exact "
        "| 4 near-dups found |"
    )
    print("|---|---|---|---|---|")
    for ef, p50, p95, p99, m50, m95, recall, dups in rows:
        print(
            f"| {ef} | {p50:.2f} / {p95:.2f} / {p99:.2f} | {m50:.2f} / {m95:.2f} "
            f"| {recall:.4f} | {dups:.3f} |"
        )
    print(
        "\nWhere a fused query's time goes: each modality's prefetch alone (prodsearch's ef, "
        "its threshold and prefetch limit)\n"
    )
    print("| modality | p50 / p95 / p99 ms |")
    print("|---|---|")
    for modality, p50, p95, p99 in modality_rows:
        print(f"| {modality} | {p50:.2f} / {p95:.2f} / {p99:.2f} |")
    passing = [r for r in rows if r[6] >= 0.99]
    best = min(passing, key=lambda r: r[2]) if passing else None
    verdict = (
        f"lowest p95 with recall@10 >= 0.99: hnsw_ef={best[0]} ({best[2]:.2f} ms; bar: <= 8 ms)"
        if best
        else "no hnsw_ef reached recall@10 >= 0.99"
    )
    print(f"\n{verdict}")


def interleaved(
    stores: dict[str, EdgeStore], requests: dict[tuple, list[FusedQuery]]
) -> tuple[dict[tuple, list[float]], dict[tuple, list[list[Hit]]]]:
    """Time every configuration's i-th request one after the other, for each i (after 20
    warm-up rounds): the machine's load drifts the same way for every side of a comparison.
    `requests` are keyed (datatype, ...); returns seconds and hits under the same keys."""
    times: dict[tuple, list[float]] = {key: [] for key in requests}
    results: dict[tuple, list[list[Hit]]] = {key: [] for key in requests}
    rounds = len(next(iter(requests.values())))
    for i in range(min(20, rounds)):
        for key, queries in requests.items():
            stores[key[0]].query_batch(COLLECTION, [queries[i]])
    for i in range(rounds):
        for key, queries in requests.items():
            started = time.perf_counter()
            results[key].append(stores[key[0]].query_batch(COLLECTION, [queries[i]])[0])
            times[key].append(time.perf_counter() - started)
    return times, results


def compare(args: argparse.Namespace) -> None:
    """Both sides of "float16 loses no recall" and of the sparse cut, from one run."""
    per_batch = args.batch // VARIANTS
    batches = max(1, args.n // (per_batch * VARIANTS))
    n = batches * per_batch * VARIANTS
    catalog = Catalog(args.seed, per_batch)
    root = Path(tempfile.mkdtemp(prefix="bench_scale_compare_"))
    terms = args.sparse_query_terms or 16
    stores = {dt: EdgeStore(root / dt, dense_datatype=dt) for dt in ("float32", "float16")}
    try:
        built = {dt: build(store, catalog, batches, root / dt) for dt, store in stores.items()}
        queries, truth = make_queries(catalog, args.seed, args.queries, batches)
        reference = Index(stores["float32"], COLLECTION, Settings(), EncoderSet({}))
        reference.check_encoders()
        exact = []
        for q in queries:
            request = reference.fused_request(q)
            request = dataclasses.replace(request, exact=True, limit=request.limit + 40)
            exact.append(stores["float32"].query_batch(COLLECTION, [request])[0])
        configs = [(dt, cut) for dt in stores for cut in (None, terms)]
        requests = {}
        for dt, cut in configs:
            settings = Settings(sparse_query_terms=cut, sparse_candidates=args.sparse_candidates)
            index = Index(stores[dt], COLLECTION, settings, EncoderSet({}))
            requests[dt, cut, "fused"] = [index.fused_request(q) for q in queries]
            requests[dt, cut, "chars"] = [
                index.fused_request({"chars": q["chars"]}) for q in queries
            ]
        times, results = interleaved(stores, requests)
        rows = []
        for dt, cut in configs:
            fused = results[dt, cut, "fused"]
            recalls = [recall_at_10(a, e) for a, e in zip(fused, exact, strict=True)]
            recall = float(np.mean([r for r in recalls if r is not None]))
            rows.append(
                (
                    dt,
                    cut,
                    *percentiles(times[dt, cut, "fused"])[:2],
                    *percentiles(times[dt, cut, "chars"])[:2],
                    recall,
                    near_dups_found(fused, truth),
                )
            )
    finally:
        for store in stores.values():
            store.close()
        shutil.rmtree(root, ignore_errors=True)
    print(f"### bench_scale --compare: N={n:,}, {len(queries)} queries, one run\n")
    print("| dense datatype | disk GB | build s |")
    print("|---|---|---|")
    for dt, (_, build_s, _, size) in built.items():
        print(f"| {dt} | {size:.3f} | {build_s:.1f} |")
    print(
        "\n| dense datatype | chars query | fused p50 / p95 ms | chars alone p50 / p95 ms "
        "| recall@10 vs float32 exact | 4 near-dups found |"
    )
    print("|---|---|---|---|---|---|")
    for dt, cut, f50, f95, c50, c95, recall, dups in rows:
        query = f"{cut} heaviest terms, top {args.sparse_candidates}" if cut else "whole query"
        print(
            f"| {dt} | {query} | {f50:.2f} / {f95:.2f} | {c50:.2f} / {c95:.2f} | {recall:.4f} "
            f"| {dups:.3f} |"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, help="points (default 1,000,000; 20,000 --compare)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--datatype", choices=("float16", "float32"), default="float16")
    parser.add_argument(
        "--ef", type=lambda s: s.split(","), default=["default", "64", "128", "256", "auto"]
    )
    parser.add_argument("--batch", type=int, default=1_000, help="points per upsert")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sparse-query-terms",
        type=int,
        default=None,
        help="find chars candidates with the query's N heaviest terms, then rescore (settings)",
    )
    parser.add_argument("--sparse-candidates", type=int, default=200)
    parser.add_argument("--dir", help="build the store here and keep it (default: temporary)")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="float32 vs float16 and the sparse cut off vs on, on the same points in one run",
    )
    args = parser.parse_args(argv)
    if args.n is None:
        args.n = 20_000 if args.compare else 1_000_000
    (compare if args.compare else run)(args)


if __name__ == "__main__":
    main()
