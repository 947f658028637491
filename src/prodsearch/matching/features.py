"""The pair model's features, computed from the candidate-pair table.

- `score_<m>`: the engine's score of each modality the model reads (-1 where missing);
- the pair's place among the product's candidates: `total` (the formula's fused score), `rank`,
  `best` (the product's best fused score) and `gap` (best - total);
- the neighbourhoods (candidates with fused score >= `neighbour_min_fused_score`, the product
  included): `jaccard` overlap of the two, their sizes `size` and `candidate_size`, and
  `reverse_total` (the candidate's fused score for the product, -1 when it has none);
- `blended_<m>` for each blended modality: the cosine of the two products' blended vectors
  (`blend.blend` over the pairs with fused score >= the formula's minimum), i.e. neighbourhood
  blending as a feature;
- title numbers (sizes, model codes: `500ml`, `XB-450`): `numbers_jaccard` of the two titles'
  number sets (-1 when either has none), `numbers_disjoint` (both have numbers, none shared),
  `numbers_one_sided` (only one title has numbers);
- from the second stage of the stacked model on, graph features of the previous stage's
  probabilities (`STAGE_FEATURES`, `stage_features`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from prodsearch.index import Product
from prodsearch.matching.blend import blend, blended_modalities, dense_matrix
from prodsearch.matching.table import PairTable

GRAPH_FEATURES = (
    "total",
    "rank",
    "best",
    "gap",
    "jaccard",
    "size",
    "candidate_size",
    "reverse_total",
)
NUMBER_FEATURES = ("numbers_jaccard", "numbers_disjoint", "numbers_one_sided")
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


def feature_names(modalities: Sequence[str], stage: int = 1) -> list[str]:
    """The features a stage of a pair model over these modalities reads, in column order (the
    pair features, then from stage 2 on the previous stage's graph features)."""
    return [
        *(f"score_{m}" for m in modalities),
        *GRAPH_FEATURES,
        *(f"blended_{m}" for m in blended_modalities(modalities)),
        *NUMBER_FEATURES,
        *(STAGE_FEATURES if stage > 1 else ()),
    ]


def title_numbers(title: str) -> frozenset[str]:
    """The numbers in a title (`"Oat drink 1.5L x 6"` -> {"1.5", "6"})."""
    return frozenset(_NUMBER.findall(title.lower()))


def table_features(
    table: PairTable,
    products: Sequence[Product],
    modalities: Sequence[str],
    *,
    neighbour_min_fused_score: float,
    blend_min_fused_score: float,
) -> np.ndarray:
    """`pair_features` of the table, with the dense vectors and titles read off `products`
    (every product the table names, in any order)."""
    by_id = {p.product_id: p for p in products}
    ordered = [by_id[pid] for pid in table.ids]
    return pair_features(
        table,
        modalities,
        neighbour_min_fused_score=neighbour_min_fused_score,
        blend_min_fused_score=blend_min_fused_score,
        dense={m: dense_matrix(ordered, m) for m in blended_modalities(modalities)},
        titles=[str(p.payload.get("title") or "") for p in ordered],
    )


def pair_features(
    table: PairTable,
    modalities: Sequence[str],
    *,
    neighbour_min_fused_score: float,
    blend_min_fused_score: float,
    dense: Mapping[str, np.ndarray],
    titles: Sequence[str],
) -> np.ndarray:
    """The feature matrix: one row per pair, columns `feature_names(modalities)`; missing values
    are -1. `dense[m]` holds each product's vector of modality m (rows in `table.ids` order,
    zeros where a product has none); `titles` each product's title ("" when it has none)."""
    a, b, fused = table.a, table.b, table.fused
    columns: dict[str, np.ndarray] = {
        "total": fused,
        "rank": table.column("rank"),
        "best": fused + table.column("gap"),
        "gap": table.column("gap"),
    }
    close = fused >= neighbour_min_fused_score
    n = len(table.ids)
    rows = np.concatenate([a[close], np.arange(n)])
    cols = np.concatenate([b[close], np.arange(n)])
    neighbourhood = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    members = np.asarray(neighbourhood.sum(axis=1)).ravel()
    shared = row_dots(neighbourhood, a, b)
    columns["jaccard"] = shared / (members[a] + members[b] - shared)
    columns["size"], columns["candidate_size"] = members[a] - 1, members[b] - 1
    columns["reverse_total"] = table.reverse(fused)
    selected = fused >= blend_min_fused_score
    for modality in modalities:
        columns[f"score_{modality}"] = table.scores(modality)
    for modality in blended_modalities(modalities):
        blended = blend(table, modality, dense[modality], selected)
        columns[f"blended_{modality}"] = row_dots(blended, a, b)
    numbers = [title_numbers(t) for t in titles]
    pairs = zip(a.tolist(), b.tolist(), strict=True)
    number_columns = np.array([_number_features(numbers[q], numbers[c]) for q, c in pairs]).reshape(
        -1, len(NUMBER_FEATURES)
    )
    for i, name in enumerate(NUMBER_FEATURES):
        columns[name] = number_columns[:, i]
    matrix = np.column_stack([columns[name] for name in feature_names(modalities)])
    return np.nan_to_num(matrix.astype(np.float64), nan=-1.0)


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
            pd.Series(previous).groupby(a).rank(ascending=False).to_numpy(),
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
