"""One product at a time: its pairs decided as `dedup` decides a catalog's, and assign on arrival.

`ProductDecider` decides a product's pairs on its neighbourhood (`candidates.neighbourhood`: its
candidates and its best candidates' candidates, so the features of its pairs come from complete
candidate lists, as in a whole-catalog table). A query the collection does not hold is decided
the same way (`match` shows the verdicts beside the engine's scores).

`Assigner` puts a new (or changed) product in the stored clusters: its matches' clusters decide:
none -> it founds a cluster; one -> it joins it; several -> it joins the one of its most probable
match, and a merge of the others is proposed for review rather than made (a product linking two
clusters is as often a look-alike as a bridge). Products not yet in a cluster count as none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from prodsearch.errors import ConfigError
from prodsearch.index import Index, Product
from prodsearch.matching import decide
from prodsearch.matching.candidates import (
    BATCH_SIZE,
    Neighbourhood,
    RelativeFilters,
    batch_matches,
    candidate_options,
    neighbourhood,
)
from prodsearch.matching.cluster_log import CLUSTER_KEY, ClusterLog, new_cluster_id
from prodsearch.matching.dedup import decide_by_pair_model, default_search
from prodsearch.matching.features import NEIGHBOURS, product_titles
from prodsearch.matching.pair_model import MODEL_CANDIDATES, PairModel
from prodsearch.matching.relative import SIGNALS, CatalogStats
from prodsearch.matching.table import candidate_rows
from prodsearch.settings import MODALITIES, DedupSettings, SearchSettings
from prodsearch.state import state_file

#: how many of a product's best candidates have their own candidates read (their pairs with the
#: product get complete features; a candidate further down is not decided)
DEPTH = 10
#: the id a query that is not in the collection takes in its neighbourhood table
QUERY_ID = "\x00query"
#: products whose candidates sample the catalog's score distribution (`sampled_scores`)
SCORE_SAMPLE = 400
#: sorted scores of a signal kept of that sample (evenly spaced)
REFERENCE_POINTS = 2001
NO_FILTERS = RelativeFilters()


@dataclass(frozen=True)
class Verdict:
    """The decision on one of a product's candidates."""

    product_id: str
    matched: bool
    #: the pair model's probability (None when a score rule decided)
    probability: float | None
    fused: float
    scores: dict[str, float]
    #: what decided ("pair model", "min-2", "fused score", "modality score"; "" = no match)
    rule: str

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form."""
        return dict(vars(self))


class ProductDecider:
    """Decides one product's candidate pairs with the decision `dedup` uses."""

    def __init__(
        self,
        index: Index,
        knobs: DedupSettings | None = None,
        search: SearchSettings | None = None,
        log: ClusterLog | None = None,
    ) -> None:
        """`log`: where the catalog statistics are kept between runs (an assigning ingest's
        cluster log: a re-run after a kill then decides with the statistics the killed run had)."""
        self.index = index
        self.log = log
        self.knobs = knobs or index.settings.dedup
        self.search = search or default_search(index)
        self.model = (
            PairModel.load(self.knobs.pair_model.model)
            if self.knobs.decider == "pair-model"
            else None
        )
        #: the whole catalog's statistics (the features of a neighbourhood's pairs read them)
        self.stats: CatalogStats | None = None

    def verdicts(self, product: Product, stored: bool = True) -> list[Verdict]:
        """The verdicts on the product's `DEPTH` best candidates, most probable first (a query
        the collection does not hold: `stored` False)."""
        found = neighbourhood(
            self.index, product, self.search, DEPTH, stored=stored, limit=MODEL_CANDIDATES
        )
        table = found.table
        queried = np.unique(table.a)
        mine = (table.a == 0) & np.isin(table.b, queried)
        if not mine.any():
            return []
        self._decide(found, mine | ((table.b == 0) & np.isin(table.a, queried)))
        rows = np.flatnonzero(mine)
        probability = table.column("probability")
        key = np.nan_to_num(probability[rows], nan=0.0) + table.fused[rows] * 1e-6
        scores = {m: table.scores(m) for m in table.modalities()}
        out = []
        for row in rows[np.argsort(-key, kind="stable")]:
            p = probability[row]
            out.append(
                Verdict(
                    product_id=table.ids[table.b[row]],
                    matched=bool(table.frame["match"].iat[row]),
                    probability=None if np.isnan(p) else round(float(p), 4),
                    fused=round(float(table.fused[row]), 4),
                    scores={
                        m: round(float(v[row]), 4)
                        for m, v in scores.items()
                        if not np.isnan(v[row])
                    },
                    rule=str(table.frame["rule"].iat[row]),
                )
            )
        return out

    def _decide(self, found: Neighbourhood, eligible: np.ndarray) -> None:
        """Decide the neighbourhood table as `dedup` decides a catalog's; only `eligible` pairs
        (the product's with candidates whose lists are complete) may match."""
        table = found.table
        if self.model is None:
            passes = decide.search_passes(table, self.search) & eligible
            decide.record(table, passes, decide.search_rule(self.search))
            if self.knobs.min2:
                ranking = np.where(eligible, table.fused, -np.inf)
                decide.record_min2(table, ranking, self.knobs.fusion.min2_min_fused_score)
            return
        products = self._products(found)
        decide_by_pair_model(table, products, self.model, self.knobs, eligible, self._stats())

    def _stats(self) -> CatalogStats:
        """The catalog's statistics, gathered again once it grew by a tenth since (kept in the
        log, when there is one): its titles' word frequencies, and its score distribution
        sampled from SCORE_SAMPLE products' candidates (`sampled_scores`)."""
        if self.stats is None and self.log is not None:
            kept = self.log.catalog_stats()
            self.stats = _stats_from_log(kept) if kept else None
        size = self.index.count()
        if self.stats is None or size > 1.1 * self.stats.titles:
            products = list(self.index.scroll(with_vectors=False))
            titles = product_titles(products)
            scores = sampled_scores(self.index, self.search, [p.product_id for p in products])
            self.stats = replace(CatalogStats.of(titles), quantiles=scores)
            if self.log is not None:
                fields = asdict(self.stats)
                fields["quantiles"] = {s: v.tolist() for s, v in scores.items()}
                self.log.set_catalog_stats(fields)
        return self.stats

    def _products(self, found: Neighbourhood) -> list[Product]:
        """Every product of the table with its payload; with its vectors where its blended
        vector enters the product's features (it, the queried candidates, their neighbours)."""
        table = found.table
        close = table.column("rank") <= NEIGHBOURS
        wanted = {*table.a.tolist(), *table.b[close].tolist()} - {0}
        ids = [table.ids[i] for i in sorted(wanted)]
        stored = {p.product_id: p for p in self.index.products(ids, with_vectors=True)}
        first = table.ids[0]
        return [
            found.product if pid == first else stored.get(pid) or Product(pid, payload, {})
            for pid, payload in found.payloads.items()
        ]


def _stats_from_log(kept: dict[str, Any]) -> CatalogStats:
    quantiles = {s: np.asarray(v, dtype=np.float64) for s, v in kept.get("quantiles", {}).items()}
    return CatalogStats(kept["titles"], kept["document_frequency"], quantiles)


def sampled_scores(
    index: Index, search: SearchSettings, product_ids: Sequence[str]
) -> dict[str, np.ndarray]:
    """The catalog's score distribution, as a whole-catalog table holds it (each product's
    MODEL_CANDIDATES best candidates), sampled from SCORE_SAMPLE products (a fixed draw):
    each signal's known scores, sorted, thinned to at most REFERENCE_POINTS. An assignment reads
    its pairs' quantile features in it, as `dedup` reads them among the whole table's pairs (a
    neighbourhood's own pairs are all close ones: a true match's quantile among them is low)."""
    ids = sorted(product_ids)
    if not ids:
        return {}
    draw = np.random.default_rng(0).choice(len(ids), min(SCORE_SAMPLE, len(ids)), replace=False)
    products = index.products([ids[i] for i in sorted(draw)], with_vectors=True)
    options = candidate_options(index, search)
    values: dict[str, list[float]] = {s: [] for s in SIGNALS}
    for start in range(0, len(products), BATCH_SIZE):
        chunk = products[start : start + BATCH_SIZE]
        found = batch_matches(index, chunk, options, NO_FILTERS)
        for product, matches in zip(chunk, found, strict=True):
            rows = candidate_rows(product.product_id, matches)[:MODEL_CANDIDATES]
            for _, fused, scores in rows:
                values["fused"].append(fused)
                for modality, score in zip(MODALITIES, scores, strict=True):
                    if modality in values:
                        values[modality].append(score)
    out = {}
    for signal, known in values.items():
        v = np.sort(np.array(known, dtype=np.float64))
        v = v[~np.isnan(v)]
        if len(v):
            points = np.linspace(0, len(v) - 1, min(len(v), REFERENCE_POINTS)).round()
            out[signal] = v[points.astype(np.int64)]
    return out


def catalog_decider(index: Index) -> ProductDecider:
    """The `dedup` decision on `index`'s collection, reading the catalog's statistics from its
    cluster log when it has one (after a `dedup`; else from the neighbourhood at hand)."""
    try:
        path = state_file(index.settings, "clusters")
    except ConfigError:
        return ProductDecider(index)
    return ProductDecider(index, log=ClusterLog(path) if path.is_file() else None)


def query_verdicts(
    decider: ProductDecider, vectors: dict[str, Any], payload: dict[str, Any]
) -> dict[str, Verdict]:
    """The verdicts on a query's best candidates (the query is not in the collection), by
    product id."""
    query = Product(QUERY_ID, payload, vectors)
    return {v.product_id: v for v in decider.verdicts(query, stored=False)}


@dataclass(frozen=True)
class Assignment:
    """Where a product went, and the evidence."""

    product_id: str
    cluster_id: str
    #: "founded" (a new cluster) or "joined"
    how: str
    #: the matches that decided, most probable first, each with its cluster
    matches: list[dict[str, Any]] = field(default_factory=list)
    #: other clusters its matches are in (a merge with each is proposed)
    proposed_merges: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form."""
        return dict(vars(self))


class Assigner:
    """Assigns products of one collection to its stored clusters (see the module docstring)."""

    def __init__(self, index: Index, log: ClusterLog, decider: ProductDecider | None = None):
        self.index, self.log = index, log
        self.decider = decider or ProductDecider(index, log=log)

    def assign_pending(self, product_ids: Sequence[str]) -> list[Assignment]:
        """Assign, in this order, the products not in a cluster or changed since they joined
        (their content hash differs); a re-run after a kill assigns exactly the rest."""
        stored = self.index.content_hashes(product_ids)
        pending = []
        for pid in product_ids:
            member = self.log.member(pid)
            if pid in stored and (member is None or member.content_hash != stored[pid]):
                pending.append(pid)
        return self.assign(pending)

    def assign(self, product_ids: Sequence[str]) -> list[Assignment]:
        """Assign stored products, one after the other in this order (each sees the clusters
        the previous ones joined); the log commits each before its payload copy is written."""
        out = []
        stored = {p.product_id: p for p in self.index.products(product_ids, with_vectors=True)}
        for product in (stored[pid] for pid in product_ids if pid in stored):
            assignment = self._assignment(product)
            evidence = {"matches": assignment.matches}
            self.log.join(
                product.product_id,
                assignment.cluster_id,
                product.payload.get("content_hash"),
                assignment.how,
                evidence,
                [(other, evidence) for other in assignment.proposed_merges],
            )
            self.index.set_payload(product.product_id, {CLUSTER_KEY: assignment.cluster_id})
            out.append(assignment)
        return out

    def _assignment(self, product: Product) -> Assignment:
        matched = [v for v in self.decider.verdicts(product) if v.matched]
        clusters = self.log.clusters_of(v.product_id for v in matched)
        evidence = [{**v.as_dict(), "cluster_id": clusters.get(v.product_id)} for v in matched]
        in_clusters = [clusters[v.product_id] for v in matched if v.product_id in clusters]
        if not in_clusters:
            founded = new_cluster_id(product.product_id)
            return Assignment(product.product_id, founded, "founded", evidence)
        others = sorted(set(in_clusters) - {in_clusters[0]})
        return Assignment(product.product_id, in_clusters[0], "joined", evidence, others)
