"""Whole-catalog matching: output format, min-2, blending, clusters, engine filters, explain,
resume from a checkpoint, the pair model."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest

from prodsearch.catalog import read_catalog
from prodsearch.dedup import (
    DedupOptions,
    blended_vectors,
    candidate_features,
    capped_components,
    collect_candidates,
    fused_neighbours,
    pair_neighbours,
    read_pair_verdict,
    run_dedup,
    stored_products,
)
from prodsearch.encoders.base import SparseVec
from prodsearch.errors import ConfigError
from prodsearch.index import Index, Match
from prodsearch.ingest import ingest_catalog
from prodsearch.pair_model import (
    STAGE_FEATURES,
    STAGES,
    CandidatePairs,
    PairModel,
    feature_names,
    pair_features,
    stage_features,
    symmetric,
    title_numbers,
)
from prodsearch.recipes import load_recipe
from prodsearch.settings import PairModelSettings, Settings
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
@pytest.mark.parametrize("decider", ["fusion", "pair model"])
def test_relative_filters_are_applied_by_the_engine(shopee_index, decider) -> None:
    payloads = {p.payload["product_id"]: p.payload for p in stored_products(shopee_index)}
    options = DedupOptions(
        min2=True,
        min2_threshold=0.3,
        same=("category",),
        different=("seller",),
        within=(("price", 0.5),),
        pair_model=Settings().dedup.pair_model if decider == "pair model" else None,
    )
    result = run_dedup(shopee_index, options)
    assert result.decided_by == decider
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


def hand_made_pairs() -> CandidatePairs:
    """Four products: a and b close to each other, c and d close to each other."""
    nan = np.nan
    return CandidatePairs(
        ids=["a", "b", "c", "d"],
        query=np.array([0, 0, 1, 2, 3]),
        candidate=np.array([1, 2, 0, 3, 2]),
        total=np.array([1.5, 0.5, 1.4, 0.9, 0.85]),
        scores={
            "text": np.array([0.9, 0.4, 0.9, 0.7, 0.7]),
            "chars": np.array([0.6, nan, 0.5, 0.2, 0.15]),
            "charcnn": np.full(5, nan),
            "image": np.full(5, nan),
            "phash": np.array([0.75, 0.5, 0.75, 0.6, 0.6]),
        },
    )


HAND_MADE_TEXT = np.array([[1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8]], dtype=np.float32)
HAND_MADE_TITLES = ["Oat drink 500ml", "oat drink 500 ml x2", "phone case", "case XB-450"]


def hand_made_features(neighbour_threshold: float, modalities: list[str]) -> dict[str, np.ndarray]:
    features = pair_features(
        hand_made_pairs(),
        modalities,
        neighbour_threshold=neighbour_threshold,
        blend_threshold=1.0,
        dense={"text": HAND_MADE_TEXT},
        titles=HAND_MADE_TITLES,
    )
    return {name: features[:, i] for i, name in enumerate(feature_names(modalities))}


def test_pair_features_follow_their_definition() -> None:
    column = hand_made_features(0.8, ["text", "chars", "phash"])
    np.testing.assert_allclose(column["score_chars"], [0.6, -1, 0.5, 0.2, 0.15])  # missing: -1
    np.testing.assert_allclose(column["rank"], [1, 2, 1, 1, 1])
    np.testing.assert_allclose(column["best"], [1.5, 1.5, 1.4, 0.9, 0.85])
    np.testing.assert_allclose(column["gap"], [0, 1.0, 0, 0, 0])
    # neighbourhoods (candidates >= 0.8, the product included): {a, b}, {a, b}, {c, d}, {c, d}
    np.testing.assert_allclose(column["jaccard"], [1, 0, 1, 1, 1])
    np.testing.assert_allclose(column["size"], [1, 1, 1, 1, 1])
    np.testing.assert_allclose(column["reverse_total"], [1.4, -1, 1.5, 0.85, 0.9])
    # blending (matches >= 1.0): a + 0.9 b and b + 0.9 a; c and d keep their own vectors
    a, b, c, d = HAND_MADE_TEXT.astype(np.float64)
    blended_a, blended_b = a + 0.9 * b, b + 0.9 * a
    unit = [v / np.linalg.norm(v) for v in (blended_a, blended_b, c, d)]
    expected = [unit[0] @ unit[1], unit[0] @ unit[2], unit[1] @ unit[0], unit[2] @ unit[3]]
    np.testing.assert_allclose(column["blended_text"], [*expected, unit[3] @ unit[2]], rtol=1e-6)
    # title numbers: {500} vs {500, 2}; a number-less title; {450}
    np.testing.assert_allclose(column["numbers_jaccard"], [0.5, -1, 0.5, -1, -1])
    np.testing.assert_allclose(column["numbers_one_sided"], [0, 1, 0, 1, 1])
    assert title_numbers("Oat drink 1.5L x 6") == {"1.5", "6"}
    # with a stricter neighbourhood c and d are strangers: a lower overlap, smaller sizes
    strict = hand_made_features(0.95, ["text"])
    np.testing.assert_allclose(strict["jaccard"], [1, 0, 1, 0, 0])
    np.testing.assert_allclose(strict["candidate_size"], [1, 0, 1, 0, 0])
    assert "score_chars" not in strict and "blended_text" in strict


def random_pairs(n_products: int, per_product: int, seed: int = 0) -> CandidatePairs:
    """Each product with `per_product` random other products as candidates (text score only)."""
    rng = np.random.default_rng(seed)
    query = np.repeat(np.arange(n_products), per_product)
    candidate = (query + rng.integers(1, n_products, size=len(query))) % n_products
    keep = ~pd.DataFrame({"q": query, "c": candidate}).duplicated().to_numpy()
    query, candidate = query[keep], candidate[keep]
    nan = np.full(len(query), np.nan)
    return CandidatePairs(
        ids=[f"p{i}" for i in range(n_products)],
        query=query,
        candidate=candidate,
        total=rng.uniform(size=len(query)),
        scores={"text": rng.uniform(size=len(query)), "chars": nan, "charcnn": nan},
    )


def test_symmetric_and_stage_features_follow_their_definition() -> None:
    pairs = hand_made_pairs()  # a->b, a->c, b->a, c->d, d->c
    previous = np.array([0.8, 0.6, 0.4, 0.9, 0.7])
    np.testing.assert_allclose(symmetric(pairs, previous), [0.6, 0.6, 0.6, 0.8, 0.8])
    column = dict(zip(STAGE_FEATURES, stage_features(pairs, previous).T, strict=True))
    np.testing.assert_allclose(column["previous"], previous)
    # a and c share no candidate; a->b: a's candidates {b, c}, b's {a}: nothing shared either
    np.testing.assert_allclose(column["shared_weight"], 0)
    # probable (>= 0.5) neighbours: a {b, c}, b none, c {d}, d {c}
    np.testing.assert_allclose(column["previous_size"], [2, 2, 0, 1, 1])
    np.testing.assert_allclose(column["previous_candidate_size"], [0, 1, 2, 1, 1])
    np.testing.assert_allclose(column["previous_rank"], [1, 2, 1, 1, 1])
    np.testing.assert_allclose(column["previous_gap"], [0, 0.2, 0, 0, 0])
    # the candidate's best minus this probability: b 0.4, c 0.9, a 0.8, d 0.7, c 0.9
    np.testing.assert_allclose(column["previous_candidate_gap"], [-0.4, 0.3, 0.4, -0.2, 0.2])
    # two products with a common probable candidate share it
    shared = CandidatePairs(
        ids=["a", "b", "x"],
        query=np.array([0, 0, 1]),
        candidate=np.array([1, 2, 2]),
        total=np.ones(3),
        scores={},
    )
    features = dict(
        zip(STAGE_FEATURES, stage_features(shared, np.array([0.3, 0.9, 0.5])).T, strict=True)
    )
    assert features["shared_weight"][0] == pytest.approx(0.9 * 0.5)
    assert features["shared_count"][0] == 1 and features["shared_count"][1] == 0


def test_pair_model_fits_saves_and_checks_its_features(tmp_path) -> None:
    pairs = random_pairs(300, 8)
    rng = np.random.default_rng(1)
    names = feature_names(["text"])
    features = rng.normal(size=(len(pairs.query), len(names)))
    same = features[:, 0] + 0.1 * rng.normal(size=len(features)) > 0.5  # the text score decides
    groups = pairs.query % 20
    train = pairs.query < 250  # the others are scored by the fitted model, like distractors
    model, out_of_fold = PairModel.fit(pairs, features, same, groups, ["text"], train, stages=2)
    assert len(model.boosters) == 2
    probability = model.probabilities(pairs, features)
    for p in (probability, out_of_fold):
        assert p[same].mean() > 0.7 and p[~same].mean() < 0.3
        np.testing.assert_allclose(p, symmetric(pairs, p))  # both directions agree
    # the training pairs' probabilities are out of fold: they differ from the fitted model's
    assert not np.allclose(out_of_fold[train], probability[train])
    model.save(tmp_path / "model.json")
    loaded = PairModel.load(tmp_path / "model.json")
    assert loaded.modalities == ("text",)
    np.testing.assert_allclose(loaded.probabilities(pairs, features), probability, rtol=1e-6)
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
        PairModel.fit(pairs, features, same, np.zeros(len(same)), ["text"], train)
    shipped = PairModel.load()
    assert shipped.modalities == ("text", "chars", "phash") and len(shipped.boosters) == STAGES


def test_pair_model_decides_matches_and_min2() -> None:
    knobs = PairModelSettings(threshold=0.5, min2_threshold=0.3)
    probabilities = np.array([0.6, 0.9, 0.4, 0.2, 0.55])
    floors = {"text": 0.8, "chars": 0.15, "charcnn": 0.3, "image": 0.3, "phash": 0.5}
    neighbours, rescued = pair_neighbours(hand_made_pairs(), probabilities, knobs, floors, True)
    assert [m.product_id for m in neighbours["a"]] == ["c", "b"]  # most probable first
    assert [m.probability for m in neighbours["a"]] == [0.9, 0.6]
    assert neighbours["a"][1].matched_by == ("text", "chars", "phash")  # scores over the floors
    assert neighbours["a"][0].matched_by == ("phash",)
    assert [m.product_id for m in neighbours["b"]] == ["a"] and rescued == {"b"}  # 0.4 >= 0.3
    assert neighbours["c"] == []  # 0.2: too far even for min-2
    assert [m.product_id for m in neighbours["d"]] == ["c"]
    without_min2, none = pair_neighbours(hand_made_pairs(), probabilities, knobs, floors, False)
    assert without_min2["b"] == [] and none == set()


@needs_shopee
def test_dedup_with_the_pair_model_follows_its_probabilities(shopee_index, tmp_path) -> None:
    knobs = Settings().dedup.pair_model
    model = PairModel.load(knobs.model)
    products = list(stored_products(shopee_index))
    pairs = collect_candidates(shopee_index, products, DedupOptions())
    features = candidate_features(shopee_index, products, pairs, model.modalities, knobs)
    probability = model.probabilities(pairs, features)
    expected = {pid: set() for pid in pairs.ids}
    for q, c, p in zip(pairs.query, pairs.candidate, probability, strict=True):
        if p >= knobs.threshold:
            expected[pairs.ids[q]].add(pairs.ids[c])
    result = run_dedup(shopee_index, DedupOptions(min2=True, pair_model=knobs))
    assert result.decided_by == "pair model" and "candidates" in result.seconds
    matched = 0
    for pid, hood in result.neighbourhoods.items():
        others = set(hood.ids()) - {pid}
        if hood.by_min2:
            assert not expected[pid] and len(others) == 1
            assert knobs.min2_threshold <= hood.matches[0].probability < knobs.threshold
        else:
            assert others == expected[pid]
        matched += bool(others)
        for match in hood.matches:
            assert match.probability is not None and set(match.scores) == {"text", "chars", "phash"}
    assert 0 < matched < len(products), "some products match, not every one"
    # the audit trail holds every match with what decided it, and reads back per pair
    audit = tmp_path / "matches.pairs.csv"
    result.write_pairs_csv(audit)
    rows = list(csv.DictReader(audit.open()))
    assert len(rows) == sum(len(h.ids()) - 1 for h in result.neighbourhoods.values())
    for row in rows[:40]:
        hood = result.neighbourhoods[row["id"]]
        match = next(m for m in hood.matches if m.product_id == row["match"])
        verdict = read_pair_verdict(audit, row["id"], row["match"])
        assert verdict["probability"] == pytest.approx(match.probability)
        assert verdict["min2"] == hood.by_min2 and verdict["matched_by"] == list(match.matched_by)
        assert verdict["scores"] == pytest.approx(match.scores, abs=1e-4)
    assert read_pair_verdict(audit, rows[0]["id"], "no-such-id") is None
    # F1 against the true groups: the pair model is no worse than the thresholded fusion here
    labels = {p.payload["product_id"]: p.payload["label_group"] for p in products}

    def mean_f1(sets: dict[str, set[str]]) -> float:
        scores = []
        for pid, predicted in sets.items():
            truth = {o for o in labels if labels[o] == labels[pid]}
            scores.append(2 * len(predicted & truth) / (len(predicted) + len(truth)))
        return float(np.mean(scores))

    fused = run_dedup(shopee_index, DedupOptions(min2=False))
    assert (
        mean_f1({p: set(h.ids()) for p, h in result.neighbourhoods.items()})
        >= mean_f1({p: set(h.ids()) for p, h in fused.neighbourhoods.items()}) - 0.02
    )


@needs_shopee
def test_pair_model_refuses_a_collection_it_was_not_fitted_for(shopee_index, tmp_path) -> None:
    pairs = random_pairs(100, 4)
    features = np.random.default_rng(0).normal(
        size=(len(pairs.query), len(feature_names(["text"])))
    )
    same, groups = features[:, 0] > 0, pairs.query % 10
    model, _ = PairModel.fit(pairs, features, same, groups, ["text"], pairs.query >= 0, stages=1)
    model.save(tmp_path / "text_only.json")
    text_only = PairModelSettings(model=tmp_path / "text_only.json")
    with pytest.raises(ConfigError, match="fitted on modalities"):
        run_dedup(shopee_index, DedupOptions(pair_model=text_only))
    fallback = run_dedup(shopee_index, DedupOptions(pair_model=text_only, pair_model_fallback=True))
    assert fallback.decided_by == "fusion" and "fitted on modalities" in fallback.notes[0]


@needs_shopee
def test_candidates_resume_from_a_cut_checkpoint(shopee_index, tmp_path) -> None:
    products = list(stored_products(shopee_index))
    checkpoint = tmp_path / "candidates.checkpoint.jsonl"
    full = collect_candidates(shopee_index, products, DedupOptions(), 16, checkpoint=checkpoint)
    lines = checkpoint.read_text().splitlines(keepends=True)
    checkpoint.write_text("".join([*lines[: len(lines) // 2], lines[len(lines) // 2][:20]]))
    calls = []
    resumed = collect_candidates(
        shopee_index, products, DedupOptions(), 16, calls.append, checkpoint
    )
    assert calls[0] == len(lines) // 2 - 1, "the finished products were not redone"

    def as_set(pairs: CandidatePairs) -> set[tuple[str, str, float]]:
        return {
            (pairs.ids[q], pairs.ids[c], round(t, 4))
            for q, c, t in zip(pairs.query, pairs.candidate, pairs.total, strict=True)
        }

    assert as_set(resumed) == as_set(full) and len(full.query) > len(products)
