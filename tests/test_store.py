"""The congruence suite: every store test runs on every backend, and the embedded engine and the
client backend give the same ids and scores for the same queries."""

from __future__ import annotations

import numpy as np
import pytest

from prodsearch.encoders.base import SparseVec
from prodsearch.errors import CollectionNotFoundError, EncoderMismatchError
from prodsearch.filters import FilterSpec
from prodsearch.store import (
    FusedQuery,
    Fusion,
    Manifest,
    ModalityQuery,
    PointRecord,
    ScoreRequest,
    Store,
    open_store,
    point_id,
)

MANIFEST = Manifest(
    vectors={
        "text": {"dim": 8, "distance": "cosine"},
        "chars": {"dim": None, "distance": "dot"},
        "phash": {"dim": 4, "distance": "dot"},
    },
    encoders={"text": {"name": "t", "version": "1", "weights_sha256": "ab", "params": {}}},
)
N = 60


def _unit(rng: np.random.Generator, dim: int) -> np.ndarray:
    v = rng.normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def _points(seed: int = 0) -> list[PointRecord]:
    rng = np.random.default_rng(seed)
    points = []
    for i in range(N):
        vectors = {"text": _unit(rng, 8)}
        if i % 2 == 0:
            idx = np.sort(rng.choice(50, size=5, replace=False))
            vectors["chars"] = SparseVec(idx.astype(np.int64), rng.random(5).astype(np.float32))
        if i % 3 == 0:
            vectors["phash"] = rng.normal(size=4).astype(np.float32) * 0.5  # continuous: no ties
        payload = {"product_id": f"p{i}", "category": "a" if i % 4 else "b", "price": float(i)}
        points.append(PointRecord(point_id(f"p{i}"), vectors, payload))
    return points


@pytest.fixture
def filled(store: Store) -> Store:
    store.create_collection("products", MANIFEST)
    store.upsert("products", _points())
    store.build_index("products")
    return store


def _queries() -> list[FusedQuery]:
    rng = np.random.default_rng(7)
    text = _unit(rng, 8)
    chars = SparseVec(np.array([1, 5, 9, 20, 33], np.int64), np.full(5, 0.5, np.float32))
    phash = np.array([0.5, -0.5, 0.5, 0.5], np.float32)
    prefetches = (
        ModalityQuery("text", text, 0.2, 20),
        ModalityQuery("chars", chars, 0.01, 20),
        ModalityQuery("phash", phash, 0.0, 20),
    )
    weights = {"text": 1.0, "chars": 2.0, "phash": 0.5}
    return [
        FusedQuery(prefetches, Fusion("rrf", rrf_k=2), limit=10, exact=True),
        FusedQuery(prefetches, Fusion("rrf", rrf_k=60), limit=10, exact=True),
        FusedQuery(prefetches, Fusion("dbsf"), limit=10, exact=True),
        FusedQuery(
            prefetches, Fusion("formula", weights=weights, threshold=0.3), limit=10, exact=True
        ),
        FusedQuery(
            prefetches[:1],
            Fusion("rrf"),
            limit=5,
            exact=True,
            filter=FilterSpec.from_mapping({"category": "a", "price": {"lt": 40}}),
            exclude_point_ids=(point_id("p1"),),
        ),
        FusedQuery(
            prefetches,
            Fusion("rrf"),
            limit=10,
            exact=True,
            filter=FilterSpec.from_mapping({"category": {"not": "a"}}),
        ),
    ]


def test_missing_collection_is_a_clear_error(store: Store) -> None:
    assert not store.has_collection("nope")
    with pytest.raises(CollectionNotFoundError, match="prodsearch ingest"):
        store.manifest("nope")


def test_manifest_round_trip_and_encoder_check(filled: Store) -> None:
    manifest = filled.manifest("products")
    assert manifest == MANIFEST
    manifest.check_encoders(MANIFEST.encoders, "products")
    other = {"text": {**MANIFEST.encoders["text"], "weights_sha256": "cd"}}
    with pytest.raises(EncoderMismatchError, match="re-ingest"):
        manifest.check_encoders(other, "products")


def test_upsert_is_idempotent_and_replaces_whole_points(filled: Store) -> None:
    filled.upsert("products", _points())
    assert filled.count("products") == N
    replacement = PointRecord(
        point_id("p0"),
        {"text": np.ones(8, np.float32) / np.sqrt(8)},
        {"product_id": "p0", "category": "z"},
    )
    filled.upsert("products", [replacement])
    (stored,) = filled.retrieve("products", [point_id("p0")], with_vectors=True)
    assert stored.payload == {"product_id": "p0", "category": "z"}
    assert set(stored.vectors) == {"text"}  # the old chars and phash vectors are gone
    assert filled.count("products") == N


def test_retrieve_scroll_delete(filled: Store) -> None:
    ids = [point_id("p2"), point_id("missing")]
    (found,) = filled.retrieve("products", ids, with_vectors=True)
    assert found.payload["product_id"] == "p2"
    assert set(found.vectors) == {"text", "chars"}
    assert isinstance(found.vectors["chars"], SparseVec)
    seen, offset = [], None
    while True:
        page, offset = filled.scroll("products", offset, 25)
        seen += [p.payload["product_id"] for p in page]
        if offset is None:
            break
    assert sorted(seen) == sorted(f"p{i}" for i in range(N))
    filled.delete("products", [point_id("p2")])
    assert filled.count("products") == N - 1
    assert filled.retrieve("products", [point_id("p2")]) == []


def test_thresholds_filters_and_exclusions_hold(filled: Store) -> None:
    results = filled.query_batch("products", _queries())
    filtered = results[4]
    assert filtered, "the filtered query should find something"
    for hit in filtered:
        assert hit.payload["category"] == "a" and hit.payload["price"] < 40
        assert hit.payload["product_id"] != "p1"
    assert all(hit.payload["category"] != "a" for hit in results[5])
    formula = results[3]
    assert all(hit.score >= 0.3 for hit in formula)


def test_score_batch_returns_exact_engine_scores(filled: Store) -> None:
    query = _queries()[0]
    hits = filled.query_batch("products", [query])[0]
    ids = tuple(h.point_id for h in hits)
    text = query.prefetches[0]
    (scores,) = filled.score_batch("products", [ScoreRequest("text", text.vector, ids)])
    stored = {p.point_id: p.vectors["text"] for p in filled.retrieve("products", ids, True)}
    for pid, score in scores.items():
        assert score == pytest.approx(float(stored[pid] @ text.vector), abs=1e-5)
    assert filled.score_batch("products", [ScoreRequest("text", text.vector, ())]) == [{}]


def test_backends_are_congruent(tmp_path) -> None:
    """The embedded engine and qdrant-client give the same ids and scores for the same queries."""
    results = {}
    for name, location in (("edge", str(tmp_path / "edge")), ("client", ":memory:")):
        with open_store(location) as store:
            store.create_collection("products", MANIFEST)
            store.upsert("products", _points())
            store.build_index("products")
            results[name] = store.query_batch("products", _queries())
    for edge_hits, client_hits in zip(results["edge"], results["client"], strict=True):
        assert edge_hits, "every query should find something"
        # Equal fused scores (RRF ties) may come in either order: compare in (score, id) order.
        assert _ranked(edge_hits) == _ranked(client_hits)


def _ranked(hits) -> list[tuple[float, str]]:
    return sorted((-round(h.score, 4), h.point_id) for h in hits)
