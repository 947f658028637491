"""Candidate generation: every product's candidates from batched engine queries, as one table.

Each product queries the collection with its stored vectors through the formula fusion with its
minimum off: every prefetch keeps the hits whose modality score reaches its floor, and each hit
comes back with the formula's fused score and every modality's engine score. Relative filters
(`RelativeFilters`) run in the engine. The pass is resumable through a `Checkpoint` whose
fingerprint covers every input that changes its result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prodsearch.filters import Condition, FilterSpec, Range
from prodsearch.index import Index, Match, Product
from prodsearch.matching.checkpoint import Checkpoint
from prodsearch.matching.table import SCORE_DECIMALS, PairTable, candidate_order
from prodsearch.query import MatchOptions
from prodsearch.settings import MODALITIES, SearchSettings

#: products per batched engine request
BATCH_SIZE = 256
#: candidates asked beyond a neighbourhood's `limit` (`_best`): room for ties at its cut
TIE_MARGIN = 10


@dataclass(frozen=True)
class RelativeFilters:
    """Conditions a product's candidates must meet, relative to the product's own payload."""

    #: payload keys whose value a candidate must share with the product (e.g. "category")
    same: tuple[str, ...] = ()
    #: payload keys whose value a candidate must not share with the product (e.g. "seller")
    different: tuple[str, ...] = ()
    #: (key, fraction): a candidate's numeric value within +-fraction of the product's
    within: tuple[tuple[str, float], ...] = ()
    #: an absolute filter every candidate must pass
    filter: FilterSpec | None = None

    def keys(self) -> set[str]:
        """Every payload key the filters read."""
        keys = set(self.same) | set(self.different) | {key for key, _ in self.within}
        return keys | (self.filter.keys() if self.filter else set())

    def for_product(self, payload: Mapping[str, Any]) -> FilterSpec | None:
        """The engine filter for one product's candidates (None: no condition)."""
        must = list(self.filter.must) if self.filter else []
        must_not = list(self.filter.must_not) if self.filter else []
        for key in self.same:
            if key in payload:
                must.append(Condition(key=key, value=payload[key]))
        for key in self.different:
            if key in payload:
                must_not.append(Condition(key=key, value=payload[key]))
        for key, fraction in self.within:
            value = payload.get(key)
            if isinstance(value, int | float):
                low, high = sorted((value * (1 - fraction), value * (1 + fraction)))
                must.append(Condition(key=key, range=Range(gte=low, lte=high)))
        return FilterSpec(must=must, must_not=must_not) if must or must_not else None


def candidate_options(index: Index, search: SearchSettings) -> MatchOptions:
    """The engine query of candidate generation: the search's formula (its weights and floors)
    with no minimum fused score, every prefetch's hits kept."""
    formula = search.formula.model_copy(update={"min_fused_score": None})
    return MatchOptions(
        k=index.settings.prefetch_limit * len(MODALITIES), fusion="formula", formula=formula
    )


def collect_candidates(
    index: Index,
    products: Sequence[Product],
    search: SearchSettings,
    filters: RelativeFilters = RelativeFilters(),
    *,
    progress: Callable[[int], None] | None = None,
    checkpoint: Path | None = None,
) -> PairTable:
    """The candidate-pair table of `products` (each queries with its stored vectors; candidates
    outside `products` are left out). With `checkpoint`, finished batches are appended to that
    file and a re-run with the same inputs resumes from it."""
    options = candidate_options(index, search)
    resumable = Checkpoint(checkpoint, _fingerprint(index, products, options, filters))
    results = _matches(
        index, products, options, filters, resumable if checkpoint else None, progress
    )
    return PairTable.from_matches([p.product_id for p in products], results)


@dataclass(frozen=True)
class Neighbourhood:
    """One product's candidates and its best candidates' candidates, as one table over every
    product they name: the pairs of the product and of its best candidates carry the same
    features as in a whole-catalog table (their candidate lists are complete)."""

    table: PairTable
    #: the payload of every product the table names
    payloads: dict[str, dict[str, Any]]
    #: the product whose neighbourhood this is (the table's first id)
    product: Product


def neighbourhood(
    index: Index,
    product: Product,
    search: SearchSettings,
    depth: int,
    filters: RelativeFilters = RelativeFilters(),
    stored: bool = True,
    limit: int | None = None,
) -> Neighbourhood:
    """The neighbourhood table of a product (`product_id` first in the table's ids): its
    candidates, then the candidates of its `depth` best (by fused score), in two batched engine
    requests. A product the collection does not hold (`stored` False: a query) is added to its
    best candidates' lists as the engine would have found it there (the pair's scores are
    symmetric). `limit`: each list's best candidates by fused score kept (default: every hit of
    every prefetch, as `collect_candidates` keeps them); a decision that reads only each
    product's best N asks for those (and any tied with the N-th: `_best`), and the engine
    returns and scores no more."""
    options = candidate_options(index, search)
    (first,) = _best(index, [product], options, filters, limit and max(limit, depth))
    first = [m for m in first if m.product_id != product.product_id]
    nearest = sorted(first, key=candidate_order)[:depth]
    neighbours = index.products([m.product_id for m in nearest], with_vectors=True)
    found = _best(index, neighbours, options, filters, limit)
    by_id = {m.product_id: m for m in nearest}
    for neighbour, matches in zip(neighbours, found, strict=True):
        if not stored:
            mine = by_id[neighbour.product_id]
            matches.append(Match(product.product_id, mine.score, mine.scores, (), product.payload))
    ids = [p.product_id for p in neighbours]
    results = [(product.product_id, first), *zip(ids, found, strict=True)]
    others: dict[str, dict[str, Any]] = {}
    for _, matches in results:
        others.update((m.product_id, m.payload) for m in matches)
    others.pop(product.product_id, None)
    # the product first, the others by id: the engine's order of tied candidates never shows
    payloads = {product.product_id: product.payload, **dict(sorted(others.items()))}
    return Neighbourhood(PairTable.from_matches(list(payloads), results), payloads, product)


def _best(
    index: Index,
    products: Sequence[Product],
    options: MatchOptions,
    filters: RelativeFilters,
    limit: int | None,
) -> list[list[Match]]:
    """Each product's candidates: all of them (`limit` None), or at least its `limit` best by
    fused score with every candidate tied with the last of those (`candidate_order` breaks ties
    by id, so a list cut among tied scores would differ from run to run): `limit` + TIE_MARGIN
    asked, and a list that ends in a tie with its cut asked again whole."""
    if limit is None:
        return batch_matches(index, products, options, filters)
    asked = replace(options, k=limit + TIE_MARGIN)
    found = batch_matches(index, products, asked, filters)
    cut = [i for i, matches in enumerate(found) if _ends_in_a_tie(matches, limit, asked.k)]
    if cut:
        again = batch_matches(index, [products[i] for i in cut], options, filters)
        for i, matches in zip(cut, again, strict=True):
            found[i] = matches
    return found


def _ends_in_a_tie(matches: Sequence[Match], limit: int, asked: int | None) -> bool:
    """Whether the engine may have left out candidates tied with the `limit`-th best (counting
    the product itself, which its own list may hold)."""
    if len(matches) < (asked or 0):
        return False
    scores = sorted((round(m.score, SCORE_DECIMALS) for m in matches), reverse=True)
    return scores[-1] >= scores[min(limit, len(scores) - 1)]


def _matches(
    index: Index,
    products: Sequence[Product],
    options: MatchOptions,
    filters: RelativeFilters,
    checkpoint: Checkpoint | None,
    progress: Callable[[int], None] | None,
) -> Iterator[tuple[str, list[Match]]]:
    """(product id, its matches) for every product: those a checkpoint holds first, then the
    others in batched engine requests (each finished batch appended to the checkpoint)."""
    done: set[str] = set()
    for record in checkpoint.records() if checkpoint else ():
        done.add(record["id"])
        yield record["id"], [_match(m) for m in record["matches"]]
    if done and progress:
        progress(len(done))
    todo = [p for p in products if p.product_id not in done]
    handle = checkpoint.appender() if checkpoint else None
    try:
        for start in range(0, len(todo), BATCH_SIZE):
            chunk = todo[start : start + BATCH_SIZE]
            found = batch_matches(index, chunk, options, filters)
            for product, matches in zip(chunk, found, strict=True):
                if handle:
                    record = {"id": product.product_id, "matches": [_slim(m) for m in matches]}
                    handle.write(json.dumps(record) + "\n")
                yield product.product_id, matches
            if handle:
                handle.flush()
            if progress:
                progress(len(chunk))
    finally:
        if handle:
            handle.close()


def batch_matches(
    index: Index, products: Sequence[Product], options: MatchOptions, filters: RelativeFilters
) -> list[list[Match]]:
    """Each product's candidates (its stored vectors queried with `options`, its relative
    filters applied in the engine), in one batched engine request; `dedup --ray`'s query workers
    call it on their share of the products."""
    filter_specs = [filters.for_product(p.payload) for p in products]
    return index.match_vectors([p.vectors for p in products], options, filter_specs)


def _slim(match: Match) -> dict[str, Any]:
    return {"product_id": match.product_id, "score": match.score, "scores": match.scores}


def _match(record: dict[str, Any]) -> Match:
    """A candidate as the checkpoint keeps it (no payload, no fired signals)."""
    return Match(record["product_id"], record["score"], record["scores"], ())


def _fingerprint(
    index: Index, products: Sequence[Product], options: MatchOptions, filters: RelativeFilters
) -> str:
    """A digest of every input that changes the candidates: the collection (its name, encoders
    and every product's content hash), the query (fusion, floors, weights, limits, the sparse cut,
    the HNSW breadth) and the filters."""
    content = hashlib.sha256()
    for product in sorted(products, key=lambda p: p.product_id):
        content.update(f"{product.product_id}\t{product.payload.get('content_hash')}\n".encode())
    settings = index.settings.model_dump(
        mode="json",
        include={
            "prefetch_limit",
            "rrf_k",
            "sparse_query_terms",
            "sparse_candidates",
            "hnsw_ef",
            "hnsw_ef_large",
        },
    )
    parts = {
        "collection": index.collection,
        "encoders": index.expected_manifest().encoders,
        "content": content.hexdigest(),
        "k": options.k,
        "formula": options.formula.model_dump(mode="json") if options.formula else None,
        "settings": settings,
        "filters": repr(filters),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
