"""`dedup --ray`: candidate queries on Ray workers, the pair table as Parquet partitions, the pair
model's features and decision per partition, clusters on the driver.

    product ids, in blocks ──► query actors (`candidates.batch_matches`, `table.candidate_rows`)
        each against the store: a Qdrant server or cluster (`--store URL`) directly, or, for the
        embedded engine, its own read-only snapshot copy of the collection (one opener per copy)
    ──► the candidate-pair table, written as Parquet partitions (one per block)
    ──► the driver reads the partitions into the `PairTable` (positions, ranks, gaps) and cuts
        the products into partitions (as many as the workers, fewer when their halos overlap so
        much that they would repeat the work: `HALO_BUDGET`); for each, a Ray task runs
        `dedup.decide_by_pair_model` on the partition's halo (the products within HALO_DEPTH
        hops over the candidate graph: every graph feature of a partition's pairs reads only
        these), its pairs eligible, the halo's others scored but never decided, with the whole
        catalog's statistics and score quantiles
    ──► the driver: the decided table, min-2 (per product, inside the decision), clusters
        (`clusters.table_clusters`), the same outputs as `dedup`

Exactness: stage 1 of a pair (x, y) reads the rows of x, y and their candidates (reverse ranks,
per-product aggregates, mutual neighbours for blending); stage 2 of (a, b) reads stage 1 of
every row of a, b and their candidates; so rows within 3 hops of a partition make its pairs'
features those of the whole table (`HALO_DEPTH`). The driver holds the pair table (about 100
bytes a pair: Shopee's 34k products have ~1M pairs, 100 MB), and a partition's task (the driver,
for a single partition) the features of its scored pairs (~1 KB each while deciding).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from prodsearch.errors import ConfigError
from prodsearch.index import Index, Product
from prodsearch.matching.candidates import RelativeFilters
from prodsearch.matching.dedup import DedupResult, default_search
from prodsearch.matching.features import product_titles
from prodsearch.matching.pair_model import MODEL_CANDIDATES
from prodsearch.matching.relative import SIGNALS, CatalogStats, signal_scores
from prodsearch.matching.table import PairTable, score_column
from prodsearch.scaleout import ACTOR_CPUS, is_server
from prodsearch.settings import MODALITIES, DedupSettings, SearchSettings, Settings

#: products per query block (one Parquet partition of the pair table each)
QUERY_BLOCK = 1024
#: hops over the candidate graph a partition's halo reaches (3: the features are exact)
HALO_DEPTH = 3
#: the most work the partitions may repeat: their halos' summed size over the catalog's
HALO_BUDGET = 1.5


class QueryActor:
    """A Ray actor querying one store: the server, or the first free one of the embedded
    collection's snapshot copies (each admits one opener)."""

    def __init__(self, settings: dict[str, Any], stores: list[str], collection: str) -> None:
        from prodsearch.encoders import EncoderSet
        from prodsearch.errors import StoreLockedError

        self.settings = Settings.model_validate(settings)
        # Only the encoders' identities are read (the collection's check); nothing is encoded.
        encoders = EncoderSet.from_settings(self.settings.encoders, self.settings.text_max_tokens)
        for store in stores:
            index = Index(store, collection, self.settings, encoders)
            try:
                index.count()  # opens (and, embedded, locks) the collection
            except StoreLockedError:
                index.close()
                continue
            self.index = index
            return
        raise ConfigError(f"dedup --ray: every store copy of {collection!r} is taken: {stores}")

    def __call__(
        self, block: pd.DataFrame, search: SearchSettings, filters: RelativeFilters
    ) -> pd.DataFrame:
        """The pair-table rows of a block of products (columns `product_id`, `position`), each
        product's rows in candidate order (`order`)."""
        from prodsearch.matching.candidates import batch_matches, candidate_options
        from prodsearch.matching.table import candidate_rows

        position = dict(zip(block["product_id"], block["position"], strict=True))
        chunk = self.index.products(block["product_id"].tolist(), with_vectors=True)
        found = batch_matches(self.index, chunk, candidate_options(self.index, search), filters)
        rows = [
            (position[p.product_id], p.product_id, other, fused, *scores)
            for p, matches in zip(chunk, found, strict=True)
            for other, fused, scores in candidate_rows(p.product_id, matches)
        ]
        columns = ["position", "a_id", "b_id", "fused", *(score_column(m) for m in MODALITIES)]
        frame = pd.DataFrame(rows, columns=columns)
        frame.insert(1, "order", np.arange(len(frame)))
        return frame


def ray_dedup(
    index: Index,
    out_dir: Path,
    knobs: DedupSettings | None = None,
    filters: RelativeFilters | None = None,
    *,
    workers: int = 2,
    halo_budget: float = HALO_BUDGET,
) -> DedupResult:
    """`run_dedup` with the pair model, its candidate queries and its decision on the connected
    Ray cluster (`start_ray`): `workers` query actors and as many decision partitions as keep
    the work they repeat (their halos' summed size) within `halo_budget` times the catalog. The
    pair table's Parquet partitions go to `out_dir`/pairs. Raises ConfigError for the fusion
    decider (`dedup --ray` decides with the pair model)."""
    import ray

    knobs = knobs or index.settings.dedup
    if knobs.decider != "pair-model":
        raise ConfigError("dedup --ray decides with the pair model; run --decider fusion locally")
    filters = filters or RelativeFilters()
    search = default_search(index)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    products = list(index.scroll(with_vectors=True))
    index.index_payload_fields(filters.keys(), products)
    seconds["read vectors"] = time.perf_counter() - started
    ids = [p.product_id for p in products]
    started = time.perf_counter()
    table = _candidates(ray, index, ids, search, filters, out_dir / "pairs", workers)
    seconds["candidates"] = time.perf_counter() - started
    started = time.perf_counter()
    _decide(ray, table, products, knobs, workers, halo_budget)
    seconds["pair model"] = time.perf_counter() - started
    started = time.perf_counter()
    from prodsearch.matching.clusters import table_clusters

    clusters = table_clusters(table, knobs.max_cluster_size)
    seconds["clusters"] = time.perf_counter() - started
    fired_at = {m: search.formula.floors.get(m) for m in MODALITIES}
    return DedupResult(table, clusters, fired_at, "pair model", seconds)


def _candidates(
    ray: Any,
    index: Index,
    ids: list[str],
    search: SearchSettings,
    filters: RelativeFilters,
    pairs_dir: Path,
    workers: int,
) -> PairTable:
    """The candidate-pair table: blocks of product ids queried by `workers` actors, written as
    Parquet partitions to `pairs_dir`, read back in catalog order."""
    blocks = pd.DataFrame({"product_id": ids, "position": np.arange(len(ids))})
    settings = index.settings.model_dump(mode="json")
    if pairs_dir.exists():
        shutil.rmtree(pairs_dir)
    with _query_stores(index, workers) as stores:
        ray.data.from_pandas(blocks).map_batches(
            QueryActor,
            fn_args=(search, filters),
            fn_constructor_args=(settings, stores, index.collection),
            batch_size=QUERY_BLOCK,
            batch_format="pandas",
            concurrency=workers,
            num_cpus=ACTOR_CPUS,
        ).write_parquet(str(pairs_dir))
    frame = pd.read_parquet(pairs_dir).sort_values(["position", "order"], kind="stable")
    position = pd.Series(np.arange(len(ids)), index=ids)
    frame = frame[frame["b_id"].isin(position.index)]
    return PairTable.build(
        ids,
        frame["position"].to_numpy(),
        position[frame["b_id"]].to_numpy(),
        frame["fused"].to_numpy(),
        {m: frame[score_column(m)].to_numpy() for m in MODALITIES},
    )


@contextmanager
def _query_stores(index: Index, workers: int) -> Iterator[list[str]]:
    """The store locations the query actors open: the server's URL (each actor connects on its
    own), or, for an embedded store, `workers` snapshot copies of the collection (removed
    afterwards): the local stand-in for "every worker queries the cluster"."""
    store = index.store.location
    if is_server(store):
        yield [store]
        return
    source = Path(store) / index.collection
    if not (source / "manifest.json").is_file():
        raise ConfigError(
            f"dedup --ray: {store} is neither an embedded store (Qdrant Edge) nor a server URL; "
            "qdrant-client's local mode admits one opener: run dedup without --ray"
        )
    root = Path(tempfile.mkdtemp(prefix="prodsearch-ray-snapshots-"))
    try:
        copies = []
        for number in range(workers):
            target = root / str(number)
            ignore = shutil.ignore_patterns("prodsearch.lock")
            shutil.copytree(source, target / index.collection, ignore=ignore)
            copies.append(str(target))
        yield copies
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _decide(
    ray: Any,
    table: PairTable,
    products: Sequence[Product],
    knobs: DedupSettings,
    parts: int,
    halo_budget: float,
) -> None:
    """The pair model's decision of every pair, partition by partition on Ray, written into
    `table` (`probability`, `match`, `rule`); `products` in `table.ids` order. One partition is
    the whole table: decided here, as `dedup` decides it, with no copy to a worker."""
    n = len(table.ids)
    top, _ = table.top(MODEL_CANDIDATES)
    graph = sp.csr_matrix((np.ones(len(top)), (top.a, top.b)), shape=(n, n))
    partitions = _partitions(graph, parts, halo_budget)
    if len(partitions) == 1:
        _decide_partition(table, list(products), np.ones(len(table), dtype=bool), knobs, None)
        return
    titles = product_titles(products)
    stats = CatalogStats.of(titles)
    quantiles = {}
    for signal in SIGNALS:
        known = signal_scores(top, signal)
        quantiles[signal] = np.sort(known[~np.isnan(known)])
    stats = CatalogStats(stats.titles, stats.document_frequency, quantiles)
    stats_ref, knobs_ref = ray.put(stats), ray.put(knobs)
    task = ray.remote(num_cpus=ACTOR_CPUS)(_decide_partition)
    futures = []
    for part, halo in partitions:
        rows = np.flatnonzero(np.isin(table.a, halo))
        named = np.union1d(halo, table.b[rows])
        local = np.full(n, -1)
        local[named] = np.arange(len(named))
        frame = table.frame.iloc[rows].copy()
        frame["a"], frame["b"] = local[frame["a"].to_numpy()], local[frame["b"].to_numpy()]
        sub = PairTable([table.ids[i] for i in named], frame.reset_index(drop=True))
        mine = [products[i] for i in named]
        eligible = np.isin(table.a[rows], part)
        futures.append((rows, task.remote(sub, mine, eligible, knobs_ref, stats_ref)))
    probability = np.zeros(len(table))
    matched = np.zeros(len(table), dtype=bool)
    rule = np.full(len(table), "", dtype=object)
    for rows, future in futures:
        decided = ray.get(future)
        keep = decided["eligible"]
        probability[rows[keep]] = decided["probability"][keep]
        matched[rows[keep]] = decided["match"][keep]
        rule[rows[keep]] = decided["rule"][keep]
    table.frame["probability"] = probability
    table.frame["match"] = matched
    table.frame["rule"] = rule


def _partitions(
    graph: sp.csr_matrix, parts: int, budget: float
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The products cut into at most `parts` runs, each with its halo: as many as keep the
    halos' summed size within `budget` times the catalog (on a catalog whose candidate graph
    is small-world, a partition's 3-hop halo is most of the catalog, and more partitions would
    repeat the whole computation in each)."""
    n = graph.shape[0]
    while True:
        cut = np.array_split(np.arange(n), parts)
        halos = [_halo(graph, part, HALO_DEPTH) for part in cut]
        if parts == 1 or sum(len(h) for h in halos) <= budget * n:
            return list(zip(cut, halos, strict=True))
        parts -= 1


def _halo(graph: sp.csr_matrix, part: np.ndarray, depth: int) -> np.ndarray:
    """The products within `depth` hops of `part` over the candidate graph (out-edges)."""
    reached = np.zeros(graph.shape[0], dtype=bool)
    reached[part] = True
    frontier = reached.copy()
    for _ in range(depth):
        step = np.asarray(graph.T @ frontier.astype(np.float64)).ravel() > 0
        frontier = step & ~reached
        reached |= step
        if not frontier.any():
            break
    return np.flatnonzero(reached)


def _decide_partition(
    table: PairTable,
    products: list[Product],
    eligible: np.ndarray,
    knobs: DedupSettings,
    stats: CatalogStats | None,
) -> dict[str, np.ndarray]:
    """A Ray task: `decide_by_pair_model` on one partition's halo table (`stats`: the whole
    catalog's; None: the table is the whole catalog)."""
    from prodsearch.matching.dedup import decide_by_pair_model
    from prodsearch.matching.pair_model import PairModel

    model = PairModel.load(knobs.pair_model.model)
    decide_by_pair_model(table, products, model, knobs, eligible, stats)
    return {
        "eligible": eligible,
        "probability": table.column("probability"),
        "match": table.matched(),
        "rule": table.column("rule"),
    }
