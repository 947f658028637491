"""Incremental matching benchmark: listings arriving in batches, assigned to stored clusters,
against one full `dedup` of the same rows.

    .venv/bin/python benchmarks/bench_incremental.py [--data DIR] [--batches 10] [--seed 0]
                                                     [--latency-products 200] [--skip-latency]

1. Stream: the Shopee `test` rows (7,061) in random order in `--batches` batches; the first
   ingested and deduplicated (`dedup` stores its clusters), each later batch ingested with
   `--assign` (the dedup decision on each new product's neighbourhood). After every batch, the
   share of products that kept their cluster id while their true group got no new member.
2. Full: one `dedup` of all the rows in a fresh collection, its clusters stored the same way.
   Row F1 of both final clusterings against the Shopee groups (each product in its own set),
   and of their match sets where the full run has them.
3. Latency: all of Shopee `train.csv` but `--latency-products` rows ingested (34k products), then
   those rows assigned one at a time through the library (encode, upsert, assign), timed each.
Prints markdown tables; the load average is printed beside the timings (shared machines).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from prodsearch.catalog import read_catalog  # noqa: E402
from prodsearch.encoders import EncoderInput  # noqa: E402
from prodsearch.eval.metrics import row_scores  # noqa: E402
from prodsearch.index import Index, Product  # noqa: E402
from prodsearch.ingest import ingest_catalog  # noqa: E402
from prodsearch.matching.assign import Assigner  # noqa: E402
from prodsearch.matching.cluster_log import ClusterLog  # noqa: E402
from prodsearch.matching.clusters import cluster_members, store_clusters  # noqa: E402
from prodsearch.matching.dedup import run_dedup  # noqa: E402
from prodsearch.recipes import load_recipe  # noqa: E402

QUIET = Console(stderr=True, quiet=True)
LOG = Console(stderr=True)


def cluster_f1(membership: dict[str, str], groups: dict[str, object]) -> float:
    """Row F1 of clusters (each product's cluster as its match set) against the groups."""
    by_cluster = cluster_members(membership)
    by_group = cluster_members(groups)
    ids = sorted(groups)
    predicted = [set(by_cluster[membership[p]]) if p in membership else {p} for p in ids]
    return row_scores(predicted, [set(by_group[groups[p]]) for p in ids]).f1


def stream(frame: pd.DataFrame, workdir: Path, batches: int, seed: int) -> dict:
    """Batches of the rows: the first deduplicated, the rest assigned; the final clusters."""
    order = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    parts = np.array_split(np.arange(len(order)), batches)
    groups = dict(zip(order["posting_id"], order["label_group"], strict=True))
    stable, seconds = [], []
    with Index(str(workdir / "stream"), "products") as index:
        log = ClusterLog(workdir / "stream" / "products.clusters.sqlite")
        assigner = Assigner(index, log)
        seen: set[str] = set()
        for number, rows in enumerate(parts):
            path = workdir / f"batch{number}.csv"
            order.iloc[rows].to_csv(path, index=False)
            catalog = read_catalog(path, load_recipe("shopee"))
            before = log.membership()
            started = time.perf_counter()
            if number == 0:
                ingest_catalog(index, catalog, console=QUIET)
                store_clusters(index, log, run_dedup(index).clusters)
            else:
                ingest_catalog(index, catalog, console=QUIET, after_batch=assigner.assign_pending)
            seconds.append(time.perf_counter() - started)
            arrived = {groups[p] for p in order["posting_id"].iloc[rows]}
            after = log.membership()
            quiet = [p for p in before if groups[p] not in arrived]
            if quiet:
                stable.append(sum(before[p] == after.get(p) for p in quiet) / len(quiet))
            seen |= set(order["posting_id"].iloc[rows])
            LOG.print(f"batch {number + 1}/{batches}: {len(seen):,} products, {seconds[-1]:.0f} s")
        membership = log.membership()
        proposed = [(e.cluster_id, e.detail["with"]) for e in log.pending_merges()]
        log.close()
    return {
        "membership": membership,
        "merged": merged(membership, proposed),
        "proposed": len(proposed),
        "stable": stable,
        "seconds": seconds,
        "groups": groups,
    }


def merged(membership: dict[str, str], proposals: list[tuple[str, str]]) -> dict[str, str]:
    """The clusters a reviewer who accepts every proposed merge would keep."""
    parent: dict[str, str] = {}

    def root(c: str) -> str:
        while parent.get(c, c) != c:
            c = parent[c]
        return c

    for one, other in proposals:
        parent[root(other)] = root(one)
    return {p: root(c) for p, c in membership.items()}


def full(frame: pd.DataFrame, workdir: Path) -> dict:
    """One dedup of every row in a fresh collection, its clusters stored."""
    path = workdir / "all.csv"
    frame.to_csv(path, index=False)
    started = time.perf_counter()
    with Index(str(workdir / "full"), "products") as index:
        ingest_catalog(index, read_catalog(path, load_recipe("shopee")), console=QUIET)
        result = run_dedup(index)
        with ClusterLog(workdir / "full" / "products.clusters.sqlite") as log:
            carried = store_clusters(index, log, result.clusters)
    return {
        "membership": carried.membership,
        "sets": result.match_sets(),
        "seconds": time.perf_counter() - started,
    }


def latency(train: pd.DataFrame, workdir: Path, held_out: int, seed: int) -> list[float]:
    """Milliseconds to encode, upsert and assign one new product into a collection of all of
    `train` but `held_out` rows."""
    rows = train.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    base, new = rows.iloc[held_out:], rows.iloc[:held_out]
    path = workdir / "base.csv"
    base.to_csv(path, index=False)
    times = []
    with Index(str(workdir / "latency"), "products") as index:
        ingest_catalog(index, read_catalog(path, load_recipe("shopee")), console=QUIET)
        with ClusterLog(workdir / "latency" / "products.clusters.sqlite") as log:
            assigner = Assigner(index, log)
            for row in new.itertuples(index=False):
                started = time.perf_counter()
                payload = {"title": row.title, "image_phash": row.image_phash}
                (vectors,) = index.encoders.encode(
                    [EncoderInput(title=row.title, phash=row.image_phash)]
                )
                index.upsert([Product(row.posting_id, payload, vectors)])
                assigner.assign([row.posting_id])
                times.append((time.perf_counter() - started) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-products", type=int, default=200)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--latency-only", action="store_true", help="measure the latency alone")
    args = parser.parse_args()
    train = pd.read_csv(args.data / "shopee" / "train.csv")
    split = pd.read_csv(args.data / "shopee" / "split.csv")
    test = train.merge(split, on="posting_id")
    test = test[test["split"] == "test"].drop(columns="split")
    with tempfile.TemporaryDirectory(prefix="prodsearch-incremental-") as folder:
        workdir = Path(folder)
        streamed = None if args.latency_only else stream(test, workdir, args.batches, args.seed)
        whole = None if args.latency_only else full(test, workdir)
        times = (
            [] if args.skip_latency else latency(train, workdir, args.latency_products, args.seed)
        )
    if streamed is not None and whole is not None:
        report(streamed, whole, args)
    if times:
        p50, p95 = np.percentile(times, [50, 95])
        print(
            f"\nassign one new product into {len(train) - args.latency_products:,} products "
            f"(encode + upsert + assign, load {os.getloadavg()[0]:.1f}): p50 {p50:.1f} ms, p95 "
            f"{p95:.1f} ms over {len(times)}; the first (it gathers the catalog's statistics) "
            f"{times[0]:.0f} ms; p95 of the others {np.percentile(times[1:], 95):.1f} ms"
        )


def report(streamed: dict, whole: dict, args: argparse.Namespace) -> None:
    """Print the tables."""
    groups = streamed["groups"]
    ids = sorted(groups)
    truth = cluster_members(groups)
    load = os.getloadavg()[0]
    print(f"\nShopee test, {len(ids):,} rows in {args.batches} batches (load {load:.1f})\n")
    print("| clustering | row F1 (clusters) | seconds |")
    print("|---|---|---|")
    streamed_f1 = cluster_f1(streamed["membership"], groups)
    streamed_s = sum(streamed["seconds"])
    print(f"| streamed: batch 1 dedup, then assign | {streamed_f1:.4f} | {streamed_s:.0f} |")
    accepted = cluster_f1(streamed["merged"], groups)
    print(f"| streamed, its {streamed['proposed']} proposed merges accepted | {accepted:.4f} | |")
    full_f1 = cluster_f1(whole["membership"], groups)
    print(f"| one full dedup | {full_f1:.4f} | {whole['seconds']:.0f} |")
    sets = row_scores([set(whole["sets"][p]) for p in ids], [set(truth[groups[p]]) for p in ids]).f1
    print(f"| (one full dedup: its match sets) | {sets:.4f} | |")
    stable = streamed["stable"]
    print(
        "\nkept their cluster id while their group got no new member: "
        f"min {min(stable):.4f}, mean {statistics.mean(stable):.4f} over {len(stable)} batches"
    )


if __name__ == "__main__":
    main()
