"""Calibrating the decision to one catalog from a few labelled pairs.

The pair model's probability ranks a catalog's candidate pairs well on catalogs it never saw,
but its scale shifts from catalog to catalog (English electronics hold near-identical product
lines; Shopee does not). A few dozen answers cannot refit trees, but they can refit its scale:
Platt scaling, `P(same) = sigmoid(slope * logit(p) + intercept)`, fitted on the labelled pairs
(two parameters, regularised towards the identity, so it stays sane with a handful of labels).

The operating point is then chosen for the whole catalog, not for the labelled pairs: with the
calibrated probabilities of every candidate pair, the expected number of true matches above a
threshold t is the sum of their probabilities, so expected precision = mean of p over the pairs
>= t, expected recall = that sum over the sum of p over all pairs, and the threshold with the
best expected F1 is the operating point (`expected_curve`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from prodsearch.errors import ConfigError
from prodsearch.labels import PairLabel
from prodsearch.matching.table import PairTable
from prodsearch.settings import CalibrationSettings

#: probabilities are clipped to this margin from 0 and 1 before the logit
EPSILON = 1e-4
#: the ridge penalty pulling (slope, intercept) towards (1, 0): the uncalibrated model
PRIOR_STRENGTH = 1.0
#: thresholds of the expected precision/recall curve
CURVE_GRID = np.round(np.arange(0.02, 0.99, 0.01), 3)


@dataclass(frozen=True)
class Calibration:
    """A catalog's recalibration of the pair model and its operating point."""

    slope: float = 1.0
    intercept: float = 0.0
    #: the calibrated probability a match must reach
    min_probability: float = 0.5
    labels: int = 0
    positives: int = 0
    fitted_at: str = ""

    def apply(self, probability: np.ndarray) -> np.ndarray:
        """Calibrated probabilities."""
        return calibrated(probability, self.settings())

    def settings(self) -> CalibrationSettings:
        """The calibration as `dedup.pair_model.calibration` holds it (the operating point goes
        to `min_probability`)."""
        values = asdict(self)
        values.pop("min_probability")
        return CalibrationSettings(**values)


def calibrated(probability: np.ndarray, calibration: CalibrationSettings) -> np.ndarray:
    """Probabilities recalibrated by a catalog's Platt scaling."""
    z = calibration.slope * _logit(probability) + calibration.intercept
    return 1.0 / (1.0 + np.exp(-z))


def uncalibrated(probability: np.ndarray, calibration: CalibrationSettings) -> np.ndarray:
    """The pair model's own probabilities behind calibrated ones (`calibrated` inverted; exact
    away from the EPSILON clip)."""
    if calibration.slope == 0:
        raise ConfigError("a calibration with slope 0 cannot be inverted: fit it again")
    z = (_logit(probability) - calibration.intercept) / calibration.slope
    return 1.0 / (1.0 + np.exp(-z))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPSILON, 1 - EPSILON)
    return np.log(p / (1 - p))


def labelled_probabilities(
    table: PairTable, labels: Sequence[PairLabel]
) -> tuple[np.ndarray, np.ndarray]:
    """The table's probability of each labelled pair that is a candidate pair (either direction)
    and its answer; labelled pairs the engine never proposed are left out."""
    position = {pid: i for i, pid in enumerate(table.ids)}
    probability = table.column("probability")
    by_pair = {
        frozenset((a, b)): p
        for a, b, p in zip(table.a.tolist(), table.b.tolist(), probability.tolist(), strict=True)
    }
    found, answers = [], []
    for label in labels:
        a, b = position.get(label.id_a), position.get(label.id_b)
        p = by_pair.get(frozenset((a, b))) if a is not None and b is not None else None
        if p is not None and not np.isnan(p):
            found.append(p)
            answers.append(label.same)
    return np.array(found, dtype=np.float64), np.array(answers, dtype=bool)


def fit_platt(probability: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of `sigmoid(slope * logit(p) + intercept)` maximising the labels'
    likelihood minus a ridge penalty towards (1, 0) (Newton steps)."""
    x = _logit(probability)
    y = same.astype(np.float64)
    theta = np.array([1.0, 0.0])
    prior = np.array([1.0, 0.0])
    for _ in range(50):
        z = theta[0] * x + theta[1]
        p = 1.0 / (1.0 + np.exp(-z))
        grad = np.array([np.sum((p - y) * x), np.sum(p - y)]) + PRIOR_STRENGTH * (theta - prior)
        w = p * (1 - p)
        hess = np.array(
            [[np.sum(w * x * x), np.sum(w * x)], [np.sum(w * x), np.sum(w)]]
        ) + PRIOR_STRENGTH * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    return float(theta[0]), float(theta[1])


def expected_curve(probability: np.ndarray) -> dict[str, np.ndarray]:
    """Expected precision, recall, F1 and number of matched pairs at each CURVE_GRID threshold,
    from calibrated probabilities of every candidate pair (each pair is one direction: a
    product's candidate)."""
    total = probability.sum()
    precision, recall, f1, count = [], [], [], []
    for t in CURVE_GRID:
        kept = probability[probability >= t]
        tp = kept.sum()
        p = tp / len(kept) if len(kept) else 1.0
        r = tp / total if total else 0.0
        precision.append(p)
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
        count.append(len(kept))
    return {
        "threshold": CURVE_GRID,
        "precision": np.array(precision),
        "recall": np.array(recall),
        "f1": np.array(f1),
        "pairs": np.array(count),
    }


def calibrate(table: PairTable, labels: Sequence[PairLabel]) -> Calibration:
    """Fit the catalog's calibration from labelled pairs over a table the pair model scored
    (its `probability` column): Platt scaling on the labelled candidate pairs, then the
    threshold with the best expected F1 over every candidate pair. Raises ConfigError when no
    labelled pair is a candidate pair, or the answers are all one way."""
    probability, same = labelled_probabilities(table, labels)
    if len(same) == 0:
        raise ConfigError(
            "none of the labelled pairs is among the catalog's candidate pairs: label pairs "
            "from `prodsearch review` or the dedup audit trail"
        )
    if same.all() or not same.any():
        raise ConfigError(
            f"all {len(same)} usable answers are {'same' if same.all() else 'different'}: "
            "calibrating needs both kinds"
        )
    slope, intercept = fit_platt(probability, same)
    fitted = Calibration(slope, intercept, labels=len(same), positives=int(same.sum()))
    calibrated = fitted.apply(table.column("probability"))
    curve = expected_curve(calibrated[~np.isnan(calibrated)])
    best = float(curve["threshold"][int(np.argmax(curve["f1"]))])
    return Calibration(
        slope,
        intercept,
        min_probability=best,
        labels=len(same),
        positives=int(same.sum()),
        fitted_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )


def model_probabilities(table: PairTable, current: CalibrationSettings | None) -> np.ndarray:
    """The pair model's own probabilities of a table a dedup run decided, whose `probability`
    column `current` (the calibration in force, None when none) calibrated. Raises ConfigError
    when the pair model did not score the table (the fusion decided: probabilities all NaN)."""
    probability = table.column("probability") if "probability" in table.frame else None
    if probability is None or np.isnan(probability).all():
        raise ConfigError(
            "the pair model did not decide this catalog (the fusion did), so there are no "
            "probabilities to calibrate"
        )
    return probability if current is None else uncalibrated(probability, current)


def calibrate_decided(
    table: PairTable, labels: Sequence[PairLabel], current: CalibrationSettings | None
) -> Calibration:
    """`calibrate` over a table a dedup run decided under the calibration `current`: refitted
    from the pair model's own probabilities, so a new calibration replaces the one in force
    rather than stacking on it. Raises ConfigError as `model_probabilities` and `calibrate` do."""
    raw = model_probabilities(table, current)
    return calibrate(PairTable(table.ids, table.frame.assign(probability=raw)), labels)
