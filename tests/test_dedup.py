"""Whole-catalog matching: output format, min-2, blending, clusters, engine filters, explain,
resume from a checkpoint."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest

from prodsearch.catalog import read_catalog
from prodsearch.dedup import (
    DedupOptions,
    blended_vectors,
    capped_components,
    fused_neighbours,
    run_dedup,
    stored_products,
)
from prodsearch.encoders.base import SparseVec
from prodsearch.index import Index, Match
from prodsearch.ingest import ingest_catalog
from prodsearch.recipes import load_recipe
from prodsearch.settings import Settings
from prodsearch.store import StoredPoint

from .conftest import needs_shopee


@pytest.fixture
def shopee_index(tmp_path, encoders, shopee_csv) -> Index:
    frame = pd.read_csv(shopee_csv)
    # Two synthetic payload fields for the relative filters: a category and a seller.
    frame["category"] = np.where(frame.index % 3 == 0, "a", "b")
    frame["seller"] = np.where(frame.index % 2 == 0, "s1", "s2")
    frame["price"] = 10.0 + (frame.index % 7) * 5
    frame.to_csv(shopee_csv, index=False)
    index = Index(str(tmp_path / "store"), "products", Settings(), encoders)
    ingest_catalog(index, read_catalog(shopee_csv, load_recipe("shopee")))
    yield index
    index.close()


@needs_shopee
def test_dedup_output_format(shopee_index, tmp_path) -> None:
    result = run_dedup(shopee_index, DedupOptions(min2=True, min2_threshold=0.6))
    out = tmp_path / "matches.csv"
    result.write_csv(out)
    rows = list(csv.DictReader(out.open()))
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == shopee_index.count()
    for row in rows:
        matches = row["matches"].split(" ")
        assert matches[0] == row["id"] and len(set(matches)) == len(matches)
        assert row["cluster"].isdigit() and row["min2"] in {"0", "1"}
    clusters = {r["id"]: r["cluster"] for r in rows}
    # a product and its direct matches share a cluster unless the size cap split them
    joined = sum(clusters[m] == clusters[r["id"]] for r in rows for m in r["matches"].split(" "))
    assert joined / sum(len(r["matches"].split(" ")) for r in rows) > 0.95


@needs_shopee
def test_min2_gives_lone_products_their_closest_neighbour(shopee_index) -> None:
    strict = shopee_index.with_settings(
        thresholds=shopee_index.settings.thresholds.model_copy(
            update={"text": 0.999, "chars": 0.999, "phash": 0.999, "charcnn": 0.999}
        ),
        fusion="rrf",
    )
    alone = run_dedup(strict, DedupOptions(min2=False))
    lone = {pid for pid, h in alone.neighbourhoods.items() if len(h.ids()) == 1}
    assert len(lone) > 10
    rescued = run_dedup(strict, DedupOptions(min2=True, min2_threshold=0.3))
    assert any(h.by_min2 for h in rescued.neighbourhoods.values())
    for pid, hood in rescued.neighbourhoods.items():
        if pid in lone:
            assert len(hood.ids()) == (2 if hood.by_min2 else 1)
        else:  # products that had matches are left as they were
            assert not hood.by_min2 and set(hood.ids()) == set(alone.neighbourhoods[pid].ids())
    never = run_dedup(strict, DedupOptions(min2=True, min2_threshold=99.0))
    assert not any(h.by_min2 for h in never.neighbourhoods.values())


def test_blending_changes_vectors_only_as_specified() -> None:
    def point(pid: str, text: list[float]) -> StoredPoint:
        sparse = SparseVec(np.array([1, 2]), np.array([0.5, 0.5], np.float32))
        return StoredPoint(
            pid,
            {"product_id": pid},
            {
                "text": np.array(text, np.float32),
                "chars": sparse,
                "phash": np.full(4, 0.5, np.float32),
            },
        )

    products = [point("a", [1, 0]), point("b", [0, 1]), point("c", [0.6, 0.8])]
    neighbours = {
        "a": [Match("a", 1, {"text": 1.0}, ("text",)), Match("b", 0.5, {"text": 0.5}, ("text",))],
        "b": [Match("b", 1, {"text": 1.0}, ("text",))],
        "c": [],
    }
    blended = blended_vectors(products, neighbours, ["text"])
    np.testing.assert_allclose(
        blended["a"]["text"], np.array([1, 0.5]) / np.linalg.norm([1, 0.5]), rtol=1e-6
    )
    np.testing.assert_allclose(blended["b"]["text"], [0, 1])  # no neighbour: unchanged
    np.testing.assert_allclose(blended["c"]["text"], [0.6, 0.8], rtol=1e-6)
    for pid in "abc":  # sparse and hash vectors are never blended
        assert blended[pid]["chars"] is products["abc".index(pid)].vectors["chars"]
        np.testing.assert_array_equal(blended[pid]["phash"], np.full(4, 0.5))


def test_capped_components_join_strongest_edges_first() -> None:
    edges = [(0.9, "a", "b"), (0.8, "b", "c"), (0.7, "c", "d"), (0.95, "e", "f")]
    clusters = capped_components(edges, list("abcdefg"), cap=3)
    assert clusters["a"] == clusters["b"] == clusters["c"] != clusters["d"]
    assert clusters["e"] == clusters["f"] and len(set(clusters.values())) == 4
    assert len(set(capped_components(edges, list("abcdefg"), cap=10).values())) == 3


@needs_shopee
def test_relative_filters_are_applied_by_the_engine(shopee_index) -> None:
    payloads = {p.payload["product_id"]: p.payload for p in stored_products(shopee_index)}
    options = DedupOptions(
        min2=True,
        min2_threshold=0.3,
        same=("category",),
        different=("seller",),
        within=(("price", 0.5),),
    )
    result = run_dedup(shopee_index, options)
    schema = shopee_index.store._shard("products").info().payload_schema
    assert {"category", "seller", "price"} <= set(schema), "the engine indexes filtered fields"
    checked = 0
    for pid, hood in result.neighbourhoods.items():
        for other in hood.ids():
            if other != pid:
                assert payloads[other]["category"] == payloads[pid]["category"]
                assert payloads[other]["seller"] != payloads[pid]["seller"]
                low, high = payloads[pid]["price"] * 0.5, payloads[pid]["price"] * 1.5
                assert low <= payloads[other]["price"] <= high
                checked += 1
    assert checked > 0


@needs_shopee
def test_explain_agrees_with_match(shopee_index) -> None:
    first = next(stored_products(shopee_index))
    pid = first.payload["product_id"]
    matches = shopee_index.match_products([pid])[0]
    other = next(m for m in matches if m.product_id != pid)
    explanation = shopee_index.explain(pid, other.product_id)
    assert explanation.matched and explanation.rank == [m.product_id for m in matches].index(
        other.product_id
    )
    assert explanation.fused_score == pytest.approx(other.score)
    for modality, score in other.scores.items():
        assert explanation.scores[modality] == pytest.approx(score, abs=1e-5)
    assert explanation.fired == other.matched_by


@needs_shopee
def test_fused_neighbours_resume_from_a_cut_checkpoint(shopee_index, tmp_path) -> None:
    products = list(stored_products(shopee_index))
    checkpoint = tmp_path / "dedup.checkpoint.jsonl"
    full = fused_neighbours(
        shopee_index, products, DedupOptions(), batch_size=16, checkpoint=checkpoint
    )
    lines = checkpoint.read_text().splitlines(keepends=True)
    # a kill mid-write: half the records kept, the next one cut in the middle
    cut = [*lines[: len(lines) // 2], lines[len(lines) // 2][:20]]
    checkpoint.write_text("".join(cut))
    calls = []
    resumed = fused_neighbours(
        shopee_index,
        products,
        DedupOptions(),
        batch_size=16,
        checkpoint=checkpoint,
        progress=calls.append,
    )
    assert calls[0] == len(lines) // 2 - 1, "the finished products were not redone"
    assert set(resumed) == set(full)
    for pid in full:
        # equal RRF scores may come back in either order
        assert {m.product_id for m in resumed[pid]} == {m.product_id for m in full[pid]}
