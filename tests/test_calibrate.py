"""The catalog's calibration (`matching.calibrate`): feature weights learnt from answers reorder
pairs the pair model ranks wrongly; few answers fit Platt scaling alone; a calibration naming
features this version lacks, or fitted on another pair model, is refused; a new calibration
replaces the one in the settings file whole."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from prodsearch.errors import ConfigError
from prodsearch.labels import PairLabel
from prodsearch.matching.calibrate import (
    calibrated,
    check_calibration,
    fit_calibration,
    without_stale_calibration,
)
from prodsearch.matching.features import feature_names
from prodsearch.matching.pair_model import PairModel, ScoredPairs
from prodsearch.matching.table import PairTable
from prodsearch.review.session import write_calibration
from prodsearch.settings import (
    SETTINGS_FILE_ENV,
    CalibrationSettings,
    DedupSettings,
    PairModelSettings,
    Settings,
)

#: the feature that decides the generated catalog's answers (the pair model ignores it)
DECIDING = "code_disjoint"


def catalog(pairs: int = 300, seed: int = 0) -> tuple[ScoredPairs, np.ndarray]:
    """Pairs (both directions) whose model probability is noise around 0.5 and whose answer is
    told by one feature; returns the scored pairs and each row's true answer."""
    rng = np.random.default_rng(seed)
    same = rng.random(pairs) < 0.4
    a = np.arange(pairs) * 2
    b = a + 1
    ids = [f"p{i}" for i in range(2 * pairs)]
    frame = pd.DataFrame(
        {"a": np.concatenate([a, b]), "b": np.concatenate([b, a]), "rank": 1, "fused": 1.0}
    )
    features = rng.normal(size=(2 * pairs, len(feature_names())))
    column = feature_names().index(DECIDING)
    told = np.where(same, -1.0, 1.0) + rng.normal(scale=0.3, size=pairs)
    features[:, column] = np.concatenate([told, told])
    probability = np.clip(rng.normal(0.5, 0.1, size=pairs), 0.01, 0.99)
    both = np.concatenate([probability, probability])
    scored = ScoredPairs(PairTable(ids, frame), np.arange(2 * pairs), both, features)
    return scored, np.concatenate([same, same])


def labels_of(scored: ScoredPairs, same: np.ndarray, n: int) -> list[PairLabel]:
    """Answers for the first `n` pairs."""
    ids = scored.table.ids
    return [PairLabel(ids[2 * i], ids[2 * i + 1], bool(same[i])) for i in range(n)]


def auc(score: np.ndarray, same: np.ndarray) -> float:
    """The chance a same pair scores above a different one."""
    order = np.argsort(score)
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    positives = same.sum()
    return float(
        (ranks[same].sum() - positives * (positives + 1) / 2) / (positives * (~same).sum())
    )


def test_answers_teach_a_feature_the_model_ignores() -> None:
    scored, same = catalog()
    fit = fit_calibration(scored, labels_of(scored, same, 80))
    settings = fit.settings
    assert settings.labels == 80 and settings.positives == int(same[:80].sum())
    assert settings.weights and settings.regularisation > 0
    # the deciding feature is the one weighed most, towards "different" as it grows
    strongest = max(settings.weights, key=lambda name: abs(settings.weights[name]))
    assert strongest == DECIDING and settings.weights[DECIDING] < 0
    probability = fit.apply(scored)
    unlabelled = np.arange(len(same)) % (len(same) // 2) >= 80
    assert auc(probability[unlabelled], same[unlabelled]) > 0.95
    assert auc(scored.probability[unlabelled], same[unlabelled]) < 0.65
    # each pair's two directions get one probability
    half = len(same) // 2
    assert np.allclose(probability[:half], probability[half:])
    decided = probability >= fit.min_probability
    assert (decided == same).mean() > 0.9


def test_platt_scaling_alone_keeps_the_models_order() -> None:
    scored, same = catalog()
    fit = fit_calibration(scored, labels_of(scored, same, 80), weights=False)
    assert not fit.settings.weights and fit.settings.regularisation == 0
    probability = fit.apply(scored)
    assert np.array_equal(
        np.argsort(probability, kind="stable"),
        np.argsort(
            calibrated(scored, CalibrationSettings(slope=fit.settings.slope)), kind="stable"
        ),
    )
    assert abs(auc(probability, same) - auc(scored.probability, same)) < 1e-9


def test_a_handful_of_answers_fits_no_weights() -> None:
    scored, same = catalog()
    fit = fit_calibration(scored, labels_of(scored, same, 12))
    assert fit.settings.labels == 12 and not fit.settings.weights


def test_answers_all_one_way_or_off_the_table_are_refused() -> None:
    scored, same = catalog()
    ids = scored.table.ids
    positives = [PairLabel(ids[2 * i], ids[2 * i + 1], True) for i in np.flatnonzero(same[:50])]
    with pytest.raises(ConfigError, match=r"all \d+ usable answers are same"):
        fit_calibration(scored, positives)
    with pytest.raises(ConfigError, match="none of the labelled pairs"):
        fit_calibration(scored, [PairLabel(ids[0], ids[3], True), PairLabel("x", "y", False)])


def test_a_calibration_naming_unknown_features_is_refused() -> None:
    scored, _ = catalog(pairs=10)
    stale = CalibrationSettings(weights={"gone": 1.0}, centers={"gone": 0.0}, scales={"gone": 1})
    with pytest.raises(ConfigError, match="calibrate"):
        calibrated(scored, stale)


def test_a_new_calibration_replaces_the_old_one_whole(tmp_path, monkeypatch) -> None:
    path = tmp_path / "prodsearch.toml"
    monkeypatch.setenv(SETTINGS_FILE_ENV, str(path))
    path.write_text("[thresholds]\ntext = 0.6\n")
    scored, same = catalog()
    weighted = fit_calibration(scored, labels_of(scored, same, 80))
    write_calibration(
        path, {**weighted.settings.model_dump(), "min_probability": weighted.min_probability}
    )
    assert Settings().dedup.pair_model.calibration.weights
    plain = fit_calibration(scored, labels_of(scored, same, 12))
    write_calibration(path, {**plain.settings.model_dump(), "min_probability": 0.4})
    settings = Settings()
    calibration = settings.dedup.pair_model.calibration
    assert calibration.labels == 12 and not calibration.weights and not calibration.centers
    assert settings.dedup.pair_model.min_probability == 0.4 and settings.thresholds.text == 0.6


def test_few_answers_never_invert_the_model() -> None:
    # Answers against the model's order (its surest pairs "different", its least sure "same"),
    # too few for feature weights: Platt scaling alone, whose slope would come out negative
    # unbounded. The slope stays >= 0, so the model's surest pairs never become its least sure.
    scored, _ = catalog(pairs=60)
    half = len(scored.probability) // 2
    probability = np.linspace(0.05, 0.99, half)
    scored = ScoredPairs(
        scored.table, scored.rows, np.concatenate([probability, probability]), scored.features
    )
    ids = scored.table.ids
    answers = [PairLabel(ids[2 * i], ids[2 * i + 1], i < 5) for i in range(5)]
    answers += [PairLabel(ids[2 * i], ids[2 * i + 1], False) for i in range(half - 7, half)]
    fit = fit_calibration(scored, answers)
    assert not fit.settings.weights
    assert fit.settings.slope >= 0.0
    calibrated_p = fit.apply(scored)[:half]
    assert np.all(np.diff(calibrated_p) >= -1e-12)


def test_a_calibration_fitted_on_another_pair_model_is_refused(tmp_path) -> None:
    scored, same = catalog()
    scored = replace(scored, model_digest="a" * 64)
    fit = fit_calibration(scored, labels_of(scored, same, 80))
    assert fit.settings.model_digest == "a" * 64, "the calibration records its model"
    check_calibration(fit.settings, PairModel([], "a" * 64))
    with pytest.raises(ConfigError, match="prodsearch calibrate"):
        check_calibration(fit.settings, PairModel([], "b" * 64))  # an upgrade's new model
    check_calibration(fit.settings.model_copy(update={"model_digest": ""}), PairModel([], "b"))
    # calibrating again starts from the model's own probabilities: a stale calibration is
    # dropped, a current one kept
    model_file = tmp_path / "model.json"
    model_file.write_text("{}")
    pair = PairModelSettings(model=model_file, calibration=fit.settings)
    knobs = DedupSettings(pair_model=pair)
    assert without_stale_calibration(knobs).pair_model.calibration is None
    current = fit.settings.model_copy(update={"model_digest": PairModel.file_digest(model_file)})
    knobs = DedupSettings(pair_model=pair.model_copy(update={"calibration": current}))
    assert without_stale_calibration(knobs).pair_model.calibration == current
