"""The pair model's features, computed from the candidate-pair table.

Every feature is judged against the catalog it comes from, so that a model fitted on some
catalogs decides on another (README, "Transfer"):
- per signal (each modality the model reads, and the fused score): the score, its ranks both
  ways, gaps to each side's best, margins over each side's 2nd/5th/10th best, CSLS, the density
  of each side's top (read off the two products' own candidate lists), and the score's quantile
  among the table's pairs (`relative.signal_features`);
- the titles' model codes (`relative.code_features`) and numbers (`numbers_jaccard` of the two
  titles' number sets, -1 when either has none; `numbers_disjoint`; `numbers_one_sided`);
- the words one title has and the other lacks, weighted by their IDF in the catalog
  (`relative.token_features`: "upgrade", "academic", "extended" tell editions apart);
- `neighbours_jaccard`: the overlap of the two products' neighbourhoods (each product and its
  `NEIGHBOURS` best candidates by fused score);
- `blended_<m>` for each blended modality: the cosine of the two products' blended vectors
  (`blend.blend` over each product's mutual `NEIGHBOURS` best candidates), i.e. neighbourhood
  blending as a feature (missing where either product has no vector of m: a title-only query
  beside a listing with a photo is not "different" by image);
- from the second stage of the stacked model on, graph features of the previous stage's
  probabilities (`STAGE_FEATURES`, `stage_features`).
A signal or modality a catalog lacks is missing (NaN) in every feature it feeds: one model
decides a catalog of titles alone, of titles and hashes, or with photos.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from prodsearch.index import Product
from prodsearch.matching.blend import blend, dense_matrix
from prodsearch.matching.relative import (
    CODE_FEATURES,
    SIGNALS,
    TOKEN_FEATURES,
    CatalogStats,
    code_features,
    signal_features,
    signal_names,
    token_features,
)
from prodsearch.matching.table import PairTable, group_rank

#: the modalities the pair model blends (its image vectors are the fine-tuned head's)
MODEL_BLENDED = ("text", "image")
NUMBER_FEATURES = ("numbers_jaccard", "numbers_disjoint", "numbers_one_sided")
#: a product's neighbourhood: itself and its best candidates by fused score
NEIGHBOURS = 5
#: graph features of a later stage, from the previous stage's symmetric probabilities
STAGE_FEATURES = (
    "previous",
    "shared_weight",
    "shared_count",
    "previous_size",
    "previous_candidate_size",
    "previous_rank",
    "previous_gap",
    "previous_candidate_gap",
)
#: a previous-stage probability that counts a candidate as a probable neighbour
PROBABLE = 0.5
#: pairs per chunk of the row-wise dot products
ROW_DOT_CHUNK = 65_536
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")


def feature_names(stage: int = 1) -> list[str]:
    """The features a stage of the pair model reads, in column order (the pair features, then
    from stage 2 on the previous stage's graph features)."""
    return [
        *(name for signal in SIGNALS for name in signal_names(signal)),
        *CODE_FEATURES,
        *NUMBER_FEATURES,
        *TOKEN_FEATURES,
        "neighbours_jaccard",
        *(f"blended_{m}" for m in MODEL_BLENDED),
        *(STAGE_FEATURES if stage > 1 else ()),
    ]


def title_numbers(title: str) -> frozenset[str]:
    """The numbers in a title (`"Oat drink 1.5L x 6"` -> {"1.5", "6"})."""
    return frozenset(_NUMBER.findall(title.lower()))


def product_titles(products: Sequence[Product]) -> list[str]:
    """Each product's title ("" when it has none)."""
    return [str(p.payload.get("title") or "") for p in products]


def table_features(
    table: PairTable, products: Sequence[Product], stats: CatalogStats | None = None
) -> np.ndarray:
    """`pair_features` of the table, with the dense vectors and titles read off `products`
    (every product the table names, in any order) and the statistics of the whole catalog
    (default: of `products`, when they are the whole catalog)."""
    by_id = {p.product_id: p for p in products}
    ordered = [by_id[pid] for pid in table.ids]
    present = {m for p in ordered for m in p.vectors}
    return pair_features(
        table,
        dense={m: dense_matrix(ordered, m) for m in MODEL_BLENDED if m in present},
        titles=product_titles(ordered),
        stats=stats or CatalogStats.of(product_titles(products)),
    )


def pair_features(
    table: PairTable,
    *,
    dense: Mapping[str, np.ndarray],
    titles: Sequence[str],
    stats: CatalogStats,
) -> np.ndarray:
    """The feature matrix: one row per pair, columns `feature_names()`, NaN where a signal is
    missing. `dense[m]` holds each product's vector of modality m (rows in `table.ids` order,
    zeros where a product has none: its pairs' blended cosine is missing, not 0; a modality absent
    from `dense` is missing for every pair); `titles` each product's title ("" when it has none);
    `stats` the whole catalog's."""
    a, b = table.a, table.b
    columns = [signal_features(table, s, stats.quantiles.get(s)) for s in SIGNALS]
    columns.append(code_features(titles, a, b))
    numbers = [title_numbers(t) for t in titles]
    pairs = zip(a.tolist(), b.tolist(), strict=True)
    columns.append(
        np.array([_number_features(numbers[q], numbers[c]) for q, c in pairs]).reshape(
            -1, len(NUMBER_FEATURES)
        )
    )
    columns.append(token_features(titles, a, b, stats))
    rank = group_rank(a, table.fused)
    close = rank <= NEIGHBOURS
    columns.append(_neighbour_jaccard(table, close)[:, None])
    mutual = close & (table.reverse(rank) <= NEIGHBOURS)
    for modality in MODEL_BLENDED:
        if modality in dense:
            blended = blend(table, modality, dense[modality], mutual)
            present = np.linalg.norm(dense[modality], axis=1) > 0
            cosine = np.where(present[a] & present[b], row_dots(blended, a, b), np.nan)
            columns.append(cosine[:, None])
        else:
            columns.append(np.full((len(table), 1), np.nan))
    return np.column_stack(columns).astype(np.float32)


def _neighbour_jaccard(table: PairTable, close: np.ndarray) -> np.ndarray:
    """The Jaccard overlap of each pair's two neighbourhoods (each product and its `close`
    candidates)."""
    n, a, b = len(table.ids), table.a, table.b
    rows = np.concatenate([a[close], np.arange(n)])
    cols = np.concatenate([b[close], np.arange(n)])
    neighbourhood = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    members = np.asarray(neighbourhood.sum(axis=1)).ravel()
    shared = row_dots(neighbourhood, a, b)
    return shared / (members[a] + members[b] - shared)


def _number_features(mine: frozenset[str], theirs: frozenset[str]) -> tuple[float, float, float]:
    if not mine or not theirs:
        return -1.0, 0.0, float(bool(mine) != bool(theirs))
    shared = len(mine & theirs)
    return shared / len(mine | theirs), float(shared == 0), 0.0


def symmetric(table: PairTable, probabilities: np.ndarray) -> np.ndarray:
    """Each pair's probability averaged with its reverse pair's, where both are candidates."""
    reverse = table.reverse(probabilities)
    return np.where(np.isnan(reverse), probabilities, (probabilities + reverse) / 2)


def stage_features(table: PairTable, previous: np.ndarray) -> np.ndarray:
    """The graph features (`STAGE_FEATURES`) of every pair from the previous stage's symmetric
    probabilities: the previous probability; over candidates x of both products, the sum of
    P(a, x) * P(b, x) and the count of x probable for both; each product's number of probable
    neighbours; the pair's rank by probability among the product's candidates, and its gap to
    the product's and to the candidate's best probability (-1 when the candidate has none)."""
    n, a, b = len(table.ids), table.a, table.b
    weights = sp.csr_matrix((previous, (a, b)), shape=(n, n))
    probable = sp.csr_matrix(((previous >= PROBABLE).astype(np.float64), (a, b)), shape=(n, n))
    sizes = np.asarray(probable.sum(axis=1)).ravel()
    best_of = table.per_product(previous, "max")  # NaN: no candidates
    return np.column_stack(
        [
            previous,
            row_dots(weights, a, b),
            row_dots(probable, a, b),
            sizes[a],
            sizes[b],
            group_rank(a, previous, ties="average"),
            best_of[a] - previous,
            np.nan_to_num(best_of[b] - previous, nan=-1.0),
        ]
    )


def row_dots(matrix: np.ndarray | sp.csr_matrix, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The dot product of rows `left[i]` and `right[i]` of a dense or sparse matrix, for every
    i, in chunks: memory grows with the chunk, not with the pairs times the row width (nor, for a
    sparse matrix, with its much larger product by itself)."""
    out = np.zeros(len(left))
    for start in range(0, len(left), ROW_DOT_CHUNK):
        end = start + ROW_DOT_CHUNK
        mine, theirs = matrix[left[start:end]], matrix[right[start:end]]
        if sp.issparse(matrix):
            out[start:end] = np.asarray(mine.multiply(theirs).sum(axis=1)).ravel()
        else:
            out[start:end] = np.einsum("ij,ij->i", mine, theirs)
    return out
