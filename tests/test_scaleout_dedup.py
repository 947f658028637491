"""`dedup --ray` (scaleout/dedup.py) against the local `dedup`, on a real local Ray."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from prodsearch.matching.candidates import RelativeFilters
from prodsearch.matching.dedup import run_dedup

pytest.importorskip(
    "ray", reason="Ray is not installed: pip install 'prodsearch[ray]' (scripts/setup.sh does)"
)


@pytest.mark.parametrize(
    ("catalog", "filters"),
    [
        ("catalog_index", RelativeFilters(different=("seller",))),
        ("shopee_index", RelativeFilters()),
    ],
    ids=["generated-different-seller", "shopee-40-groups"],
)
def test_ray_dedup_equals_local_dedup(request, tmp_path, local_ray, catalog, filters) -> None:
    """The same pair table (every pair, score, rank, probability and decision), match sets and
    clusters; the pair table written as Parquet partitions."""
    from prodsearch.scaleout.dedup import ray_dedup

    index = request.getfixturevalue(catalog)
    local = run_dedup(index, filters=filters)
    # two partitions whatever their halos' overlap: each decides its pairs, the rest scored only
    on_ray = ray_dedup(index, tmp_path / "ray", filters=filters, workers=2, halo_budget=np.inf)
    assert local.table.ids == on_ray.table.ids
    assert len(local.table) > len(local.table.ids), "every product has candidates"
    mine, theirs = local.table.frame, on_ray.table.frame
    assert list(mine.columns) == list(theirs.columns)
    for column in ("a", "b", "rank", "match", "rule"):
        assert mine[column].tolist() == theirs[column].tolist(), column
    # The engine's scores are kept to 5 decimals; their last bits vary between two openers of
    # the same segments (the snapshot copy), so a score may round 1e-5 apart.
    numbers = [c for c in mine.columns if c.startswith("score_")] + ["fused", "gap"]
    pd.testing.assert_frame_equal(mine[numbers], theirs[numbers], atol=2e-5, rtol=0)
    pd.testing.assert_series_equal(mine["probability"], theirs["probability"], atol=1e-3, rtol=0)
    assert local.table.matched().sum() > 0
    assert on_ray.match_sets() == local.match_sets()
    assert on_ray.clusters == local.clusters
    assert on_ray.rescued() == local.rescued()
    # the default: one partition when halos would overlap this much, decided on the driver
    whole = ray_dedup(index, tmp_path / "whole", filters=filters, workers=2)
    assert whole.match_sets() == local.match_sets() and whole.clusters == local.clusters
    partitions = list((tmp_path / "ray" / "pairs").glob("*.parquet"))
    assert partitions, "the pair table is written as Parquet partitions"
    assert sum(len(pd.read_parquet(p)) for p in partitions) >= len(local.table)


def test_ray_dedup_refuses_the_fusion_decider(tmp_path, local_ray, catalog_index) -> None:
    from prodsearch.errors import ConfigError
    from prodsearch.scaleout.dedup import ray_dedup

    knobs = catalog_index.settings.dedup.model_copy(update={"decider": "fusion"})
    with pytest.raises(ConfigError, match="pair model"):
        ray_dedup(catalog_index, tmp_path / "ray", knobs)
