"""Index and match(): one fused request, per-modality scores, encoder checks, both backends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from prodsearch.catalog import read_catalog
from prodsearch.encoders import EncoderSet, TextEncoder
from prodsearch.errors import CollectionNotFoundError, ConfigError, EncoderMismatchError
from prodsearch.index import Index
from prodsearch.ingest import ingest_catalog
from prodsearch.query import MatchOptions
from prodsearch.recipes import load_recipe
from prodsearch.settings import Settings

from .conftest import SAMPLE, needs_shopee, reconfigured


def _index(
    location: str, encoders: EncoderSet, csv: Path, recipe: str, collection="products"
) -> Index:
    index = Index(location, collection, Settings(), encoders)
    ingest_catalog(index, read_catalog(csv, load_recipe(recipe)))
    return index


def _small_catalog(index: Index) -> Index:
    """The index with a chars threshold for the 137-title test catalog. The chars score of an
    exact copy depends on the catalog's size (the engine's IDF over 137 titles is lower than the
    reference IDF: 0.24-0.76 here), so a small catalog needs its own threshold, as
    `prodsearch eval` would tune it."""
    return reconfigured(
        index, thresholds=index.settings.thresholds.model_copy(update={"chars": 0.2})
    )


@pytest.fixture(params=["edge", "client-memory"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "store") if request.param == "edge" else ":memory:"


@needs_shopee
def test_title_match_finds_itself_and_its_group(location, encoders, shopee_csv) -> None:
    frame = pd.read_csv(shopee_csv)
    with _index(location, encoders, shopee_csv, "shopee") as stored:
        index = _small_catalog(stored)
        found_group = 0
        for _, row in frame.head(20).iterrows():
            matches = index.match(row["title"], phash=row["image_phash"], k=10)
            assert matches[0].product_id == row["posting_id"]
            assert set(matches[0].scores) == {"text", "chars", "phash"}
            assert matches[0].matched_by == ("text", "chars", "phash")
            group = set(frame.loc[frame["label_group"] == row["label_group"], "posting_id"])
            found_group += len(group & {m.product_id for m in matches}) > 1
            for m in matches:
                assert set(m.matched_by) <= set(m.scores)
                assert m.payload["product_id"] == m.product_id
        assert found_group >= 12, "most queries should find another member of their group"


@needs_shopee
def test_fusions_thresholds_and_filters(location, encoders, shopee_csv) -> None:
    frame = pd.read_csv(shopee_csv)
    title, label = frame.loc[0, "title"], int(frame.loc[0, "label_group"])
    with _index(location, encoders, shopee_csv, "shopee") as index:
        for fusion in ("rrf", "dbsf", "formula"):
            assert index.match(title, fusion=fusion)[0].product_id == frame.loc[0, "posting_id"]
        strict = index.match(title, thresholds={"text": 0.99, "chars": 0.99})
        loose = index.match(title, thresholds={"text": 0.3, "chars": 0.05}, k=50)
        assert len(strict) < len(loose)
        for m in index.match(
            title, thresholds={"text": 0.3, "chars": 0.05}, filter={"label_group": label}
        ):
            assert m.payload["label_group"] == label
        others = index.match(title, exclude_ids=[frame.loc[0, "posting_id"]])
        assert frame.loc[0, "posting_id"] not in {m.product_id for m in others}
        with pytest.raises(ConfigError):
            index.match()
        with pytest.raises(ConfigError, match="unknown modality"):
            index.match(title, thresholds={"colour": 0.5})


def test_image_and_title_queries_on_the_sample_catalog(location, encoders) -> None:
    with _index(location, encoders, SAMPLE / "catalog.csv", "generic") as index:
        photo = SAMPLE / "queries" / "Oatly-Oat-Milk.jpg"
        image_only = index.match(image=photo, thresholds={"image": 0.0}, k=5)
        assert image_only and all(set(m.scores) <= {"image", "phash"} for m in image_only)
        assert "image" in image_only[0].scores
        both = index.match("Oatly oat milk", image=photo.read_bytes(), k=5)
        top = next(m for m in both if m.payload["product"] == "Oatly-Oat-Milk")
        assert "text" in top.matched_by and {"text", "chars", "image"} <= set(top.scores)


@needs_shopee
def test_encoder_mismatch_is_refused(tmp_path, encoders, shopee_csv) -> None:
    location = str(tmp_path / "store")
    _index(location, encoders, shopee_csv, "shopee").close()
    other = EncoderSet({**encoders.encoders, "text": TextEncoder(max_tokens=32)})
    with (
        Index(location, "products", Settings(), other) as index,
        pytest.raises(EncoderMismatchError, match="max_tokens"),
    ):
        index.match("anything")


def test_missing_collection_is_refused(tmp_path, encoders) -> None:
    with (
        Index(str(tmp_path / "s"), "nothing", Settings(), encoders) as index,
        pytest.raises(CollectionNotFoundError, match="prodsearch ingest"),
    ):
        index.match("anything")


@needs_shopee
def test_both_backends_return_the_same_matches(tmp_path, encoders, shopee_csv) -> None:
    ids = pd.read_csv(shopee_csv)["posting_id"].tolist()
    results = []
    for location in (str(tmp_path / "edge"), ":memory:"):
        with _index(location, encoders, shopee_csv, "shopee") as index:
            results.append(index.match_products(ids, MatchOptions(k=20)))
    for edge, client in zip(*results, strict=True):
        assert {m.product_id for m in edge} == {m.product_id for m in client}
        edge_scores = {m.product_id: m.scores for m in edge}
        for m in client:
            for modality, score in m.scores.items():
                # Edge stores float16 by default, local mode float32: rounding both vectors to
                # float16 (unit roundoff 2**-11) moves a cosine by up to ~2**-10.
                assert edge_scores[m.product_id][modality] == pytest.approx(score, abs=1e-3)


@needs_shopee
def test_cut_sparse_query_keeps_the_whole_query_scores(encoders, shopee_csv, tmp_path) -> None:
    """sparse_query_terms: chars candidates come from the query's heaviest terms, and every
    hit still carries (and passed the threshold on) the whole query's score."""
    frame = pd.read_csv(shopee_csv)
    with _index(str(tmp_path / "store"), encoders, shopee_csv, "shopee") as stored:
        index = _small_catalog(stored)
        cut = reconfigured(index, sparse_query_terms=12, sparse_candidates=20)
        vectors = index.encode_query(frame["title"][3])
        query = cut.fused_request(vectors, MatchOptions(fusion="rrf"))
        chars = next(p for p in query.prefetches if p.modality == "chars")
        whole = vectors["chars"]
        assert chars.vector is whole and chars.candidate_limit == 20
        assert len(chars.candidates.indices) == 12 < len(whole.indices)
        heaviest = set(whole.indices[np.argsort(-whole.values)[:12]].tolist())
        assert set(chars.candidates.indices.tolist()) == heaviest
        text = next(p for p in query.prefetches if p.modality == "text")
        assert text.candidates is None  # dense vectors are searched whole
        options = MatchOptions(k=20, modalities=["chars"])
        for title in frame["title"].head(10):
            plain = {
                m.product_id: m.scores["chars"]
                for m in index.match_vectors([index.encode_query(title)], options)[0]
            }
            found = cut.match_vectors([index.encode_query(title)], options)[0]
            assert found, "the product itself is found from its rarest n-grams"
            threshold = cut.settings.thresholds.chars
            for m in found:
                assert m.scores["chars"] >= threshold
                if m.product_id in plain:
                    assert m.scores["chars"] == pytest.approx(plain[m.product_id], abs=1e-4)


def test_search_breadth_follows_the_collection_size(encoders, tmp_path, monkeypatch) -> None:
    """hnsw_ef: the engine default for a small collection, hnsw_ef_large from LARGE_COLLECTION
    points on, hnsw_ef when set; the size estimate is re-read after SIZE_RECHECK_SECONDS."""
    import prodsearch.index as index_module

    with _index(str(tmp_path / "store"), encoders, SAMPLE / "catalog.csv", "generic") as index:
        vectors = index.encode_query("Arla milk")

        def breadth(idx: Index) -> int | None:
            return idx.fused_request(vectors).hnsw_ef

        reads = []
        count = index.store.count
        monkeypatch.setattr(
            index.store, "count", lambda name, exact=True: reads.append(exact) or count(name, exact)
        )
        assert breadth(index) is None and reads == [False]
        monkeypatch.setattr(index_module, "LARGE_COLLECTION", index.count())
        assert breadth(index) == index.settings.hnsw_ef_large == 256
        assert reads == [False, True], "the estimate is kept for SIZE_RECHECK_SECONDS"
        monkeypatch.setattr(index_module, "SIZE_RECHECK_SECONDS", 0.0)
        assert breadth(index) == 256 and reads == [False, True, False]
        assert breadth(reconfigured(index, hnsw_ef=64)) == 64
        assert breadth(reconfigured(index, hnsw_ef_large=None)) is None
        assert index.match("Arla milk", k=3), "the large-collection breadth runs in the engine"
