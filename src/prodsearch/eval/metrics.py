"""Metrics: per-row F1 of match sets (the Shopee metric), pair precision/recall/F1 (pair-labelled
catalogs), and retrieval quality of embeddings (mAP@R, top-1)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from prodsearch.matching.table import PairTable


@dataclass(frozen=True)
class Scores:
    """Precision, recall and F1 (each the mean over rows, or over pairs)."""

    precision: float
    recall: float
    f1: float

    def as_dict(self) -> dict[str, float]:
        """Return a JSON-serialisable form (rounded to 4 places)."""
        return {k: round(v, 4) for k, v in vars(self).items()}


def row_scores(predicted: Sequence[set[str]], truth: Sequence[set[str]]) -> Scores:
    """Return the row-mean precision, recall and F1 of predicted vs true match sets."""
    tp = np.array([len(p & t) for p, t in zip(predicted, truth, strict=True)], dtype=float)
    n_pred = np.array([len(p) for p in predicted], dtype=float)
    n_true = np.array([len(t) for t in truth], dtype=float)
    return Scores(
        precision=float(np.mean(tp / n_pred)),
        recall=float(np.mean(tp / n_true)),
        f1=float(np.mean(2 * tp / (n_pred + n_true))),
    )


def table_row_f1(
    table: PairTable,
    selected: np.ndarray,
    same: np.ndarray,
    queries: np.ndarray,
    truth_sizes: np.ndarray,
) -> float:
    """`row_scores(...).f1` of the match sets a decision gives the table's `queries` (a mask
    over `table.ids`): each product's set is itself plus its `selected` pairs (`same`: the pair
    is one product; `truth_sizes`: each product's true set size, itself included)."""
    n = len(table.ids)
    a = table.a[selected]
    tp = 1 + np.bincount(a, weights=same[selected], minlength=n)
    predicted = 1 + np.bincount(a, minlength=n)
    return float(np.mean((2 * tp / (predicted + truth_sizes))[queries]))


def pair_scores(
    predicted: set[frozenset[str]], labelled: Iterable[tuple[str, str, bool]]
) -> Scores:
    """Precision, recall and F1 over labelled pairs: a pair is predicted same when it is in
    `predicted` (unordered id pairs); pairs labelled neither way are not counted."""
    tp = fp = fn = 0
    for a, b, same in labelled:
        hit = frozenset((a, b)) in predicted
        tp += hit and same
        fp += hit and not same
        fn += same and not hit
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Scores(precision, recall, f1)


def map_at_r(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Mean average precision at R (Musgrave et al. 2020): for each item, R = the number of
    other items of its class; precision is averaged over the relevant items in its top R."""
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    order = np.argsort(-similarity, axis=1)
    scores = []
    for i in range(len(labels)):
        r = int(np.sum(labels == labels[i])) - 1
        if r == 0:
            continue
        relevant = labels[order[i, :r]] == labels[i]
        precision_at = np.cumsum(relevant) / np.arange(1, r + 1)
        scores.append(float(np.sum(precision_at * relevant) / r))
    return float(np.mean(scores))


def top1_accuracy(
    queries: np.ndarray,
    query_labels: np.ndarray,
    catalogue: np.ndarray,
    catalogue_labels: np.ndarray,
) -> float:
    """Fraction of queries whose nearest catalogue item has their label."""
    nearest = np.argmax(queries @ catalogue.T, axis=1)
    return float(np.mean(catalogue_labels[nearest] == query_labels))
