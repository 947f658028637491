"""The congruence suite: every store test runs on every backend, and the embedded engine and the
client backend give the same ids and scores for the same queries."""

from __future__ import annotations

import json
import signal
import subprocess

import numpy as np
import pandas as pd
import pytest
from qdrant_client import models

from prodsearch.catalog import read_catalog
from prodsearch.encoders.base import SparseVec
from prodsearch.errors import (
    CollectionNotFoundError,
    EncoderMismatchError,
    StoreError,
    StoreLockedError,
)
from prodsearch.filters import FilterSpec
from prodsearch.index import Index
from prodsearch.ingest import ingest_catalog
from prodsearch.recipes import load_recipe
from prodsearch.settings import Settings
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
from prodsearch.store.client import ClientStore
from prodsearch.store.edge import EdgeStore

from .generated import labelled_catalog
from .test_faults import _env, free_port, prodsearch, start_server

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
            prefetches,
            Fusion("formula", weights=weights, min_fused_score=0.3),
            limit=10,
            exact=True,
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


def test_invalid_collection_names_are_refused(store: Store) -> None:
    for name in ("a/b", "../escape"):
        with pytest.raises(StoreError, match="/"):
            store.create_collection(name, MANIFEST)
    assert not store.has_collection("b")


def test_an_embedded_collection_open_elsewhere_is_locked_not_deleted(tmp_path) -> None:
    with EdgeStore(tmp_path) as holder, EdgeStore(tmp_path) as other:
        holder.create_collection("products", MANIFEST)  # its shard is open from here on
        for attempt in (
            lambda: other.count("products"),
            lambda: other.upsert("products", _points()[:1]),
            lambda: other.delete_collection("products"),
        ):
            with pytest.raises(StoreLockedError, match=r"'products' in .* is open in another"):
                attempt()
        assert other.has_collection("products") and holder.count("products") == 0
        holder.close()
        other.upsert("products", _points()[:1])
        assert other.count("products") == 1
        other.close()
        holder.delete_collection("products")
        assert not holder.has_collection("products")


@pytest.mark.parametrize("location", [":memory:", "local"])
def test_a_collection_not_created_by_prodsearch_is_refused(location, tmp_path) -> None:
    with open_store(location if location == ":memory:" else f"local:{tmp_path}") as store:
        assert isinstance(store, ClientStore)
        store.client.create_collection(
            "theirs", vectors_config={"v": models.VectorParams(size=4, distance="Cosine")}
        )
        assert store.has_collection("theirs")
        with pytest.raises(StoreError, match=r"'theirs' .* was not created by prodsearch"):
            store.manifest("theirs")


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
    before = filled.retrieve("products", [point_id("p3")], with_vectors=True)[0]
    filled.set_payload("products", [point_id("p3")], {"cluster_id": "c-7"})
    (after,) = filled.retrieve("products", [point_id("p3")], with_vectors=True)
    assert after.payload == {**before.payload, "cluster_id": "c-7"}, "merged, not replaced"
    np.testing.assert_allclose(after.vectors["text"], before.vectors["text"])
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
    query = _as_engine_query(filled, text.vector)
    for pid, score in scores.items():
        assert score == pytest.approx(float(stored[pid] @ query), abs=1e-5)
    assert filled.score_batch("products", [ScoreRequest("text", text.vector, ())]) == [{}]


def test_candidates_are_rescored_with_the_whole_query(filled: Store) -> None:
    """A prefetch that finds candidates with a cut query keeps the whole query's scores and
    threshold: its hits are the whole query's hits among those candidates, scored the same."""
    chars = SparseVec(
        np.arange(0, 50, 2, dtype=np.int64), np.linspace(1, 0.1, 25, dtype=np.float32)
    )
    cut = SparseVec(chars.indices[:3], chars.values[:3])
    whole = ModalityQuery("chars", chars, 0.2, 30)
    two_stage = ModalityQuery("chars", chars, 0.2, 30, candidates=cut, candidate_limit=4)
    full, staged, cut_only = (
        filled.query_batch("products", [FusedQuery((q,), Fusion("dbsf"), limit=30, exact=True)])[0]
        for q in (whole, two_stage, ModalityQuery("chars", cut, None, 4))
    )
    assert len(cut_only) == 4 and 0 < len(staged) <= 4 < len(full)
    assert {h.point_id for h in staged} <= {h.point_id for h in cut_only}
    (whole_scores,) = filled.score_batch(
        "products", [ScoreRequest("chars", chars, tuple(h.point_id for h in cut_only))]
    )
    kept = {h.point_id for h in cut_only if whole_scores[h.point_id] >= 0.2}
    assert {h.point_id for h in staged} == kept


def _stores_float16(store: Store) -> bool:
    """True when the engine really keeps dense vectors as float16 (local mode keeps float32)."""
    if isinstance(store, ClientStore) and not store.location.startswith("http"):
        return False
    return getattr(store, "dense_datatype", "float32") == "float16"


def _as_engine_query(store: Store, vector: np.ndarray) -> np.ndarray:
    """The query as a float16 engine scores it: rounded to float16 (after normalising a cosine
    query; the test's text query is already a unit vector)."""
    if not _stores_float16(store):
        return vector
    return vector.astype(np.float16).astype(np.float32)


def test_dense_vectors_are_stored_as_float16_by_default(store: Store) -> None:
    store.create_collection("products", MANIFEST)
    store.upsert("products", _points())
    (stored,) = store.retrieve("products", [point_id("p0")], with_vectors=True)
    phash = _points()[0].vectors["phash"]  # a dot vector: stored as given, up to the datatype
    if isinstance(store, EdgeStore):
        assert store.dense_datatype == "float16"
        assert np.array_equal(stored.vectors["phash"], phash.astype(np.float16).astype(np.float32))
        assert not np.array_equal(stored.vectors["phash"], phash)
    else:
        assert isinstance(store, ClientStore)
        vectors = store.client.get_collection("products").config.params.vectors
        assert {n: v.datatype for n, v in vectors.items()} == {
            "text": models.Datatype.FLOAT16,
            "phash": models.Datatype.FLOAT16,
        }


def test_float32_storage_keeps_vectors_exactly(tmp_path) -> None:
    with EdgeStore(tmp_path / "edge", dense_datatype="float32") as store:
        store.create_collection("products", MANIFEST)
        store.upsert("products", _points())
        (stored,) = store.retrieve("products", [point_id("p0")], with_vectors=True)
    assert np.array_equal(stored.vectors["phash"], _points()[0].vectors["phash"])


def test_backends_are_congruent(tmp_path) -> None:
    """The embedded engine and qdrant-client give the same ids and scores for the same queries.

    Compared at float32 storage: qdrant-client's local mode ignores the datatype (it always
    computes in float32), so only there can the two engines agree to the last digit.
    """
    results = {}
    for name, store in (
        ("edge", EdgeStore(tmp_path / "edge", dense_datatype="float32")),
        ("client", ClientStore(dense_datatype="float32")),
    ):
        with store:
            store.create_collection("products", MANIFEST)
            store.upsert("products", _points())
            store.build_index("products")
            results[name] = store.query_batch("products", _queries())
    for edge_hits, client_hits in zip(results["edge"], results["client"], strict=True):
        assert edge_hits, "every query should find something"
        # Equal fused scores (RRF ties) may come in either order: compare in (score, id) order.
        assert _ranked(edge_hits) == _ranked(client_hits)


def test_float16_engine_stays_congruent_within_float16_precision(tmp_path) -> None:
    """The default (float16) engine against float32 arithmetic: the same hits, and scores that
    differ by no more than float16 rounding of the stored and the query vectors allows
    (unit roundoff 2**-11 on each: at most ~2**-10 on a cosine, 1e-3 here)."""
    results = {}
    for name, location in (("edge", str(tmp_path / "edge")), ("client", ":memory:")):
        with open_store(location) as store:
            store.create_collection("products", MANIFEST)
            store.upsert("products", _points())
            store.build_index("products")
            results[name] = store.query_batch("products", _queries())
    for edge_hits, client_hits in zip(results["edge"], results["client"], strict=True):
        assert edge_hits, "every query should find something"
        edge_scores = {h.point_id: h.score for h in edge_hits}
        assert edge_scores.keys() == {h.point_id for h in client_hits}
        for hit in client_hits:
            assert edge_scores[hit.point_id] == pytest.approx(hit.score, abs=1e-3)


def _ranked(hits) -> list[tuple[float, str]]:
    return sorted((-round(h.score, 4), h.point_id) for h in hits)


@pytest.mark.slow
def test_ingest_while_serve_runs_on_an_embedded_store_is_a_clear_error(tmp_path, encoders) -> None:
    """Two real processes on one embedded store: `prodsearch serve` holds the collection, a
    `prodsearch ingest` started meanwhile exits 1 with a one-line error saying so, and runs
    once the server has stopped."""
    store, catalog = tmp_path / "store", tmp_path / "catalog.csv"
    labelled_catalog(10).to_csv(catalog, index=False)
    with Index(str(store), "products", Settings(), encoders) as index:
        ingest_catalog(index, read_catalog(catalog, load_recipe("generic")))
    ingest = [*prodsearch("ingest", str(catalog), "--store", str(store)), "--json"]
    server = start_server(store, free_port(), tmp_path / "serve.log")
    try:
        second = subprocess.run(ingest, capture_output=True, text=True, timeout=300, env=_env())
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    assert second.returncode == 1, second.stderr
    said = " ".join(second.stderr.split())  # the console wraps long lines
    assert f"error: collection 'products' in {store} is open in another process" in said
    assert "`prodsearch serve` on the same store" in said and "Traceback" not in said
    after = subprocess.run(ingest, capture_output=True, text=True, timeout=300, env=_env())
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)["unchanged"] == len(pd.read_csv(catalog))


def test_a_binary_code_gets_no_graph_and_is_searched_exactly(store: Store) -> None:
    # The phash encoder's vector is a binary code: its collection vector has no HNSW graph but
    # 1-bit quantization (half the index build at ingest's end), and a search on it finds every
    # code above the threshold, ties among identical codes included (a graph loses some).
    from prodsearch.encoders import PhashEncoder
    from prodsearch.encoders.phash import phash_vector

    assert PhashEncoder.binary and PhashEncoder().binary
    manifest = Manifest(
        vectors={"phash": {"dim": 64, "distance": "dot", "binary": True}},
        encoders={"phash": {"name": "p", "version": "1", "weights_sha256": "", "params": {}}},
    )
    assert [s.binary for s in manifest.specs()] == [True]
    store.create_collection("codes", manifest)
    rng = np.random.default_rng(1)
    codes = [f"{int(rng.integers(0, 2**63)):016x}" for _ in range(40)]
    points = [
        PointRecord(point_id(f"p{i}"), {"phash": phash_vector(codes[i % 40])}, {"i": i})
        for i in range(400)  # every code ten times: ties
    ]
    store.upsert("codes", points)
    store.build_index("codes")
    query = phash_vector(codes[3])
    found = store.query_batch(
        "codes",
        [FusedQuery([ModalityQuery("phash", query, 0.9, 50)], Fusion("rrf"), limit=50)],
    )[0]
    expected = {point_id(f"p{i}") for i in range(400) if i % 40 == 3}
    assert {hit.point_id for hit in found} == expected
    if isinstance(store, EdgeStore):
        config = json.loads((store._dir("codes") / "shard" / "edge_config.json").read_text())
        vector = config["vectors"]["phash"]
        assert vector["hnsw_config"]["m"] == 0 and "binary" in vector["quantization_config"]
    else:
        assert isinstance(store, ClientStore)
        params = store.client.get_collection("codes").config.params.vectors["phash"]
        assert params.hnsw_config.m == 0 and params.quantization_config.binary is not None
