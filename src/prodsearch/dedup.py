"""Whole-catalog matching: every product's match set, catalog-level post-processing, clusters.

Pipeline (each step switchable, each knob tuned on `val` by `prodsearch eval`):
1. **Fused neighbours**: every product queries the collection with its stored vectors, in
   batched Query API requests (the product finds itself, as in the Shopee task).
2. **Neighbourhood blending** (`blend_rounds`): each dense vector is replaced by the
   score-weighted mean of the vectors of the product's fused matches (so blending follows the
   fused result, not one modality's kNN), the blended vectors go to a derived collection, and
   every product queries again there. Vectors are read back from the engine; no all-pairs matrix.
3. **min-2**: a product left alone takes its best neighbour when that neighbour's fused formula
   score reaches the looser `min2_threshold` (one extra batched request for singletons only).
4. **Clusters**: connected components of the match graph, merged strongest edge first, never
   past `max_cluster_size`.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prodsearch.encoders.base import SparseVec, Vector
from prodsearch.errors import ConfigError
from prodsearch.filters import Condition, FilterSpec, Range
from prodsearch.index import Index, Match, MatchOptions
from prodsearch.settings import MODALITIES
from prodsearch.store import PointRecord, point_id

BLENDED_SUFFIX = "__blended"


@dataclass(frozen=True)
class DedupOptions:
    """Switches and knobs of whole-catalog matching (defaults from settings.dedup)."""

    blend_rounds: int = 0
    min2: bool = True
    min2_threshold: float = 0.5
    max_cluster_size: int = 50
    #: payload keys whose value a match must share with the product (e.g. "category")
    same: tuple[str, ...] = ()
    #: payload keys whose value a match must not share with the product (e.g. "seller")
    different: tuple[str, ...] = ()
    #: (key, fraction): a match's numeric value must be within +-fraction of the product's
    within: tuple[tuple[str, float], ...] = ()
    filter: FilterSpec | None = None

    def filter_keys(self) -> set[str]:
        """Every payload key the relative and absolute filters read."""
        keys = set(self.same) | set(self.different) | {key for key, _ in self.within}
        return keys | (self.filter.keys() if self.filter else set())


@dataclass
class Neighbourhood:
    """One product's match set and why each member is in it."""

    product_id: str
    matches: list[Match]
    by_min2: bool = False

    def ids(self) -> list[str]:
        """The product's match set, itself included, best first."""
        return [
            self.product_id,
            *(m.product_id for m in self.matches if m.product_id != self.product_id),
        ]


@dataclass
class DedupResult:
    """Every product's match set and cluster."""

    neighbourhoods: dict[str, Neighbourhood]
    clusters: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)

    def write_csv(self, path: Path) -> None:
        """Write `id,matches,cluster,min2` (matches: space-separated ids, the product first)."""
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "matches", "cluster", "min2"])
            for pid, hood in self.neighbourhoods.items():
                writer.writerow([pid, " ".join(hood.ids()), self.clusters[pid], int(hood.by_min2)])


def relative_filter(payload: Mapping[str, Any], options: DedupOptions) -> FilterSpec | None:
    """The filter for one product: the absolute filter plus same-/different-value conditions."""
    must = list(options.filter.must) if options.filter else []
    must_not = list(options.filter.must_not) if options.filter else []
    for key in options.same:
        if key in payload:
            must.append(Condition(key=key, value=payload[key]))
    for key in options.different:
        if key in payload:
            must_not.append(Condition(key=key, value=payload[key]))
    for key, fraction in options.within:
        value = payload.get(key)
        if isinstance(value, int | float):
            low, high = sorted((value * (1 - fraction), value * (1 + fraction)))
            must.append(Condition(key=key, range=Range(gte=low, lte=high)))
    return FilterSpec(must=must, must_not=must_not) if must or must_not else None


def stored_products(index: Index, collection: str | None = None, page: int = 1000) -> Iterator[Any]:
    """Yield every stored point (payload and vectors) of a collection, page by page."""
    collection = collection or index.collection
    offset = None
    while True:
        points, offset = index.store.scroll(collection, offset, page, with_vectors=True)
        yield from points
        if offset is None:
            return


def index_filter_fields(index: Index, products: Sequence[Any], keys: set[str]) -> None:
    """Create a payload index on every filtered field (its type read off the stored values), so
    the engine executes the filters with an index."""
    for key in sorted(keys):
        values = [p.payload[key] for p in products if key in p.payload]
        if not values:
            continue
        if all(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
            kind = "keyword"
        elif all(isinstance(v, int) for v in values):
            kind = "integer"
        else:
            kind = "float"
        index.store.create_payload_index(index.collection, key, kind)


def fused_neighbours(
    index: Index,
    products: Sequence[Any],
    options: DedupOptions,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
    checkpoint: Path | None = None,
) -> dict[str, list[Match]]:
    """Each product's fused matches (itself included), in batched engine requests.

    With a `checkpoint` file, every finished batch is appended to it, and a re-run (after a kill)
    reuses the products already done, provided the collection and settings are the same.
    """
    fingerprint = _fingerprint(index, len(products), options)
    out = _read_checkpoint(checkpoint, fingerprint) if checkpoint else {}
    todo = [p for p in products if p.payload["product_id"] not in out]
    if progress and len(out):
        progress(len(out))
    handle = None
    if checkpoint:
        handle = checkpoint.open("a", encoding="utf-8")
        if not out:
            handle.truncate(0)
            handle.write(json.dumps({"fingerprint": fingerprint}) + "\n")
    k = index.settings.prefetch_limit
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            queries = [p.vectors for p in chunk]
            filters = [relative_filter(p.payload, options) for p in chunk]
            results = index.match_vectors(queries, MatchOptions(k=k), filters)
            for product, matches in zip(chunk, results, strict=True):
                out[product.payload["product_id"]] = matches
            if handle:
                for product, matches in zip(chunk, results, strict=True):
                    record = {
                        "id": product.payload["product_id"],
                        "matches": [_slim(m) for m in matches],
                    }
                    handle.write(json.dumps(record) + "\n")
                handle.flush()
            if progress:
                progress(len(chunk))
    finally:
        if handle:
            handle.close()
    return out


def _slim(match: Match) -> dict[str, Any]:
    return {
        "product_id": match.product_id,
        "score": match.score,
        "scores": match.scores,
        "matched_by": list(match.matched_by),
    }


def _fingerprint(index: Index, n_products: int, options: DedupOptions) -> str:
    settings = index.settings.model_dump_json(
        include={"thresholds", "fusion", "formula", "prefetch_limit", "rrf_k"}
    )
    parts = (index.collection, n_products, options.same, options.different, options.filter)
    parts += (settings,)
    return "|".join(map(str, parts))


def _read_checkpoint(path: Path, fingerprint: str) -> dict[str, list[Match]]:
    """The products a previous run finished, if it ran on the same collection and settings."""
    if not path.is_file():
        return {}
    out: dict[str, list[Match]] = {}
    with path.open(encoding="utf-8") as handle:
        lines = iter(handle)
        try:
            header = json.loads(next(lines))
        except (StopIteration, json.JSONDecodeError):
            return {}
        if header.get("fingerprint") != fingerprint:
            return {}
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill: that batch is redone
                break
            out[record["id"]] = [
                Match(
                    m["product_id"],
                    m["score"],
                    m["scores"],
                    tuple(m["matched_by"]),
                    {"product_id": m["product_id"]},
                )
                for m in record["matches"]
            ]
    return out


def blended_vectors(
    products: Sequence[Any], neighbours: Mapping[str, list[Match]], modalities: Sequence[str]
) -> dict[str, dict[str, Vector]]:
    """Each product's dense vectors replaced by the score-weighted mean over its fused matches
    (itself with weight 1); sparse and hash vectors are kept as they are."""
    by_id = {p.payload["product_id"]: p for p in products}
    out: dict[str, dict[str, Vector]] = {}
    for product_id, product in by_id.items():
        vectors = dict(product.vectors)
        for modality in modalities:
            own = product.vectors.get(modality)
            if own is None or isinstance(own, SparseVec):
                continue
            total = np.array(own, dtype=np.float64)
            for match in neighbours.get(product_id, []):
                other = by_id.get(match.product_id)
                score = match.scores.get(modality)
                if match.product_id == product_id or other is None or score is None:
                    continue
                if modality in other.vectors:
                    total += max(score, 0.0) * np.asarray(other.vectors[modality], dtype=np.float64)
            vectors[modality] = (total / np.linalg.norm(total)).astype(np.float32)
        out[product_id] = vectors
    return out


def write_blended(
    index: Index, vectors: Mapping[str, dict[str, Vector]], payloads: Mapping[str, dict]
) -> Index:
    """Write blended vectors to the derived collection and return an Index on it."""
    blended = Index(index.store, index.collection + BLENDED_SUFFIX, index.settings, index.encoders)
    if index.store.has_collection(blended.collection):
        index.store.delete_collection(blended.collection)
    blended.ensure_collection()
    points = [PointRecord(point_id(pid), v, payloads[pid]) for pid, v in vectors.items()]
    for start in range(0, len(points), 512):
        index.store.upsert(blended.collection, points[start : start + 512])
    index.store.build_index(blended.collection)
    return blended


def min2_rescue(
    index: Index, products: Sequence[Any], neighbours: dict[str, list[Match]], options: DedupOptions
) -> set[str]:
    """Give each product left alone its best neighbour if the formula's fused score reaches
    `min2_threshold`; return the ids rescued."""
    alone = [
        p
        for p in products
        if not [
            m
            for m in neighbours[p.payload["product_id"]]
            if m.product_id != p.payload["product_id"]
        ]
    ]
    if not alone:
        return set()
    loose = index.with_settings(
        fusion="formula",
        formula=index.settings.formula.model_copy(update={"threshold": options.min2_threshold}),
    )
    results = loose.match_vectors(
        [p.vectors for p in alone],
        MatchOptions(k=2),
        [relative_filter(p.payload, options) for p in alone],
    )
    rescued = set()
    for product, matches in zip(alone, results, strict=True):
        pid = product.payload["product_id"]
        others = [m for m in matches if m.product_id != pid]
        if others:
            neighbours[pid] = [*neighbours[pid], others[0]]
            rescued.add(pid)
    return rescued


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


def match_edges(neighbours: Mapping[str, list[Match]]) -> list[tuple[float, str, str]]:
    """Edges of the match graph weighted by the strongest per-modality score of the match."""
    edges = []
    for pid, matches in neighbours.items():
        for m in matches:
            if m.product_id != pid and m.product_id in neighbours:
                edges.append((max(m.scores.values(), default=0.0), pid, m.product_id))
    return edges


def run_dedup(
    index: Index,
    options: DedupOptions,
    progress: Callable[[str, int, int], None] | None = None,
    checkpoint: Path | None = None,
) -> DedupResult:
    """Match every product of the index's collection against it and cluster the result.

    `checkpoint` makes the first (longest) pass resumable after a kill.
    """
    if options.max_cluster_size < 1:
        raise ConfigError("max_cluster_size must be at least 1")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    products = list(stored_products(index))
    seconds["read vectors"] = time.perf_counter() - start
    index_filter_fields(index, products, options.filter_keys())

    def step(name: str) -> Callable[[int], None]:
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            if progress:
                progress(name, done[0], len(products))

        return advance

    start = time.perf_counter()
    neighbours = fused_neighbours(
        index, products, options, progress=step("fused neighbours"), checkpoint=checkpoint
    )
    seconds["fused neighbours"] = time.perf_counter() - start
    searched = index
    for round_number in range(options.blend_rounds):
        start = time.perf_counter()
        dense = [
            m
            for m in MODALITIES
            if index.encoders.encoders.get(m) and not index.encoders[m].sparse and m != "phash"
        ]
        vectors = blended_vectors(products, neighbours, dense)
        payloads = {p.payload["product_id"]: p.payload for p in products}
        searched = write_blended(index, vectors, payloads).with_settings(**_blend_settings(index))
        products = list(stored_products(searched))
        neighbours = fused_neighbours(
            searched, products, options, progress=step(f"blend round {round_number + 1}")
        )
        seconds[f"blend round {round_number + 1}"] = time.perf_counter() - start
    rescued: set[str] = set()
    if options.min2:
        start = time.perf_counter()
        rescued = min2_rescue(searched, products, neighbours, options)
        seconds["min-2"] = time.perf_counter() - start
    start = time.perf_counter()
    ids = list(neighbours)
    clusters = capped_components(match_edges(neighbours), ids, options.max_cluster_size)
    seconds["clusters"] = time.perf_counter() - start
    hoods = {pid: Neighbourhood(pid, neighbours[pid], pid in rescued) for pid in ids}
    return DedupResult(hoods, clusters, seconds)


def _blend_settings(index: Index) -> dict[str, Any]:
    """Settings for searching the blended collection (its own tuned fusion, if any)."""
    blended = index.settings.dedup.blended
    return {"fusion": blended.fusion, "thresholds": blended.thresholds, "formula": blended.formula}
