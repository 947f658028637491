"""The stacked pair model: fit out of fold, symmetric probabilities, save/load and its checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from prodsearch.errors import ConfigError
from prodsearch.matching.features import feature_names, symmetric
from prodsearch.matching.pair_model import STAGES, PairModel, TrainingSet
from prodsearch.matching.table import PairTable


def random_table(n_products: int, per_product: int, seed: int = 0) -> PairTable:
    """Each product with `per_product` random other products as candidates (text score only)."""
    rng = np.random.default_rng(seed)
    a = np.repeat(np.arange(n_products), per_product)
    b = (a + rng.integers(1, n_products, size=len(a))) % n_products
    keep = ~pd.DataFrame({"a": a, "b": b}).duplicated().to_numpy()
    a, b = a[keep], b[keep]
    return PairTable.build(
        [f"p{i}" for i in range(n_products)],
        a=a,
        b=b,
        fused=rng.uniform(size=len(a)),
        scores={"text": rng.uniform(size=len(a))},
    )


def training_set(table: PairTable, rng: np.random.Generator, train: np.ndarray) -> TrainingSet:
    """Random features where the first decides, labelled accordingly."""
    features = rng.normal(size=(len(table), len(feature_names()))).astype(np.float32)
    same = (features[:, 0] + 0.1 * rng.normal(size=len(features)) > 0.5).astype(np.float64)
    return TrainingSet(table, features, same, table.a % 20, train.astype(np.float64))


def test_pair_model_fits_saves_and_checks_its_features(tmp_path) -> None:
    rng = np.random.default_rng(1)
    tables = [random_table(300, 8), random_table(120, 6, seed=2)]
    # the second catalog's products past 100 are scored by the fitted model, like distractors
    sets = [
        training_set(tables[0], rng, tables[0].a >= 0),
        training_set(tables[1], rng, tables[1].a < 100),
    ]
    model, out_of_fold = PairModel.fit(sets, stages=2)
    assert len(model.boosters) == 2 and len(out_of_fold) == 2
    for fitting, held in zip(sets, out_of_fold, strict=True):
        same = fitting.same.astype(bool)
        probability = model.probabilities(fitting.table, fitting.features)
        for p in (probability, held):
            assert p[same].mean() > 0.7 and p[~same].mean() < 0.3
            np.testing.assert_allclose(p, symmetric(fitting.table, p))  # both directions agree
        # the fitted pairs' probabilities are out of fold: they differ from the fitted model's
        fitted = fitting.fitted
        assert not np.allclose(held[fitted], probability[fitted])
    model.save(tmp_path / "model.json")
    loaded = PairModel.load(tmp_path / "model.json")
    first = sets[0]
    np.testing.assert_allclose(
        loaded.probabilities(first.table, first.features),
        model.probabilities(first.table, first.features),
        rtol=1e-6,
    )
    foreign = tmp_path / "foreign.json"
    foreign.write_text((tmp_path / "model.json").read_text().replace("numbers_jaccard", "other"))
    with pytest.raises(ConfigError, match="not those of this version"):
        PairModel.load(foreign)
    (tmp_path / "not_a_model.json").write_text('{"stages": []}')
    with pytest.raises(ConfigError, match="not a prodsearch pair model"):
        PairModel.load(tmp_path / "not_a_model.json")
    with pytest.raises(ConfigError, match="does not exist"):
        PairModel.load(tmp_path / "missing.json")
    one_group = TrainingSet(
        first.table, first.features, first.same, np.zeros(len(first.same)), first.weight
    )
    with pytest.raises(ConfigError, match="two groups"):
        PairModel.fit([one_group])
    assert len(PairModel.load().boosters) == STAGES
