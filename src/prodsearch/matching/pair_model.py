"""The pair model of whole-catalog matching: is a product's candidate the same product?

Gradient-boosted trees (LightGBM) score each row of the candidate-pair table from its features
(`features.py`). The model is **stacked** (`STAGES` stages): each stage's probabilities are made
symmetric (the mean of the pair's two directions where both are candidates) and become graph
features of the next (`features.STAGE_FEATURES`), so a pair's verdict draws on the verdicts
around it, as the Kaggle Shopee winners' graph features did. Each stage is fitted on the
previous stage's out-of-fold probabilities (group-disjoint folds).

`prodsearch eval` fits the model on `val` (thresholds tuned on out-of-fold probabilities); the
shipped one is `assets/pair_model.json` (every stage in LightGBM's text format, feature names
included).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prodsearch.errors import ConfigError
from prodsearch.matching.features import feature_names, stage_features, symmetric
from prodsearch.matching.table import PairTable

SHIPPED_PAIR_MODEL = Path(__file__).resolve().parents[1] / "assets" / "pair_model.json"
MODEL_FORMAT = "prodsearch pair model 4"
#: stages of the stacked model and out-of-fold folds of its fit
STAGES = 2
FOLDS = 3
#: each product's best candidates (by fused score) the model scores; the others never match
MODEL_CANDIDATES = 20
#: LightGBM parameters of the fit (fixed seed, deterministic on any thread count)
LGBM_PARAMS = {
    "objective": "binary",
    "learning_rate": 0.1,
    "num_leaves": 31,
    "min_child_samples": 20,
    "seed": 0,
    "deterministic": True,
    "force_row_wise": True,
    "verbose": -1,
}
LGBM_ROUNDS = 150


@dataclass(frozen=True)
class ScoredPairs:
    """The candidate pairs the pair model scored (each product's MODEL_CANDIDATES best): their
    table, their rows in the whole table, the model's own probabilities (before a catalog's
    calibration), their pair features (`feature_names()` columns) and which model scored them."""

    table: PairTable
    rows: np.ndarray
    probability: np.ndarray
    features: np.ndarray
    #: the `PairModel.digest` of the model that scored them ("" unknown)
    model_digest: str = ""


@dataclass
class TrainingSet:
    """One labelled catalog's candidate pairs for fitting: its table and features, each pair's
    label (`same`), fold group (pairs of one group never straddle folds; unique across sets) and
    weight (0: not fitted on, e.g. unlabelled; the pair is still scored)."""

    table: PairTable
    features: np.ndarray
    same: np.ndarray
    groups: np.ndarray
    weight: np.ndarray

    @property
    def fitted(self) -> np.ndarray:
        """The rows the model is fitted on."""
        return np.flatnonzero(self.weight > 0)


@dataclass
class PairModel:
    """A fitted pair model: one LightGBM booster per stage."""

    boosters: list[Any]
    #: the SHA-256 of the model file it was loaded from ("" for a model fitted in this process):
    #: a catalog's calibration records it and is refused by another model
    digest: str = ""

    @classmethod
    def load(cls, path: Path | None = None) -> PairModel:
        """Load a model file (None: the shipped one).

        Raises ConfigError when the file is missing, is not a pair model, or reads features
        this version does not compute."""
        import lightgbm

        path = Path(path or SHIPPED_PAIR_MODEL)
        if not path.is_file():
            raise ConfigError(f"pair model file {path} does not exist")
        content = path.read_bytes()
        try:
            document = json.loads(content.decode("utf-8"))
            if document.get("format") != MODEL_FORMAT:
                raise ValueError(f"format {document.get('format')!r}, expected {MODEL_FORMAT!r}")
            boosters = [lightgbm.Booster(model_str=text) for text in document["stages"]]
        except (
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            lightgbm.basic.LightGBMError,
        ) as exc:
            raise ConfigError(f"{path} is not a prodsearch pair model: {exc}") from exc
        for stage, booster in enumerate(boosters, start=1):
            if booster.feature_name() != feature_names(stage):
                raise ConfigError(
                    f"{path}: stage {stage} reads features {booster.feature_name()}, not those "
                    f"of this version ({feature_names(stage)}); fit a new one with "
                    "`prodsearch eval`"
                )
        return cls(boosters, hashlib.sha256(content).hexdigest())

    @staticmethod
    def file_digest(path: Path | None = None) -> str:
        """The `digest` a model file (None: the shipped one) loads with ("" when missing)."""
        path = Path(path or SHIPPED_PAIR_MODEL)
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""

    @classmethod
    def fit(
        cls, sets: Sequence[TrainingSet], stages: int = STAGES
    ) -> tuple[PairModel, list[np.ndarray]]:
        """Fit the stacked model on the weighted pairs of every training set.

        Returns the model and, per set, the final symmetric probabilities of every pair: out of
        fold for the fitted pairs (each stage's folds fitted on the previous stage's
        out-of-fold probabilities), from the fitted model for the others. Raises ConfigError
        with fewer than two groups.
        """
        from sklearn.model_selection import GroupKFold

        groups = np.concatenate([s.groups[s.fitted] for s in sets])
        n_groups = len(np.unique(groups))
        if n_groups < 2:
            raise ConfigError("fitting a pair model needs labelled pairs of two groups or more")
        folds = list(GroupKFold(n_splits=min(FOLDS, n_groups)).split(groups, groups=groups))
        label = np.concatenate([s.same[s.fitted] for s in sets]).astype(np.float64)
        weight = np.concatenate([s.weight[s.fitted] for s in sets]).astype(np.float64)
        boosters: list[Any] = []
        inputs = [s.features for s in sets]
        probabilities: list[np.ndarray] = []
        for stage in range(1, stages + 1):
            names = feature_names(stage)
            rows = np.concatenate([x[s.fitted] for x, s in zip(inputs, sets, strict=True)])
            out_of_fold = np.empty(len(rows))
            for fit_rows, held_out in folds:
                fold = _train(rows[fit_rows], label[fit_rows], weight[fit_rows], names)
                out_of_fold[held_out] = fold.predict(rows[held_out])
            boosters.append(_train(rows, label, weight, names))
            probabilities = _stage_probabilities(boosters[-1], inputs, sets, out_of_fold)
            inputs = [
                np.column_stack([s.features, stage_features(s.table, p)])
                for s, p in zip(sets, probabilities, strict=True)
            ]
        return cls(boosters), probabilities

    def probabilities(self, table: PairTable, features: np.ndarray) -> np.ndarray:
        """The probability that each candidate pair is one product (`features`: the
        `pair_features` of `table`), symmetric in the pair's two directions."""
        if len(features) == 0:
            return np.zeros(0)
        inputs, probability = features, np.zeros(0)
        for booster in self.boosters:
            probability = symmetric(table, np.asarray(booster.predict(inputs), dtype=np.float64))
            inputs = np.column_stack([features, stage_features(table, probability)])
        return probability

    def save(self, path: Path) -> None:
        """Write the model: every stage in LightGBM's text format, in one JSON file."""
        document = {
            "format": MODEL_FORMAT,
            "stages": [booster.model_to_string() for booster in self.boosters],
        }
        path.write_text(json.dumps(document), encoding="utf-8")


def _stage_probabilities(
    booster: Any, inputs: list[np.ndarray], sets: Sequence[TrainingSet], out_of_fold: np.ndarray
) -> list[np.ndarray]:
    """Each set's symmetric probabilities of one stage: out of fold for its fitted pairs, from
    the stage's booster for the rest."""
    out, start = [], 0
    for x, s in zip(inputs, sets, strict=True):
        probability = np.asarray(booster.predict(x), dtype=np.float64)
        fitted = s.fitted
        probability[fitted] = out_of_fold[start : start + len(fitted)]
        start += len(fitted)
        out.append(symmetric(s.table, probability))
    return out


def _train(inputs: np.ndarray, label: np.ndarray, weight: np.ndarray, names: list[str]) -> Any:
    import lightgbm

    data = lightgbm.Dataset(inputs, label=label, weight=weight, feature_name=names)
    return lightgbm.train(LGBM_PARAMS, data, num_boost_round=LGBM_ROUNDS)
