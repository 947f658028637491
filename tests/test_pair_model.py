"""The stacked pair model: fit out of fold, symmetric probabilities, save/load and its checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from prodsearch.errors import ConfigError
from prodsearch.matching.features import feature_names, symmetric
from prodsearch.matching.pair_model import STAGES, PairModel
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


def test_pair_model_fits_saves_and_checks_its_features(tmp_path) -> None:
    table = random_table(300, 8)
    rng = np.random.default_rng(1)
    names = feature_names(["text"])
    features = rng.normal(size=(len(table), len(names)))
    same = features[:, 0] + 0.1 * rng.normal(size=len(features)) > 0.5  # the text score decides
    groups = table.a % 20
    train = table.a < 250  # the others are scored by the fitted model, like distractors
    model, out_of_fold = PairModel.fit(table, features, same, groups, ["text"], train, stages=2)
    assert len(model.boosters) == 2
    probability = model.probabilities(table, features)
    for p in (probability, out_of_fold):
        assert p[same].mean() > 0.7 and p[~same].mean() < 0.3
        np.testing.assert_allclose(p, symmetric(table, p))  # both directions agree
    # the training pairs' probabilities are out of fold: they differ from the fitted model's
    assert not np.allclose(out_of_fold[train], probability[train])
    model.save(tmp_path / "model.json")
    loaded = PairModel.load(tmp_path / "model.json")
    assert loaded.modalities == ("text",)
    np.testing.assert_allclose(loaded.probabilities(table, features), probability, rtol=1e-6)
    foreign = tmp_path / "foreign.json"
    foreign.write_text((tmp_path / "model.json").read_text().replace("numbers_jaccard", "other"))
    with pytest.raises(ConfigError, match="not those of this version"):
        PairModel.load(foreign)
    (tmp_path / "not_a_model.json").write_text('{"stages": []}')
    with pytest.raises(ConfigError, match="not a prodsearch pair model"):
        PairModel.load(tmp_path / "not_a_model.json")
    with pytest.raises(ConfigError, match="does not exist"):
        PairModel.load(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="two groups"):
        PairModel.fit(table, features, same, np.zeros(len(same)), ["text"], train)
    shipped = PairModel.load()
    assert shipped.modalities == ("text", "chars", "phash") and len(shipped.boosters) == STAGES
