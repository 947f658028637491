"""Evaluation: the metric, and a real tune-on-val / report-on-test run on a Shopee slice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from prodsearch.eval.metrics import row_scores
from prodsearch.eval.shopee import run_evaluation
from prodsearch.matching.pair_model import PairModel
from prodsearch.settings import SETTINGS_FILE_ENV, Settings

from .conftest import needs_shopee, shopee_groups


def test_row_scores_is_the_mean_per_row_f1() -> None:
    predicted = [{"a", "b"}, {"b"}, {"c", "a"}]
    truth = [{"a", "b"}, {"a", "b"}, {"c"}]
    scores = row_scores(predicted, truth)
    assert scores.precision == pytest.approx((1 + 1 + 0.5) / 3)
    assert scores.recall == pytest.approx((1 + 0.5 + 1) / 3)
    assert scores.f1 == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


@needs_shopee
@pytest.mark.slow
def test_evaluation_tunes_on_val_and_reports_test(tmp_path: Path, encoders, monkeypatch) -> None:
    val, test = shopee_groups(100, "val", seed=1), shopee_groups(200, "test", seed=1)
    train = shopee_groups(150, "train", seed=1)
    catalog = tmp_path / "catalog.csv"
    pd.concat([val, test, train]).to_csv(catalog, index=False)
    split = tmp_path / "split.csv"
    pd.DataFrame(
        {
            "posting_id": [*val["posting_id"], *test["posting_id"], *train["posting_id"]],
            "split": ["val"] * len(val) + ["test"] * len(test) + ["train"] * len(train),
        }
    ).to_csv(split, index=False)

    result = run_evaluation(catalog, split, store=str(tmp_path / "store"), encoders=encoders)
    methods = {m.method.split(":")[0].split(" (")[0]: m for m in result.methods}
    assert set(methods) >= {"baseline", "text alone", "chars alone", "phash alone", "fused"}
    assert result.sizes["val"] == len(val) and result.sizes["test"] == len(test)
    # the val queries search a catalog topped up with whole train groups to the test size
    largest_group = int(train["label_group"].value_counts().max())
    assert len(test) - largest_group < result.sizes["val catalog"] <= len(test)
    for m in result.methods:
        assert 0 < m.test.f1 <= 1 and 0 < m.val.f1 <= 1
        if m.simulated_val_f1 is not None:  # the tuning simulation reproduces the engine
            assert m.simulated_val_f1 == pytest.approx(m.val.f1, abs=0.01), m.method
    fused = [m for m in result.methods if m.method.startswith("fused")]
    singles = [m for m in result.methods if m.method.endswith("alone")]
    assert max(f.val.f1 for f in fused) >= max(s.val.f1 for s in singles) - 0.005
    # a quality bar, not just a range: the fused search and the pair model beat the TF-IDF
    # baseline of the same run on test, and predicting every product alone (F1 = mean 2/(1+n))
    baseline = methods["baseline"].test.f1
    alone = float(
        np.mean([2 / (1 + n) for n in test.groupby("label_group").size().loc[test["label_group"]]])
    )
    pair_model = next(m for m in result.methods if m.method.startswith("dedup: pair model +"))
    for method in (*fused, pair_model):
        assert method.test.f1 > max(baseline, alone + 0.2), method.method

    settings_file = tmp_path / "prodsearch.toml"
    result.write_settings(settings_file)
    monkeypatch.setenv(SETTINGS_FILE_ENV, str(settings_file))
    loaded = Settings()
    assert loaded.fusion == result.tuned["fusion"]
    assert loaded.thresholds.chars == pytest.approx(result.tuned["thresholds"]["chars"])
    assert loaded.formula.min_fused_score == pytest.approx(
        result.tuned["formula"]["min_fused_score"]
    )
    # the pair model fitted on val is written beside the settings file, which points to it
    model_file = tmp_path / "prodsearch.pair_model.json"
    assert loaded.dedup.pair_model.model == model_file.resolve()
    written = [b.model_to_string() for b in PairModel.load(model_file).boosters]
    assert written == [b.model_to_string() for b in result.pair_model.boosters]
