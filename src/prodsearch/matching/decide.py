"""Decisions over the candidate-pair table: which pairs match, and the rule that decided.

Every rule is a function from table columns to a mask over its pairs; `record` writes the
decision into the table (`match`, `rule`, `probability`). `dedup` runs them, and `eval` tunes
their knobs by calling the same functions on a labelled table.

- the search's own rule (`search_passes`): under RRF or DBSF a pair matches when any modality's
  score reaches its threshold (the engine keeps the union of the thresholded prefetches); under
  the formula, when the fused score reaches `min_fused_score`;
- the pair model: its probability reaches `min_probability`;
- min-2 (`min2_additions`): a product left with no match takes its best candidate (by the
  deciding score) when that reaches a looser minimum.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from prodsearch.matching.table import PairTable
from prodsearch.settings import FormulaWeights, ModalityValues, SearchSettings


def modality_passes(table: PairTable, thresholds: Mapping[str, float]) -> np.ndarray:
    """The pairs where any listed modality's score reaches its threshold (missing scores never
    do)."""
    passes = np.zeros(len(table), dtype=bool)
    for modality, threshold in thresholds.items():
        with np.errstate(invalid="ignore"):
            passes |= np.nan_to_num(table.scores(modality), nan=-np.inf) >= threshold
    return passes


def formula_scores(
    table: PairTable, weights: Mapping[str, float] | FormulaWeights, floors: ModalityValues
) -> np.ndarray:
    """The formula's fused score of every pair under other weights: the weighted sum of the
    modality scores that reach their floor (a prefetch that missed counts 0)."""
    total = np.zeros(len(table))
    for modality in table.modalities():
        weight = weights.get(modality)
        if weight is None:
            continue
        scores = np.nan_to_num(table.scores(modality), nan=0.0)
        total += weight * scores * (scores >= floors.get(modality))
    return total


def search_passes(table: PairTable, search: SearchSettings) -> np.ndarray:
    """The pairs the search's own rule keeps: the formula's fused-score minimum, or (RRF, DBSF)
    the union of the per-modality thresholds."""
    if search.fusion == "formula":
        minimum = search.formula.min_fused_score
        return table.fused >= (-np.inf if minimum is None else minimum)
    return modality_passes(table, {m: search.thresholds.get(m) for m in table.modalities()})


def search_rule(search: SearchSettings) -> str:
    """The name of the rule `search_passes` applies (the table's `rule` column)."""
    return "fused score" if search.fusion == "formula" else "modality score"


def min2_additions(
    table: PairTable, matched: np.ndarray, ranking: np.ndarray, minimum: float
) -> np.ndarray:
    """The pairs min-2 adds: for each product with no matched pair, its best candidate by
    `ranking` (the first in table order among ties), when that reaches `minimum`."""
    added = np.zeros(len(table), dtype=bool)
    if not len(table):
        return added
    a = table.a
    order = np.lexsort((-ranking, a))
    first = order[np.r_[True, a[order][1:] != a[order][:-1]]]
    has_match = np.bincount(a, weights=matched, minlength=len(table.ids)) > 0
    lonely = first[~has_match[a[first]]]
    added[lonely[ranking[lonely] >= minimum]] = True
    return added


def record(
    table: PairTable,
    matched: np.ndarray,
    rule: str,
    probability: np.ndarray | None = None,
) -> None:
    """Write a decision into the table: `match`, `rule` (`rule` where matched, else "") and
    `probability` (NaN when a score rule decided)."""
    frame = table.frame
    frame["probability"] = np.nan if probability is None else probability
    frame["match"] = matched
    frame["rule"] = np.where(matched, rule, "")


def record_min2(table: PairTable, ranking: np.ndarray, minimum: float) -> int:
    """Add min-2's pairs to the table's decision (rule "min-2"); returns how many it added."""
    added = min2_additions(table, table.matched(), ranking, minimum)
    frame = table.frame
    frame.loc[added, "match"] = True
    frame.loc[added, "rule"] = "min-2"
    return int(added.sum())
