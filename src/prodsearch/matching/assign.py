"""Assign on arrival: which stored product cluster is a new (or changed) product in?

The product is decided with the decision `dedup` uses, on its neighbourhood (`candidates.
neighbourhood`: its candidates and its best candidates' candidates, so the features of its
pairs are computed from complete candidate lists, as in a whole-catalog table). Its matches'
clusters decide: none -> it founds a cluster; one -> it joins it; several -> it joins the one of
its most probable match, and a merge of the others is proposed for review rather than made (a
product linking two clusters is as often a look-alike as a bridge). Products not yet in a
cluster (assigned later in the same batch) count as no cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prodsearch.index import Index, Product
from prodsearch.matching import decide
from prodsearch.matching.candidates import Neighbourhood, neighbourhood
from prodsearch.matching.cluster_log import CLUSTER_KEY, ClusterLog, new_cluster_id
from prodsearch.matching.dedup import decide_by_pair_model, default_search
from prodsearch.matching.features import NEIGHBOURS
from prodsearch.matching.pair_model import PairModel
from prodsearch.settings import DedupSettings, SearchSettings

#: how many of a product's best candidates have their own candidates read (their pairs with the
#: product get complete features; a match further down is not considered)
DEPTH = 10


@dataclass(frozen=True)
class Assignment:
    """Where a product went, and the evidence."""

    product_id: str
    cluster_id: str
    #: "founded" (a new cluster), "joined"
    how: str
    #: the matches that decided, most probable first: product id, cluster, probability (None
    #: when a score rule decided), fused score, each modality's score
    matches: list[dict[str, Any]] = field(default_factory=list)
    #: other clusters its matches are in (a merge with each is proposed)
    proposed_merges: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form."""
        return dict(vars(self))


class Assigner:
    """Assigns products of one collection to its stored clusters (see the module docstring)."""

    def __init__(
        self,
        index: Index,
        log: ClusterLog,
        knobs: DedupSettings | None = None,
        search: SearchSettings | None = None,
    ) -> None:
        self.index, self.log = index, log
        self.knobs = knobs or index.settings.dedup
        self.search = search or default_search(index)
        self.model = (
            PairModel.load(self.knobs.pair_model.model)
            if self.knobs.decider == "pair-model"
            else None
        )

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
            assignment = self._decide(product)
            self.log.join(
                product.product_id,
                assignment.cluster_id,
                product.payload.get("content_hash"),
                assignment.how,
                {"matches": assignment.matches},
                [(other, {"matches": assignment.matches}) for other in assignment.proposed_merges],
            )
            self.index.set_payload(product.product_id, {CLUSTER_KEY: assignment.cluster_id})
            out.append(assignment)
        return out

    def _decide(self, product: Product) -> Assignment:
        found = neighbourhood(self.index, product, self.search, DEPTH)
        table = found.table
        mine = table.a == 0  # the product is the table's first id
        if mine.any():
            self._decide_table(found)
        matched = np.flatnonzero(mine & table.matched()) if mine.any() else np.zeros(0, int)
        ids = [table.ids[b] for b in table.b[matched]]
        clusters = self.log.clusters_of(ids)
        probability = table.column("probability")[matched] if mine.any() else np.zeros(0)
        fused = table.fused[matched] if mine.any() else np.zeros(0)
        key = np.nan_to_num(probability, nan=0.0) + fused * 1e-6  # fused breaks ties
        order = np.argsort(-key, kind="stable")
        evidence = [
            {
                "product_id": ids[i],
                "cluster_id": clusters.get(ids[i]),
                "probability": None
                if np.isnan(probability[i])
                else round(float(probability[i]), 4),
                "fused": round(float(fused[i]), 4),
                "scores": {
                    m: round(float(table.scores(m)[matched[i]]), 4)
                    for m in table.modalities()
                    if not np.isnan(table.scores(m)[matched[i]])
                },
            }
            for i in order
        ]
        in_clusters = [e["cluster_id"] for e in evidence if e["cluster_id"]]
        if not in_clusters:
            return Assignment(
                product.product_id, new_cluster_id(product.product_id), "founded", evidence
            )
        others = sorted(set(in_clusters) - {in_clusters[0]})
        return Assignment(product.product_id, in_clusters[0], "joined", evidence, others)

    def _decide_table(self, found: Neighbourhood) -> None:
        """Decide the neighbourhood table as `dedup` decides a catalog's."""
        table = found.table
        if self.model is None:
            decide.record(
                table, decide.search_passes(table, self.search), decide.search_rule(self.search)
            )
            if self.knobs.min2:
                decide.record_min2(table, table.fused, self.knobs.fusion.min2_min_fused_score)
            return
        queried = np.unique(table.a)  # the product and its best candidates: complete lists
        eligible = (table.a == 0) & np.isin(table.b, queried)
        eligible |= (table.b == 0) & np.isin(table.a, queried)
        decide_by_pair_model(table, self._products(found), self.model, self.knobs, eligible)

    def _products(self, found: Neighbourhood) -> list[Product]:
        """Every product of the table with its payload; with its vectors where its blended
        vector enters the product's features (itself, its best candidates and their
        neighbourhoods)."""
        table = found.table
        near = np.isin(table.a, np.unique(table.a))
        close = table.column("rank") <= NEIGHBOURS
        wanted = {0, *table.b[near & close].tolist(), *table.a.tolist()}
        ids = [table.ids[i] for i in sorted(wanted)]
        stored = {p.product_id: p for p in self.index.products(ids, with_vectors=True)}
        return [
            stored.get(pid) or Product(pid, payload, {}) for pid, payload in found.payloads.items()
        ]


def _rounded(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 4)
