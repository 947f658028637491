"""Scale-out benchmark: Shopee ingest and dedup through the Ray path (1 and 2 workers) beside the
local path, in one run, then a capacity model built on the per-worker rates measured here.

    .venv/bin/python benchmarks/bench_scaleout.py [--data ../shared/data] [--rows N] [--all]

The catalog is the Shopee test split (7,061 titles + image_phash; `--all`: all 34,250 rows of
train.csv). Ray runs locally (`ray.init(num_cpus=2)`), the store is the embedded engine (the
driver upserts; `dedup --ray`'s workers query their own snapshot copies of the collection).
Peak memory is the largest summed RSS of this process and all its descendants (Ray's raylet
and workers included) while a step runs. Prints markdown tables on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
from bench_pipeline import QUIET, shopee_test_catalog, table
from rich.console import Console

from prodsearch.catalog import read_catalog
from prodsearch.encoders import EncoderInput, EncoderSet
from prodsearch.index import Index
from prodsearch.ingest import ingest_catalog
from prodsearch.matching.dedup import run_dedup
from prodsearch.recipes import load_recipe
from prodsearch.settings import IngestSettings, Settings

REPO = Path(__file__).resolve().parents[1]
log = Console(stderr=True)
#: products and workers the capacity model projects
PRODUCTS = (1_000_000, 10_000_000, 100_000_000)
WORKERS = (8, 32, 128)
#: HNSW build of one Edge shard, measured on these machines (QDRANT.md, "Scale": 77 s at 200k,
#: 611 s at 1M): t = 611 s * (n / 1M) ** BUILD_EXPONENT
BUILD_1M_SECONDS = 611.0
BUILD_EXPONENT = math.log(611 / 77) / math.log(1_000_000 / 200_000)
#: points a shard holds in the sizing (QDRANT.md: 1M builds in 10 min on 2 cores, 2M+ wants
#: more cores and RAM, or several shards)
POINTS_PER_SHARD = 2_000_000
REPLICAS = 2
#: Qdrant nodes (deploy/cluster/): shards come in multiples of them
NODES = 3


def machine() -> str:
    """The CPU model, its cores, and the load average now."""
    model = "unknown CPU"
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores, load average {load} (1/5/15 min)"


class PeakMemory:
    """The peak summed RSS (GB) of this process and its descendants while in the block."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()

    def _total(self) -> float:
        me = psutil.Process()
        total = 0
        for process in [me, *me.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.Error:
                continue
        return total / 1e9

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            self._stop.wait(0.25)

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Step:
    """One measured step: how long, how many, how much memory."""

    name: str
    seconds: float
    items: int
    peak_gb: float
    detail: dict[str, Any]

    @property
    def rate(self) -> float:
        return self.items / self.seconds


def measured(name: str, items: Callable[[Any], int], call: Callable[[], Any]) -> Step:
    """Run `call`, timed, its memory peak sampled; `items` counts what it did."""
    log.print(f"bench_scaleout: {name}", highlight=False)
    with PeakMemory() as memory:
        start = time.perf_counter()
        result = call()
        seconds = time.perf_counter() - start
    return Step(name, seconds, items(result), memory.peak, {"result": result})


def text_encoder_alone(encoders: EncoderSet, titles: list[str], batch: int) -> Step:
    """The text encoder's own throughput on the catalog's titles, in ingest's batches."""
    text = encoders["text"]

    def run() -> int:
        for start in range(0, len(titles), batch):
            text.encode([EncoderInput(title=t) for t in titles[start : start + batch]])
        return len(titles)

    return measured("text encoder alone", lambda n: n, run)


def upsert_rate(source: Index, target: Index, batch: int) -> Step:
    """Points/s of upserting the stored products (vectors + payload) into a fresh collection of
    one embedded shard: the engine's per-shard write rate."""
    products = list(source.scroll(with_vectors=True))

    def run() -> int:
        for start in range(0, len(products), batch):
            target.upsert(products[start : start + batch])
        return len(products)

    return measured("upsert into one shard", lambda n: n, run)


def same_match_sets(mine: Any, theirs: Any) -> int:
    """How many products' match sets differ between two dedup results."""
    a, b = mine.match_sets(), theirs.match_sets()
    return sum(set(a[p]) != set(b.get(p, [])) for p in a)


def fmt(seconds: float) -> str:
    return f"{seconds:,.1f}"


def run_all(args: argparse.Namespace) -> None:
    import ray

    from prodsearch.scaleout.dedup import ray_dedup
    from prodsearch.scaleout.ingest import ray_ingest

    work = Path(tempfile.mkdtemp(prefix="prodsearch-bench-scaleout-"))
    before = machine()
    if args.all:
        csv = work / "shopee-all.csv"
        pd.read_csv(args.data / "shopee" / "train.csv").to_csv(csv, index=False)
    else:
        csv = shopee_test_catalog(args.data, work)
    if args.rows:
        pd.read_csv(csv).head(args.rows).to_csv(csv, index=False)
    recipe = load_recipe("shopee")
    catalog = read_catalog(csv, recipe)
    settings = Settings()
    encoders = EncoderSet.default()
    encoders.encode([EncoderInput(title="warm up")])
    text = text_encoder_alone(encoders, [r.title or "" for r in catalog.rows], settings.batch_size)

    stores = {}
    ingest_steps = []

    def local_ingest() -> Any:
        index = Index(str(work / "local"), "products", settings, encoders)
        stores["local"] = index
        return ingest_catalog(index, catalog, console=QUIET)

    ingest_steps.append(measured("ingest, local", lambda r: r.upserted, local_ingest))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    for workers in (1, 2):

        def ray_run(workers: int = workers) -> Any:
            index = Index(str(work / f"ray{workers}"), "products", settings, encoders)
            stores[f"ray{workers}"] = index
            return ray_ingest(
                index, str(csv), IngestSettings(), recipe, workers=workers, console=QUIET
            )

        name = f"ingest --ray, {workers} worker{'s' if workers > 1 else ''}"
        ingest_steps.append(measured(name, lambda r: r.upserted, ray_run))

    shard = Index(str(work / "upsert"), "products", settings, encoders)
    shard.ensure_collection()
    upsert = upsert_rate(stores["local"], shard, settings.batch_size)
    shard.close()

    local_index = stores["local"]
    dedup_steps = [
        measured("dedup, local", lambda r: len(r.table.ids), lambda: run_dedup(local_index))
    ]
    for workers in (1, 2):
        out = work / f"dedup-ray{workers}"
        dedup_steps.append(
            measured(
                f"dedup --ray, {workers} worker{'s' if workers > 1 else ''}",
                lambda r: len(r.table.ids),
                lambda out=out, workers=workers: ray_dedup(local_index, out, workers=workers),
            )
        )
    after = machine()
    report(args, csv, before, after, text, ingest_steps, upsert, dedup_steps)
    for index in stores.values():
        index.close()
    ray.shutdown()


def report(
    args: argparse.Namespace,
    csv: Path,
    before: str,
    after: str,
    text: Step,
    ingest_steps: list[Step],
    upsert: Step,
    dedup_steps: list[Step],
) -> None:
    """Print the tables: ingest, dedup, the measured per-worker rates and the projection."""
    rows = len(pd.read_csv(csv))
    print(
        f"## Scale-out on this machine ({rows:,} Shopee rows: "
        f"{'train.csv' if args.all else 'the test split'})\n"
    )
    print(f"Machine before: {before}  \nMachine after: {after}\n")
    print(
        f"Text encoder alone on the same titles: {text.rate:,.0f} titles/s "
        f"({fmt(text.seconds)} s)\n"
    )
    local = ingest_steps[0]
    body = [
        [
            s.name,
            f"{s.items:,}",
            fmt(s.seconds),
            f"{s.rate:,.0f}",
            f"{s.rate / text.rate:.0%}",
            f"{s.seconds / local.seconds - 1:+.0%}" if s is not local else "baseline",
            f"{s.peak_gb:.2f}",
        ]
        for s in ingest_steps
    ]
    header = [
        "ingest",
        "products",
        "seconds",
        "products/s",
        "of text encoder",
        "time vs local",
        "peak GB",
    ]
    print(table(header, body) + "\n")
    base = dedup_steps[0]
    body = []
    for s in dedup_steps:
        result = s.detail["result"]
        differ = same_match_sets(base.detail["result"], result) if s is not base else 0
        stages = ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items())
        body.append(
            [
                s.name,
                f"{s.items:,}",
                fmt(s.seconds),
                f"{s.rate:,.0f}",
                f"{s.seconds / base.seconds - 1:+.0%}" if s is not base else "baseline",
                f"{s.peak_gb:.2f}",
                f"{differ}",
                stages,
            ]
        )
    header = [
        "dedup",
        "products",
        "seconds",
        "products/s",
        "time vs local",
        "peak GB",
        "match sets differing from local",
        "stages (s)",
    ]
    print(table(header, body) + "\n")
    capacity(ingest_steps, upsert, dedup_steps)


@dataclass(frozen=True)
class Rates:
    """The capacity model's inputs, measured in one run (`--project` takes them back)."""

    #: products/s one worker encodes and upserts
    encode: float
    #: points/s one shard takes
    upsert: float
    #: candidate queries/s one worker runs against its shard copy
    query: float
    #: candidate pairs per product
    pairs: float
    #: pairs/s of the pair model's features and decision, one worker
    decide: float
    #: pairs/s of the driver's clusters
    clusters: float

    def as_option(self) -> str:
        return ",".join(f"{k}={v:.1f}" for k, v in self.__dict__.items())

    @classmethod
    def from_option(cls, text: str) -> Rates:
        return cls(**{k: float(v) for k, v in (item.split("=") for item in text.split(","))})


def capacity(ingest_steps: list[Step], upsert: Step, dedup_steps: list[Step]) -> None:
    """The capacity model: measured per-worker rates, and hours projected from them."""
    # A worker is one core's actor (one ONNX Runtime thread): the 2-worker runs, 2 actors on
    # this machine's 2 cores, halved. Their time includes Ray's start (actors, encoders, the
    # read), so at scale, where it is paid once, the rates are lower bounds.
    two_ingest, two_dedup = ingest_steps[2], dedup_steps[2].detail["result"]
    local = dedup_steps[0].detail["result"]
    n = len(local.table.ids)
    rates = Rates(
        encode=two_ingest.rate / 2,
        upsert=upsert.rate,
        query=n / two_dedup.seconds["candidates"] / 2,
        pairs=len(local.table) / n,
        decide=len(local.table) / dedup_steps[1].detail["result"].seconds["pair model"],
        clusters=len(local.table) / max(local.seconds["clusters"], 1e-3),
    )
    print("### Per-worker rates measured in this run (the model's only inputs besides the build)\n")
    body = [
        [
            "encode + upsert (ingest --ray, 2 workers, per worker)",
            f"{rates.encode:,.0f} products/s",
        ],
        ["upsert into one embedded shard (batches of 256)", f"{rates.upsert:,.0f} points/s"],
        [
            "candidate queries (dedup --ray, 2 workers, per worker)",
            f"{rates.query:,.0f} products/s",
        ],
        [
            "candidate queries, local dedup (engine in process)",
            f"{n / local.seconds['candidates']:,.0f} products/s",
        ],
        ["pairs per product in the candidate table", f"{rates.pairs:,.1f}"],
        ["pair model (features + decision, dedup --ray, 1 worker)", f"{rates.decide:,.0f} pairs/s"],
        ["clusters on the driver", f"{rates.clusters:,.0f} pairs/s"],
        [
            "HNSW build of one shard (QDRANT.md, measured here earlier)",
            f"{BUILD_1M_SECONDS:.0f} s at 1M, exponent {BUILD_EXPONENT:.2f}",
        ],
    ]
    print(table(["rate", "value"], body) + "\n")
    print(f"(re-print the projection: `bench_scaleout.py --project {rates.as_option()}`)\n")
    project(rates)


def project(rates: Rates) -> None:
    """Print the projected hours for PRODUCTS x WORKERS from `rates`."""
    print(
        f"### Projected hours (shards = ceil(N / {POINTS_PER_SHARD:,}) rounded up to a multiple "
        f"of {NODES} nodes, {REPLICAS} replicas; engine cores = workers)\n\n"
        "ingest = max(N / (workers x encode), N / (shards x upsert)) + one shard's HNSW build "
        "(shards build in parallel); dedup = N x shards / (workers x queries) (every query fans "
        "out to every shard) + N x pairs/product / (workers x pair model) (partitions whose "
        "halos stay small; a small-world candidate graph gets one partition: the last column) + "
        "the driver's clusters.\n"
    )
    body = []
    for products in PRODUCTS:
        shards = NODES * math.ceil(products / POINTS_PER_SHARD / NODES)
        build = BUILD_1M_SECONDS * (products / shards / 1_000_000) ** BUILD_EXPONENT
        pairs = products * rates.pairs
        for workers in WORKERS:
            ingest = max(products / (workers * rates.encode), products / (shards * rates.upsert))
            queries = products * shards / (workers * rates.query)
            decide = pairs / (workers * rates.decide)
            clusters = pairs / rates.clusters
            body.append(
                [
                    f"{products:,}",
                    str(shards),
                    str(REPLICAS),
                    str(workers),
                    f"{(ingest + build) / 3600:.1f}",
                    f"{(queries + decide + clusters) / 3600:.1f}",
                    f"{queries / 3600:.1f} / {decide / 3600:.2f} / {clusters / 3600:.2f}",
                    f"{pairs / rates.decide / 3600:.1f}",
                ]
            )
    header = [
        "products",
        "shards",
        "replicas",
        "workers",
        "ingest h",
        "dedup h",
        "dedup: queries / pair model / clusters h",
        "pair model on one node h",
    ]
    print(table(header, body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--rows", type=int, default=None, help="only the first N rows")
    parser.add_argument("--all", action="store_true", help="all 34,250 rows of train.csv")
    parser.add_argument(
        "--project", help="only print the projection from rates a run printed (encode=...,...)"
    )
    args = parser.parse_args()
    if args.project:
        project(Rates.from_option(args.project))
        return
    run_all(args)


if __name__ == "__main__":
    main()
