"""Clusters: connected components of the decided pairs, strongest edges first, capped in size."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prodsearch.index import Index
from prodsearch.matching.cluster_log import CLUSTER_KEY, ClusterLog, new_cluster_id
from prodsearch.matching.table import PairTable


def table_clusters(table: PairTable, cap: int) -> dict[str, int]:
    """The clusters of the table's decided pairs (`capped_components`): each pair's edge weighs
    its probability where the pair model decided, else its strongest modality score."""
    frame = table.frame[table.frame["match"]]
    scores = frame[[c for c in frame.columns if c.startswith("score_")]]
    weight = frame["probability"].fillna(scores.max(axis=1)).fillna(0.0)
    edges = [
        (w, table.ids[a], table.ids[b])
        for w, a, b in zip(weight.tolist(), frame["a"].tolist(), frame["b"].tolist(), strict=True)
    ]
    return capped_components(edges, table.ids, cap)


def capped_components(
    edges: Sequence[tuple[float, str, str]], ids: Sequence[str], cap: int
) -> dict[str, int]:
    """Connected components of the match graph, joining the strongest edges first and never
    letting a component grow past `cap` products; returns product id -> cluster number."""
    parent = {pid: pid for pid in ids}
    size = dict.fromkeys(ids, 1)

    def root(node: str) -> str:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for _, a, b in sorted(edges, key=lambda e: -e[0]):
        ra, rb = root(a), root(b)
        if ra != rb and size[ra] + size[rb] <= cap:
            if size[ra] < size[rb]:
                ra, rb = rb, ra
            parent[rb] = ra
            size[ra] += size[rb]
    numbers: dict[str, int] = {}
    return {pid: numbers.setdefault(root(pid), len(numbers)) for pid in ids}


def cluster_members(clusters: dict[str, int]) -> dict[int, list[str]]:
    """Each cluster's products, in the order `clusters` lists them."""
    members: dict[int, list[str]] = {}
    for pid, number in clusters.items():
        members.setdefault(number, []).append(pid)
    return members


@dataclass(frozen=True)
class CarriedForward:
    """A full run's clusters under stable ids, and what changed against the stored ones."""

    #: product id -> cluster id
    membership: dict[str, str]
    #: (kind, cluster id, products, detail): "new", "merged", "split", "moved"
    events: list[tuple[str, str, list[str], dict[str, Any]]]

    def counts(self) -> dict[str, int]:
        """How many events of each kind, and how many products changed cluster."""
        out: dict[str, int] = {}
        for kind, _, products, _ in self.events:
            out[kind] = out.get(kind, 0) + 1
            if kind == "moved":
                out["products moved"] = out.get("products moved", 0) + len(products)
        return out


def carry_forward(clusters: Mapping[str, int], previous: Mapping[str, str]) -> CarriedForward:
    """Give a run's clusters (product id -> cluster number) stable ids: each previous cluster id
    goes to the new cluster holding most of its members (ties: the smaller id), biggest
    overlaps first, each id to one cluster; a cluster that inherits none takes
    `new_cluster_id` of its smallest product id. Records the merges (a cluster holding members
    of several previous ones), splits (a previous cluster's members in several), products moved
    between clusters, and new clusters."""
    groups = cluster_members(dict(clusters))
    overlaps = []
    for number, members in groups.items():
        counted = Counter(previous[p] for p in members if p in previous)
        overlaps += [(-count, old, number) for old, count in counted.items()]
    named: dict[int, str] = {}
    taken: set[str] = set()
    for _, old, number in sorted(overlaps):
        if number not in named and old not in taken:
            named[number] = old
            taken.add(old)
    membership: dict[str, str] = {}
    events: list[tuple[str, str, list[str], dict[str, Any]]] = []
    for number, members in groups.items():
        cluster = named.get(number) or new_cluster_id(min(members))
        membership.update(dict.fromkeys(members, cluster))
        sources = sorted({previous[p] for p in members if p in previous})
        if cluster not in sources:
            events.append(("new", cluster, sorted(members), {"from": sources}))
        elif len(sources) > 1:
            events.append(("merged", cluster, sorted(members), {"from": sources}))
    old_groups: dict[str, set[str]] = {}
    for pid, old in previous.items():
        old_groups.setdefault(old, set()).add(pid)
    for old, members in sorted(old_groups.items()):
        now_in = sorted({membership[p] for p in members if p in membership})
        if len(now_in) > 1:
            events.append(("split", old, sorted(members), {"into": now_in}))
        moved = sorted(p for p in members if membership.get(p, old) != old)
        if moved:
            events.append(("moved", old, moved, {"to": sorted({membership[p] for p in moved})}))
    return CarriedForward(membership, events)


def store_clusters(
    index: Index, log: ClusterLog, clusters: Mapping[str, int], apply: bool = True
) -> CarriedForward:
    """Carry a full run's clusters forward from the stored ones (`carry_forward`); with `apply`,
    replace the stored clusters with them (log first, then the payload copies)."""
    carried = carry_forward(clusters, log.membership())
    if apply:
        hashes = {p.product_id: p.payload.get("content_hash") for p in index.scroll(False)}
        log.replace_all(carried.membership, hashes, carried.events)
        sync_payloads(index, log)
    return carried


def sync_payloads(index: Index, log: ClusterLog) -> int:
    """Write each product's cluster id from the log into its payload where the copy differs
    (after a run killed between the two); returns how many products were written."""
    membership = log.membership()
    stale: dict[str, list[str]] = {}
    for product in index.scroll(with_vectors=False):
        cluster = membership.get(product.product_id)
        if cluster is not None and product.payload.get(CLUSTER_KEY) != cluster:
            stale.setdefault(cluster, []).append(product.product_id)
    for cluster, product_ids in stale.items():
        index.set_payload(product_ids, {CLUSTER_KEY: cluster})
    return sum(len(ids) for ids in stale.values())
