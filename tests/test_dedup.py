"""Whole-catalog matching: the output files, min-2, both deciders, engine filters, explain."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from prodsearch.catalog import read_catalog
from prodsearch.index import Index
from prodsearch.ingest import ingest_catalog
from prodsearch.matching.audit import read_pair_verdict
from prodsearch.matching.candidates import RelativeFilters, collect_candidates
from prodsearch.matching.dedup import default_search, run_dedup
from prodsearch.matching.explain import explain
from prodsearch.matching.features import table_features
from prodsearch.matching.pair_model import MODEL_CANDIDATES, PairModel
from prodsearch.recipes import load_recipe
from prodsearch.settings import DedupSettings, Settings

from .conftest import reconfigured
from .generated import write_catalog

FUSION = DedupSettings(decider="fusion")


def mean_f1(sets: dict[str, list[str]], labels: dict[str, str]) -> float:
    scores = []
    for pid, predicted in sets.items():
        truth = {o for o in labels if labels[o] == labels[pid]}
        scores.append(2 * len(set(predicted) & truth) / (len(set(predicted)) + len(truth)))
    return float(np.mean(scores))


def test_dedup_output_format(catalog_index, tmp_path) -> None:
    result = run_dedup(catalog_index, FUSION)
    out = tmp_path / "matches.csv"
    audit = result.write(out)
    rows = list(csv.DictReader(out.open()))
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == catalog_index.count()
    for row in rows:
        matches = row["matches"].split(" ")
        assert matches[0] == row["id"] and len(set(matches)) == len(matches)
        assert row["cluster"].isdigit() and row["min2"] in {"0", "1"}
    clusters = {r["id"]: r["cluster"] for r in rows}
    # a product and its direct matches share a cluster unless the size cap split them
    joined = sum(clusters[m] == clusters[r["id"]] for r in rows for m in r["matches"].split(" "))
    assert joined / sum(len(r["matches"].split(" ")) for r in rows) > 0.95
    pairs = list(csv.DictReader(audit.open()))
    assert len(pairs) == sum(len(r["matches"].split(" ")) - 1 for r in rows)
    assert {p["rule"] for p in pairs} <= {"modality score", "min-2"}


def test_min2_gives_lone_products_their_closest_neighbour(catalog_index) -> None:
    strict = reconfigured(
        catalog_index,
        thresholds=catalog_index.settings.thresholds.model_copy(
            update={"text": 0.999, "chars": 0.999, "phash": 0.999, "charcnn": 0.999}
        ),
        fusion="rrf",
    )
    plain = FUSION.model_copy(
        update={"fusion": FUSION.fusion.model_copy(update={"blend_rounds": 0})}
    )
    alone = run_dedup(strict, plain.model_copy(update={"min2": False})).match_sets()
    lone = {pid for pid, members in alone.items() if len(members) == 1}
    assert len(lone) > 10
    loose = plain.fusion.model_copy(update={"min2_min_fused_score": 0.3})
    result = run_dedup(strict, plain.model_copy(update={"fusion": loose}))
    rescued, sets = result.rescued(), result.match_sets()
    assert rescued and rescued <= lone
    for pid, members in sets.items():
        if pid in lone:
            assert len(members) == (2 if pid in rescued else 1)
        else:  # products that had matches are left as they were
            assert set(members) == set(alone[pid])
    never = plain.fusion.model_copy(update={"min2_min_fused_score": 99.0})
    assert not run_dedup(strict, plain.model_copy(update={"fusion": never})).rescued()


@pytest.mark.parametrize("decider", ["fusion", "pair-model"])
def test_relative_filters_are_applied_by_the_engine(catalog_index, decider) -> None:
    payloads = {p.product_id: p.payload for p in catalog_index.scroll(with_vectors=False)}
    filters = RelativeFilters(same=("category",), different=("seller",), within=(("price", 0.5),))
    knobs = DedupSettings(decider=decider)
    loose = knobs.fusion.model_copy(update={"min2_min_fused_score": 0.3})
    knobs = knobs.model_copy(update={"fusion": loose})
    result = run_dedup(catalog_index, knobs, filters)
    assert result.decided_by == decider.replace("-", " ")
    schema = catalog_index.store._shard("products").info().payload_schema
    assert {"category", "seller", "price"} <= set(schema), "the engine indexes filtered fields"
    checked = 0
    for pid, members in result.match_sets().items():
        for other in members[1:]:
            assert payloads[other]["category"] == payloads[pid]["category"]
            assert payloads[other]["seller"] != payloads[pid]["seller"]
            low, high = payloads[pid]["price"] * 0.5, payloads[pid]["price"] * 1.5
            assert low <= payloads[other]["price"] <= high
            checked += 1
    assert checked > 0


def test_dedup_with_the_pair_model_follows_its_probabilities(catalog_index, tmp_path) -> None:
    knobs = Settings().dedup
    pair = knobs.pair_model
    model = PairModel.load(pair.model)
    products = list(catalog_index.scroll())
    search = default_search(catalog_index)
    table = collect_candidates(catalog_index, products, search)
    top, rows = table.top(MODEL_CANDIDATES)  # the model scores each product's best candidates
    probability = np.zeros(len(table))
    probability[rows] = model.probabilities(top, table_features(top, products))
    expected = {pid: set() for pid in table.ids}
    for a, b, p in zip(table.a, table.b, probability, strict=True):
        if p >= pair.min_probability:
            expected[table.ids[a]].add(table.ids[b])
    result = run_dedup(catalog_index, knobs)
    assert result.decided_by == "pair model" and "candidates" in result.seconds
    rescued, sets = result.rescued(), result.match_sets()
    decided = result.table.frame[result.table.frame["match"]]
    assert decided["probability"].notna().all()
    for pid, members in sets.items():
        others = set(members) - {pid}
        if pid in rescued:
            assert not expected[pid] and len(others) == 1
        else:
            assert others == expected[pid]
    matched = sum(len(members) > 1 for members in sets.values())
    assert 0 < matched < len(products), "some products match, not every one"
    # the audit trail holds every match with what decided it, and reads back per pair
    audit = result.write(tmp_path / "matches.csv")
    rows = list(csv.DictReader(audit.open()))
    assert len(rows) == sum(len(members) - 1 for members in sets.values())
    for row in rows[:40]:
        verdict = read_pair_verdict(audit, row["id"], row["match"])
        a, b = table.ids.index(row["id"]), table.ids.index(row["match"])
        at = np.flatnonzero((table.a == a) & (table.b == b))[0]
        assert verdict["probability"] == pytest.approx(probability[at], abs=1e-4)
        assert verdict["min2"] == (verdict["rule"] == "min-2")
        assert verdict["rule"] in {"pair model", "min-2"}
        assert set(verdict["scores"]) == {"text", "chars", "phash"}
    assert read_pair_verdict(audit, rows[0]["id"], "no-such-id") is None
    # F1 against the true groups: the pair model is no worse than the thresholded fusion here
    labels = {p.product_id: p.payload["label_group"] for p in products}
    fused = run_dedup(catalog_index, FUSION.model_copy(update={"min2": False}))
    assert mean_f1(sets, labels) >= mean_f1(fused.match_sets(), labels) - 0.02


def test_a_catalog_of_titles_alone_is_decided_by_the_pair_model(tmp_path, encoders) -> None:
    """No phash, no photo: the pair model decides (its missing features missing), and on a
    catalog whose answer is known it finds most of each product's listings, few strangers."""
    frame = write_catalog(tmp_path / "catalog.csv", n_groups=40, seed=5)
    index = Index(str(tmp_path / "store"), "products", Settings(), encoders)
    ingest_catalog(index, read_catalog(tmp_path / "catalog.csv", load_recipe("generic")))
    result = run_dedup(index)
    assert result.decided_by == "pair model"
    probability = result.table.column("probability")
    assert not np.isnan(probability).any() and {"phash", "image"}.isdisjoint(
        result.table.modalities()
    )
    labels = dict(zip(frame["id"], frame["group"].astype(str), strict=True))
    scores = mean_f1(result.match_sets(), labels)
    alone = mean_f1({pid: [pid] for pid in labels}, labels)
    assert scores > alone + 0.25, (scores, alone)
    index.close()


def test_explain_agrees_with_match(catalog_index: Index) -> None:
    pid = next(catalog_index.scroll()).product_id
    matches = catalog_index.match_products([pid])[0]
    other = next(m for m in matches if m.product_id != pid)
    explanation = explain(catalog_index, pid, other.product_id)
    assert explanation.matched and explanation.rank == [m.product_id for m in matches].index(
        other.product_id
    )
    assert explanation.fused_score == pytest.approx(other.score)
    for modality, score in other.scores.items():
        assert explanation.scores[modality] == pytest.approx(score, abs=1e-5)
    assert explanation.fired == other.matched_by
