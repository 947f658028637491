"""Fitting the decision to one catalog from labelled pairs (the review page's answers).

The pair model ranks a catalog's candidate pairs well on catalogs it never saw, but neither its
scale nor its ordering is that catalog's: English software listings tell editions apart by a
word ("academic", "upgrade") that Shopee never needed, and near-identical product lines put
different models within a few characters. A catalog's answers teach both:

    P(same) = sigmoid(slope * logit(p) + intercept + sum_f w_f * z_f)

where `p` is the pair model's probability and `z_f` each pair feature (`features.py`, the ones
the model reads) standardised over the catalog's own scored pairs (a missing value counts as
the mean). It is a logistic regression stacked on the model, with a ridge penalty pulling
(slope, intercept) towards (1, 0) (the model as it is) and the weights towards 0. The weights'
penalty is chosen by cross-validation on the answers themselves (folds by labelled pair, held-out
log-loss); "no weights" (Platt scaling alone) is one of the choices, and the only one with fewer
than MIN_ANSWERS answers or MIN_EACH of either kind. bench_calibrate measures it against Platt
scaling alone (README, "Calibration").

The operating point is then chosen for the whole catalog, not for the labelled pairs: with the
calibrated probabilities of every scored pair, the expected number of true matches above a
threshold t is the sum of their probabilities, so expected precision = mean of p over the pairs
>= t, expected recall = that sum over the sum of p over all pairs, and the threshold with the
best expected F1 is the operating point (`expected_curve`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from prodsearch.errors import ConfigError
from prodsearch.labels import PairLabel
from prodsearch.matching.features import feature_names, symmetric
from prodsearch.matching.pair_model import PairModel, ScoredPairs
from prodsearch.settings import CalibrationSettings, DedupSettings

#: probabilities are clipped to this margin from 0 and 1 before the logit
EPSILON = 1e-4
#: the ridge penalty pulling (slope, intercept) towards (1, 0): the uncalibrated model
PRIOR_STRENGTH = 1.0
#: the weights' ridge penalties cross-validation chooses from (None: no weights)
REGULARISATION_GRID: tuple[float | None, ...] = (None, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0)
#: fewer labelled candidate pairs than this, or fewer than MIN_EACH of either answer: no weights
MIN_ANSWERS = 20
MIN_EACH = 5
#: cross-validation folds (by labelled pair)
FOLDS = 5
#: thresholds of the expected precision/recall curve
CURVE_GRID = np.round(np.arange(0.02, 0.99, 0.01), 3)


@dataclass(frozen=True)
class Calibration:
    """A catalog's fitted decision: its settings and the operating point chosen with them."""

    settings: CalibrationSettings
    #: the calibrated probability a match must reach
    min_probability: float

    def apply(self, scored: ScoredPairs) -> np.ndarray:
        """Calibrated probabilities of the scored pairs."""
        return calibrated(scored, self.settings)


def is_stale(calibration: CalibrationSettings, model_digest: str) -> bool:
    """Whether the calibration was fitted on top of another pair model than the one with
    `model_digest` (its probabilities mean something else: an upgrade ships a new model)."""
    return bool(calibration.model_digest and model_digest) and (
        calibration.model_digest != model_digest
    )


def without_stale_calibration(knobs: DedupSettings) -> DedupSettings:
    """The knobs without their calibration when it is stale (`is_stale`): what calibrating
    again starts from (the fit reads the model's own probabilities)."""
    pair = knobs.pair_model
    if pair.calibration is None or not is_stale(
        pair.calibration, PairModel.file_digest(pair.model)
    ):
        return knobs
    return knobs.model_copy(update={"pair_model": pair.model_copy(update={"calibration": None})})


def check_calibration(calibration: CalibrationSettings, model: PairModel) -> None:
    """Raises ConfigError when the calibration is stale for `model` (`is_stale`)."""
    if is_stale(calibration, model.digest):
        raise ConfigError(
            f"the catalog's calibration ({calibration.labels} labels, fitted "
            f"{calibration.fitted_at or 'earlier'}) was fitted on another pair model than the "
            f"one in use ({calibration.model_digest[:12]} vs {model.digest[:12]}): run "
            "`prodsearch calibrate` again (the labels are kept), or remove [dedup.pair_model."
            "calibration] from the settings file"
        )


def calibrated(scored: ScoredPairs, calibration: CalibrationSettings) -> np.ndarray:
    """The scored pairs' probabilities under a catalog's calibration, symmetric in each pair's
    two directions. Raises ConfigError when the calibration weighs a feature the pair features
    do not hold (it was fitted with another version: calibrate again)."""
    z = calibration.slope * _logit(scored.probability) + calibration.intercept
    if calibration.weights:
        names = list(calibration.weights)
        z = z + _standardised(scored.features, names, calibration) @ np.array(
            [calibration.weights[n] for n in names]
        )
    return symmetric(scored.table, _sigmoid(z))


def _standardised(
    features: np.ndarray, names: Sequence[str], calibration: CalibrationSettings
) -> np.ndarray:
    columns = {name: i for i, name in enumerate(feature_names())}
    unknown = [n for n in names if n not in columns or n not in calibration.centers]
    if unknown:
        raise ConfigError(
            f"the calibration weighs features this version does not compute ({unknown[:3]}): "
            "run `prodsearch calibrate` again"
        )
    picked = features[:, [columns[n] for n in names]].astype(np.float64)
    center = np.array([calibration.centers[n] for n in names])
    scale = np.array([calibration.scales[n] for n in names])
    return np.nan_to_num((picked - center) / scale)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPSILON, 1 - EPSILON)
    return np.log(p / (1 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


@dataclass(frozen=True)
class LabelledRows:
    """The scored rows (both directions where both are candidates) of the labelled pairs."""

    rows: np.ndarray
    same: np.ndarray
    #: which labelled pair each row belongs to (0..pairs-1)
    pair: np.ndarray

    @property
    def pairs(self) -> int:
        """How many labelled pairs have a scored row."""
        return int(self.pair.max()) + 1 if len(self.pair) else 0

    @property
    def positives(self) -> int:
        """How many of them were answered 'same'."""
        return len(set(self.pair[self.same].tolist()))


def labelled_rows(scored: ScoredPairs, labels: Sequence[PairLabel]) -> LabelledRows:
    """The scored rows of each labelled pair; labelled pairs the pair model never scored (not
    among either product's best candidates) are left out."""
    position = {pid: i for i, pid in enumerate(scored.table.ids)}
    by_pair: dict[frozenset[int], list[int]] = {}
    a, b = scored.table.a.tolist(), scored.table.b.tolist()
    for row, key in enumerate(zip(a, b, strict=True)):
        by_pair.setdefault(frozenset(key), []).append(row)
    rows, same, pair = [], [], []
    count = 0
    for label in labels:
        ends = position.get(label.id_a), position.get(label.id_b)
        found = by_pair.get(frozenset(ends), []) if None not in ends else []
        if found:
            rows.extend(found)
            same.extend([label.same] * len(found))
            pair.extend([count] * len(found))
            count += 1
    return LabelledRows(
        np.array(rows, dtype=np.int64), np.array(same, dtype=bool), np.array(pair, dtype=np.int64)
    )


def fit_calibration(
    scored: ScoredPairs, labels: Sequence[PairLabel], weights: bool = True
) -> Calibration:
    """Fit the catalog's calibration from labelled pairs over the pairs the pair model scored,
    then the threshold with the best expected F1 over all of them (`weights=False`: Platt
    scaling alone). Raises ConfigError when no labelled pair is a scored pair, or the answers
    are all one way."""
    found = labelled_rows(scored, labels)
    if found.pairs == 0:
        raise ConfigError(
            "none of the labelled pairs is among the catalog's candidate pairs: label pairs "
            "from `prodsearch review` or the dedup audit trail"
        )
    if found.positives in (0, found.pairs):
        raise ConfigError(
            f"all {found.pairs} usable answers are "
            f"{'same' if found.positives else 'different'}: calibrating needs both kinds"
        )
    names, centers, scales = _weighable(scored.features)
    base = CalibrationSettings(centers=centers, scales=scales)
    z0 = _logit(scored.probability[found.rows])
    design = _standardised(scored.features[found.rows], names, base)
    fewer = min(found.positives, found.pairs - found.positives)
    weighted = weights and found.pairs >= MIN_ANSWERS and fewer >= MIN_EACH
    strength = _choose_strength(z0, design, found) if weighted else None
    theta = _fit(z0, design if strength else design[:, :0], found, strength or 0.0)
    weights = dict(zip(names, theta[2:].tolist(), strict=False)) if strength else {}
    settings = CalibrationSettings(
        slope=float(theta[0]),
        intercept=float(theta[1]),
        weights=weights,
        centers={n: centers[n] for n in weights},
        scales={n: scales[n] for n in weights},
        regularisation=strength or 0.0,
        labels=found.pairs,
        positives=found.positives,
        model_digest=scored.model_digest,
        fitted_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    curve = expected_curve(calibrated(scored, settings))
    best = float(curve["threshold"][int(np.argmax(curve["f1"]))])
    return Calibration(settings, best)


def _weighable(features: np.ndarray) -> tuple[list[str], dict[str, float], dict[str, float]]:
    """The features that vary over the catalog's scored pairs, their means and deviations."""
    names, centers, scales = [], {}, {}
    for name, column in zip(feature_names(), features.T, strict=True):
        values = column[~np.isnan(column)].astype(np.float64)
        scale = float(values.std()) if len(values) else 0.0
        if scale > 1e-9:
            names.append(name)
            centers[name], scales[name] = float(values.mean()), scale
    return names, centers, scales


def _fit(z0: np.ndarray, design: np.ndarray, found: LabelledRows, strength: float) -> np.ndarray:
    """(slope, intercept, weights...) maximising the answers' likelihood (each labelled pair
    weighing 1, shared by its rows) minus the ridge penalties (L-BFGS)."""
    y = found.same.astype(np.float64)
    share = 1.0 / np.bincount(found.pair)[found.pair]
    prior = np.zeros(2 + design.shape[1])
    prior[0] = 1.0
    penalty = np.full(len(prior), strength)
    penalty[:2] = PRIOR_STRENGTH

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        p = _sigmoid(theta[0] * z0 + theta[1] + design @ theta[2:])
        value = -np.sum(share * (y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12)))
        residual = share * (p - y)
        gradient = np.concatenate([[residual @ z0, residual.sum()], design.T @ residual])
        deviation = theta - prior
        return value + 0.5 * float(penalty @ deviation**2), gradient + penalty * deviation

    # The slope stays >= 0: a few answers can invert the model's order (on Amazon-Google, 25
    # answers around one probability, two of them "different" at p = 1.0, fitted slope -0.56),
    # and an inverted model matches the pairs it is surest are different.
    bounds = [(0.0, None)] + [(None, None)] * (len(prior) - 1)
    return minimize(loss, prior.copy(), jac=True, method="L-BFGS-B", bounds=bounds).x


def _choose_strength(z0: np.ndarray, design: np.ndarray, found: LabelledRows) -> float | None:
    """The weights' penalty (None: no weights) with the lowest held-out log-loss over FOLDS
    folds of the labelled pairs (a pair's rows stay together)."""
    fold = np.random.default_rng(0).permutation(found.pairs)[found.pair] % FOLDS
    y = found.same
    best: tuple[float, float | None] | None = None
    for strength in REGULARISATION_GRID:
        columns = design if strength else design[:, :0]
        total = 0.0
        for k in range(FOLDS):
            train, held = fold != k, fold == k
            if not held.any() or y[train].all() or not y[train].any():
                continue
            part = LabelledRows(found.rows[train], y[train], _renumbered(found.pair[train]))
            theta = _fit(z0[train], columns[train], part, strength or 0.0)
            p = _sigmoid(theta[0] * z0[held] + theta[1] + columns[held] @ theta[2:])
            p = np.clip(p, 1e-6, 1 - 1e-6)
            total -= float(np.sum(np.where(y[held], np.log(p), np.log(1 - p))))
        if best is None or total < best[0] - 1e-9:
            best = (total, strength)
    return best[1] if best else None


def _renumbered(pair: np.ndarray) -> np.ndarray:
    return np.unique(pair, return_inverse=True)[1]


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
