"""Clusters: connected components of the decided pairs, strongest edges first, capped in size."""

from __future__ import annotations

from collections.abc import Sequence

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
