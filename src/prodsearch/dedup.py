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

Or, instead of steps 1-3, the **pair model** (`pair_model`, the default where it covers the
collection's modalities): every product's candidates (the formula fusion without its threshold)
are scored by the stacked trees of `pair_model.py` (engine scores, neighbourhood, blended-vector
and title features, then graph features of the previous stage's probabilities); a pair matches
when its probability reaches the model's threshold, min-2 uses a looser one, then clusters.
Either way `DedupResult.write_pairs_csv` writes the audit trail: every match with its scores,
the signals that fired and its probability.
"""

from __future__ import annotations

import csv
import json
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prodsearch.encoders.base import SparseVec, Vector
from prodsearch.errors import ConfigError
from prodsearch.filters import Condition, FilterSpec, Range
from prodsearch.index import Index, Match, MatchOptions
from prodsearch.pair_model import (
    BLENDED_MODALITIES,
    CandidatePairs,
    PairModel,
    pair_features,
)
from prodsearch.settings import MODALITIES, DedupSettings, PairModelSettings
from prodsearch.store import PointRecord, point_id

BLENDED_SUFFIX = "__blended"
#: the columns of `dedup`'s audit trail (`DedupResult.write_pairs_csv`)
PAIR_COLUMNS = ("id", "match", "score", "probability", "min2", *MODALITIES, "matched_by")


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
    #: decide matches with this learned pair model instead of the fusion's threshold (blending
    #: is then not run)
    pair_model: PairModelSettings | None = None
    #: when the pair model does not cover the collection's modalities: match with the fusion
    #: (blending, min-2) instead of raising ConfigError
    pair_model_fallback: bool = False

    @classmethod
    def from_settings(
        cls,
        knobs: DedupSettings,
        *,
        pair_model: bool | None = None,
        blend_rounds: int | None = None,
        min2: bool | None = None,
        max_cluster_size: int | None = None,
        **filters: Any,
    ) -> DedupOptions:
        """The options `prodsearch dedup` runs with: the settings' knobs, then the caller's.

        Unless asked otherwise the pair model decides (when enabled in the settings and no
        blending rounds are asked for), falling back to the fusion on a collection whose
        modalities it does not cover. Asking for both the pair model and blending is an error.
        """
        if pair_model and blend_rounds:
            raise ConfigError(
                "the pair model and blending are alternatives (the model is fitted on unblended "
                "candidates): ask for one of them"
            )
        use_pair_model = knobs.pair_model.enabled and not blend_rounds
        if pair_model is not None:
            use_pair_model = pair_model
        return cls(
            pair_model=knobs.pair_model if use_pair_model else None,
            pair_model_fallback=pair_model is None,
            blend_rounds=knobs.blend_rounds if blend_rounds is None else blend_rounds,
            min2=knobs.min2 if min2 is None else min2,
            min2_threshold=knobs.min2_threshold,
            max_cluster_size=max_cluster_size or knobs.max_cluster_size,
            **filters,
        )

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
    #: what decided the matches: "pair model" or "fusion" (the fusion's threshold)
    decided_by: str = "fusion"
    #: what a user should know about the run (e.g. why the pair model did not apply)
    notes: list[str] = field(default_factory=list)

    def write_csv(self, path: Path) -> None:
        """Write `id,matches,cluster,min2` (matches: space-separated ids, the product first)."""
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "matches", "cluster", "min2"])
            for pid, hood in self.neighbourhoods.items():
                writer.writerow([pid, " ".join(hood.ids()), self.clusters[pid], int(hood.by_min2)])

    def write_pairs_csv(self, path: Path) -> None:
        """Write the audit trail: one row per (product, match) with `PAIR_COLUMNS` (the fused
        score, the pair model's probability when it decided, min-2, each modality's engine
        score, empty when that prefetch missed, and the signals that fired)."""
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(PAIR_COLUMNS)
            for pid, hood in self.neighbourhoods.items():
                for match in hood.matches:
                    if match.product_id == pid:
                        continue
                    writer.writerow(
                        [
                            pid,
                            match.product_id,
                            round(match.score, 4),
                            "" if match.probability is None else match.probability,
                            int(hood.by_min2),
                            *(
                                round(match.scores[m], 4) if m in match.scores else ""
                                for m in MODALITIES
                            ),
                            " ".join(match.matched_by),
                        ]
                    )


def read_pair_verdict(path: Path, product_a: str, product_b: str) -> dict[str, Any] | None:
    """What a `dedup` run recorded in its audit trail (`write_pairs_csv`) for B among A's matches:
    fused score, probability (None when the fusion decided), min2, per-modality scores and the
    signals that fired; None when that run did not match them. Raises ConfigError when the file
    cannot be read as an audit trail."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != PAIR_COLUMNS:
                raise ConfigError(f"{path} is not a dedup audit trail (columns {PAIR_COLUMNS})")
            for row in reader:
                if row["id"] == product_a and row["match"] == product_b:
                    return {
                        "score": float(row["score"]),
                        "probability": float(row["probability"]) if row["probability"] else None,
                        "min2": row["min2"] == "1",
                        "scores": {m: float(row[m]) for m in MODALITIES if row[m]},
                        "matched_by": row["matched_by"].split(),
                    }
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return None


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
    return dict(
        batched_matches(
            index,
            products,
            options,
            index.settings.prefetch_limit,
            batch_size,
            progress,
            checkpoint,
        )
    )


def batched_matches(
    index: Index,
    products: Sequence[Any],
    options: DedupOptions,
    k: int,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
    checkpoint: Path | None = None,
) -> Iterator[tuple[str, list[Match]]]:
    """Yield (product id, its top-`k` fused matches) for every product, in batched engine
    requests; the products a checkpoint holds first (read back from it), then the others (each
    finished batch appended to the checkpoint)."""
    fingerprint = _fingerprint(index, len(products), options, k)
    done: set[str] = set()
    for record in _checkpoint_lines(checkpoint, fingerprint) if checkpoint else ():
        done.add(record["id"])
        yield record["id"], [_unslim(m) for m in record["matches"]]
    if done and progress:
        progress(len(done))
    todo = [p for p in products if p.payload["product_id"] not in done]
    handle = None
    if checkpoint:
        handle = checkpoint.open("a", encoding="utf-8")
        if not done:
            handle.truncate(0)
            handle.write(json.dumps({"fingerprint": fingerprint}) + "\n")
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            queries = [p.vectors for p in chunk]
            filters = [relative_filter(p.payload, options) for p in chunk]
            results = index.match_vectors(queries, MatchOptions(k=k), filters)
            results = [[_slim(m) for m in matches] for matches in results]
            if handle:
                for product, matches in zip(chunk, results, strict=True):
                    record = {"id": product.payload["product_id"], "matches": matches}
                    handle.write(json.dumps(record) + "\n")
                handle.flush()
            for product, matches in zip(chunk, results, strict=True):
                yield product.payload["product_id"], [_unslim(m) for m in matches]
            if progress:
                progress(len(chunk))
    finally:
        if handle:
            handle.close()


def _slim(match: Match) -> dict[str, Any]:
    return {
        "product_id": match.product_id,
        "score": match.score,
        "scores": match.scores,
        "matched_by": list(match.matched_by),
    }


def _unslim(record: dict[str, Any]) -> Match:
    """A match as whole-catalog matching keeps it (its payload reduced to the product id)."""
    return Match(
        record["product_id"],
        record["score"],
        record["scores"],
        tuple(record["matched_by"]),
        {"product_id": record["product_id"]},
    )


def _fingerprint(index: Index, n_products: int, options: DedupOptions, k: int) -> str:
    settings = index.settings.model_dump_json(
        include={"thresholds", "fusion", "formula", "prefetch_limit", "rrf_k"}
    )
    parts = (index.collection, n_products, k, options.same, options.different, options.filter)
    parts += (settings,)
    return "|".join(map(str, parts))


def _checkpoint_lines(path: Path, fingerprint: str) -> Iterator[dict[str, Any]]:
    """The records of a checkpoint written with this fingerprint (a previous run on the same
    collection and settings), up to a line cut by a kill."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as handle:
        try:
            header = json.loads(next(handle))
        except (StopIteration, json.JSONDecodeError):
            return
        if header.get("fingerprint") != fingerprint:
            return
        for line in handle:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill: that batch is redone
                return


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


def collect_candidates(
    index: Index,
    products: Sequence[Any],
    options: DedupOptions,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
    checkpoint: Path | None = None,
) -> CandidatePairs:
    """Every product's candidates: the formula fusion with no threshold (each prefetch cut at its
    floor, every prefetch's hits kept), in batched engine requests, resumable with a checkpoint
    like `fused_neighbours`; candidates outside `products` are left out."""
    generator = index.with_settings(
        fusion="formula", formula=index.settings.formula.model_copy(update={"threshold": None})
    )
    k = index.settings.prefetch_limit * len(MODALITIES)
    results = batched_matches(generator, products, options, k, batch_size, progress, checkpoint)
    return _flatten_candidates(results, [p.payload["product_id"] for p in products])


def _flatten_candidates(
    results: Iterable[tuple[str, list[Match]]], ids: list[str]
) -> CandidatePairs:
    """Flatten (product id, its candidates) into pairs over `ids` (the product itself and
    candidates not in `ids` left out)."""
    position = {pid: i for i, pid in enumerate(ids)}
    query, candidate, total = array("l"), array("l"), array("d")
    scores = {m: array("d") for m in MODALITIES}
    for pid, matches in results:
        for m in matches:
            other = position.get(m.product_id)
            if other is None or m.product_id == pid:
                continue
            query.append(position[pid])
            candidate.append(other)
            total.append(m.score)
            for modality, values in scores.items():
                values.append(m.scores.get(modality, np.nan))
    return CandidatePairs(
        ids=ids,
        query=np.asarray(query, dtype=np.int64),
        candidate=np.asarray(candidate, dtype=np.int64),
        total=np.asarray(total, dtype=np.float64),
        scores={m: np.asarray(v, dtype=np.float64) for m, v in scores.items()},
    )


def candidate_features(
    index: Index,
    products: Sequence[Any],
    pairs: CandidatePairs,
    modalities: Sequence[str],
    knobs: PairModelSettings,
) -> np.ndarray:
    """The pair model's features of every candidate pair (`pair_features`), from the stored
    vectors and titles of `products` (every product `pairs.ids` names, in any order) and the
    index's formula threshold (the blending threshold)."""
    by_id = {p.payload["product_id"]: p for p in products}
    ordered = [by_id[pid] for pid in pairs.ids]
    dense = {}
    for modality in (m for m in modalities if m in BLENDED_MODALITIES):
        width = next(len(p.vectors[modality]) for p in ordered if modality in p.vectors)
        matrix = np.zeros((len(ordered), width), dtype=np.float32)
        for row, product in enumerate(ordered):
            if modality in product.vectors:
                matrix[row] = product.vectors[modality]
        dense[modality] = matrix
    threshold = index.settings.formula.threshold
    return pair_features(
        pairs,
        modalities,
        neighbour_threshold=knobs.neighbour_threshold,
        blend_threshold=knobs.neighbour_threshold if threshold is None else threshold,
        dense=dense,
        titles=[str(p.payload.get("title") or "") for p in ordered],
    )


def pair_neighbours(
    pairs: CandidatePairs,
    probabilities: np.ndarray,
    settings: PairModelSettings,
    floors: Mapping[str, float],
    min2: bool,
) -> tuple[dict[str, list[Match]], set[str]]:
    """Each product's matches: the candidates whose probability reaches `settings.threshold`,
    most probable first; with `min2`, a product left alone takes its most probable candidate when
    that reaches `settings.min2_threshold`. Returns the matches and the ids min-2 rescued."""
    order = np.lexsort((-probabilities, pairs.query))
    chosen: dict[int, list[int]] = {}
    best: dict[int, int] = {}
    for row in order.tolist():
        q = int(pairs.query[row])
        best.setdefault(q, row)
        if probabilities[row] >= settings.threshold:
            chosen.setdefault(q, []).append(row)
    rescued: set[str] = set()
    if min2:
        for q, row in best.items():
            if q not in chosen and probabilities[row] >= settings.min2_threshold:
                chosen[q] = [row]
                rescued.add(pairs.ids[q])

    def as_match(row: int) -> Match:
        pid = pairs.ids[int(pairs.candidate[row])]
        scores = {m: float(v[row]) for m, v in pairs.scores.items() if not np.isnan(v[row])}
        return Match(
            product_id=pid,
            score=float(pairs.total[row]),
            scores=scores,
            matched_by=tuple(m for m in MODALITIES if m in scores and scores[m] >= floors[m]),
            payload={"product_id": pid},
            probability=round(float(probabilities[row]), 4),
        )

    out = {pid: [as_match(row) for row in chosen.get(q, [])] for q, pid in enumerate(pairs.ids)}
    return out, rescued


def pair_model_mismatch(model: PairModel, products: Sequence[Any], collection: str) -> str | None:
    """Why the pair model cannot score these products (it reads other modalities), or None."""
    stored = [m for m in MODALITIES if any(m in p.vectors for p in products)]
    if set(model.modalities) == set(stored):
        return None
    return (
        f"the pair model was fitted on modalities {list(model.modalities)}; the products "
        f"of collection {collection!r} have vectors for {stored}"
    )


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
    """Edges of the match graph weighted by the pair model's probability of the match, or else
    by its strongest per-modality score."""
    edges = []
    for pid, matches in neighbours.items():
        for m in matches:
            if m.product_id != pid and m.product_id in neighbours:
                weight = m.probability
                if weight is None:
                    weight = max(m.scores.values(), default=0.0)
                edges.append((weight, pid, m.product_id))
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
    notes: list[str] = []
    seconds: dict[str, float] = {}
    model = PairModel.load(options.pair_model.model) if options.pair_model else None
    start = time.perf_counter()
    products = list(stored_products(index))
    seconds["read vectors"] = time.perf_counter() - start
    problem = pair_model_mismatch(model, products, index.collection) if model else None
    if problem:
        if not options.pair_model_fallback:
            raise ConfigError(
                f"{problem}: fit one on a labelled sample of this catalog with `prodsearch "
                "eval --write-settings`, or pass --no-pair-model"
            )
        notes.append(f"{problem}: matched with the fusion instead")
        model = None
    index_filter_fields(index, products, options.filter_keys())

    def step(name: str) -> Callable[[int], None]:
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            if progress:
                progress(name, done[0], len(products))

        return advance

    if model is not None:
        return _pair_model_dedup(index, products, options, model, seconds, step, checkpoint)
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
    return DedupResult(hoods, clusters, seconds, decided_by="fusion", notes=notes)


def _pair_model_dedup(
    index: Index,
    products: Sequence[Any],
    options: DedupOptions,
    model: PairModel,
    seconds: dict[str, float],
    step: Callable[[str], Callable[[int], None]],
    checkpoint: Path | None,
) -> DedupResult:
    """Whole-catalog matching decided by the pair model: candidates, features, probabilities,
    min-2 on the probabilities, clusters."""
    knobs = options.pair_model
    assert knobs is not None
    start = time.perf_counter()
    pairs = collect_candidates(
        index, products, options, progress=step("candidates"), checkpoint=checkpoint
    )
    seconds["candidates"] = time.perf_counter() - start
    start = time.perf_counter()
    features = candidate_features(index, products, pairs, model.modalities, knobs)
    probabilities = model.probabilities(pairs, features)
    floors = {m: index.settings.formula.floors.get(m) for m in MODALITIES}
    neighbours, rescued = pair_neighbours(pairs, probabilities, knobs, floors, options.min2)
    seconds["pair model"] = time.perf_counter() - start
    start = time.perf_counter()
    ids = pairs.ids
    clusters = capped_components(match_edges(neighbours), ids, options.max_cluster_size)
    seconds["clusters"] = time.perf_counter() - start
    hoods = {pid: Neighbourhood(pid, neighbours[pid], pid in rescued) for pid in ids}
    return DedupResult(hoods, clusters, seconds, decided_by="pair model")


def _blend_settings(index: Index) -> dict[str, Any]:
    """Settings for searching the blended collection (its own tuned fusion, if any)."""
    blended = index.settings.dedup.blended
    return {"fusion": blended.fusion, "thresholds": blended.thresholds, "formula": blended.formula}
