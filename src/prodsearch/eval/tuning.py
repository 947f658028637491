"""Tuning on a labelled candidate-pair table: every knob is searched by calling the decision
functions `dedup` runs (`matching.decide`) on the table, scored by the row F1 they give.

The table's per-modality scores are the engine's own, so a rule applied to them reproduces what
the engine keeps (a prefetch keeps a candidate whose score reaches its threshold; RRF keeps the
union; the formula sums weighted scores, 0 where a prefetch missed): `eval` reports every figure
from real engine runs afterwards and checks that they agree with the simulated ones.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from prodsearch.eval.metrics import table_row_f1
from prodsearch.matching import decide
from prodsearch.matching.table import PairTable
from prodsearch.settings import ModalityValues

#: a threshold no score reaches: the modality is off
OFF = 9.0
THRESHOLD_GRID = {
    "text": np.round(np.arange(0.30, 0.981, 0.01), 3),  # ArcFace-tuned cosines run lower
    "chars": np.round(np.arange(0.20, 0.901, 0.01), 3),
    "charcnn": np.round(np.arange(0.30, 0.981, 0.01), 3),
    "image": np.round(np.arange(0.40, 0.981, 0.01), 3),
    "phash": np.round(1.0 - np.arange(0, 17) / 32.0, 5),  # Hamming 0..16
}
WEIGHT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
#: min-2's minimum formula fused score, and the pair model's probabilities
FUSED_GRID = np.round(np.arange(0.2, 1.2, 0.01), 3)
PROBABILITY_GRID = np.round(np.arange(0.05, 0.96, 0.01), 3)


@dataclass
class LabelledTable:
    """A candidate-pair table with its truth: `same` per pair, and for every product of
    `table.ids` whether it is scored (`queries`) and its true match-set size (itself included)."""

    table: PairTable
    same: np.ndarray
    queries: np.ndarray
    truth_sizes: np.ndarray

    @classmethod
    def from_groups(
        cls, table: PairTable, groups: Mapping[str, Any], queries: Collection[str]
    ) -> LabelledTable:
        """Label a table by product groups (two products match when they share a group)."""
        label = np.array([groups[pid] for pid in table.ids])
        _, inverse, counts = np.unique(label, return_inverse=True, return_counts=True)
        return cls(
            table,
            same=label[table.a] == label[table.b],
            queries=np.array([pid in queries for pid in table.ids]),
            truth_sizes=counts[inverse].astype(float),
        )

    def f1(self, selected: np.ndarray) -> float:
        """The mean row F1 of the queries when the `selected` pairs are predicted."""
        return table_row_f1(self.table, selected, self.same, self.queries, self.truth_sizes)


def tune_single(labelled: LabelledTable, modality: str) -> float:
    """The threshold of one modality alone with the best F1."""
    table = labelled.table
    return float(
        max(
            THRESHOLD_GRID[modality],
            key=lambda t: labelled.f1(decide.modality_passes(table, {modality: t})),
        )
    )


def tune_union(
    labelled: LabelledTable, modalities: Sequence[str], start: dict[str, float]
) -> dict[str, float]:
    """Coordinate ascent over per-modality thresholds of the union (RRF, DBSF) rule."""
    table = labelled.table
    best = dict(start)
    best_f1 = labelled.f1(decide.modality_passes(table, best))
    for _ in range(3):
        improved = False
        for modality in modalities:
            for t in (*THRESHOLD_GRID[modality], OFF):
                trial = {**best, modality: float(t)}
                f1 = labelled.f1(decide.modality_passes(table, trial))
                if f1 > best_f1 + 1e-9:
                    best, best_f1, improved = trial, f1, True
        if not improved:
            break
    return best


def tune_formula(
    labelled: LabelledTable, modalities: Sequence[str], floors: ModalityValues
) -> tuple[dict[str, float], float]:
    """Coordinate ascent over the formula's weights (chars', or the first modality's, fixed at
    1) and a search over its minimum fused score; returns the weights and the minimum."""
    anchor = "chars" if "chars" in modalities else modalities[0]
    weights = {m: 1.0 for m in modalities}

    def best_minimum(trial: dict[str, float]) -> tuple[float, float]:
        total = decide.formula_scores(labelled.table, trial, floors)
        candidates = np.quantile(total[total > 0], np.linspace(0.5, 0.995, 60))
        return max((labelled.f1(total >= t), float(t)) for t in candidates)

    best_f1, minimum = best_minimum(weights)
    for _ in range(3):
        improved = False
        for modality in (m for m in modalities if m != anchor):
            for weight in WEIGHT_GRID:
                trial = {**weights, modality: weight}
                f1, t = best_minimum(trial)
                if f1 > best_f1 + 1e-9:
                    best_f1, minimum, weights, improved = f1, t, trial, True
        if not improved:
            break
    return weights, round(minimum, 4)


def tune_min2(
    labelled: LabelledTable, matched: np.ndarray, ranking: np.ndarray, grid: np.ndarray
) -> float:
    """min-2's minimum (on `ranking`: a fused score or a probability) with the best F1 over the
    decision `matched`."""
    table = labelled.table
    return float(
        max(
            grid,
            key=lambda t: labelled.f1(matched | decide.min2_additions(table, matched, ranking, t)),
        )
    )


def tune_probability(labelled: LabelledTable, probability: np.ndarray) -> tuple[float, float]:
    """The pair model's minimum probability for a match and min-2's (never above it), each with
    the best F1; the probabilities should be out of fold."""
    minimum = float(max(PROBABILITY_GRID, key=lambda t: labelled.f1(probability >= t)))
    matched = probability >= minimum
    grid = PROBABILITY_GRID[: np.searchsorted(PROBABILITY_GRID, minimum, side="right")]
    return minimum, tune_min2(labelled, matched, probability, grid)
