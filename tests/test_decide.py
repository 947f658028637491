"""Decisions over the candidate-pair table: the rules, min-2, clusters, and the tuning that
calls them."""

from __future__ import annotations

import numpy as np
import pytest

from prodsearch.eval.metrics import row_scores
from prodsearch.eval.tuning import LabelledTable, tune_min2, tune_probability
from prodsearch.matching import decide
from prodsearch.matching.clusters import capped_components, table_clusters
from prodsearch.settings import FormulaFloors, SearchSettings, Thresholds

from .test_features import hand_made_table


def test_search_rules_follow_the_engine() -> None:
    table = hand_made_table()  # text 0.9 0.4 0.9 0.7 0.7; chars 0.6 - 0.5 0.2 0.15
    union = decide.modality_passes(table, {"text": 0.8, "chars": 0.18})
    np.testing.assert_array_equal(union, [True, False, True, True, False])
    rrf = SearchSettings(fusion="rrf", thresholds=Thresholds(text=0.8, chars=0.18, phash=2.0))
    np.testing.assert_array_equal(decide.search_passes(table, rrf), union)
    formula = SearchSettings(fusion="formula")
    formula.formula.min_fused_score = 0.88
    np.testing.assert_array_equal(
        decide.search_passes(table, formula), [True, False, True, True, False]
    )
    # a prefetch that missed (score under its floor, or no score) adds 0 to the formula
    floors = FormulaFloors(text=0.5, chars=0.16, phash=0.55)
    total = decide.formula_scores(table, {"text": 1.0, "chars": 2.0}, floors)
    np.testing.assert_allclose(total, [0.9 + 1.2, 0.0, 0.9 + 1.0, 0.7 + 0.4, 0.7])


def test_pair_model_decision_and_min2() -> None:
    table = hand_made_table()  # a->b, a->c, b->a, c->d, d->c
    probability = np.array([0.6, 0.9, 0.4, 0.2, 0.55])
    decide.record(table, probability >= 0.5, "pair model", probability)
    assert decide.record_min2(table, probability, 0.3) == 1  # b: its 0.4 to a reaches 0.3
    sets = table.match_sets()
    assert sets["a"] == ["a", "c", "b"]  # most probable first
    assert sets["b"] == ["b", "a"] and sets["c"] == ["c"] and sets["d"] == ["d", "c"]
    assert table.frame["rule"].tolist() == ["pair model", "pair model", "min-2", "", "pair model"]
    # c's best (0.2) is too far even for min-2; a product with matches is never given more
    added = decide.min2_additions(table, probability >= 0.5, probability, 0.1)
    np.testing.assert_array_equal(added, [False, False, True, True, False])


def test_tuning_scores_decisions_like_the_metric() -> None:
    table = hand_made_table()
    # a, b one product; c, d another; every product is a query
    labelled = LabelledTable.from_groups(table, {"a": 1, "b": 1, "c": 2, "d": 2}, set("abcd"))
    selected = np.array([True, True, False, False, True])  # a: {a, b, c}; d: {d, c}
    expected = row_scores(
        [{"a", "b", "c"}, {"b"}, {"c"}, {"d", "c"}],
        [{"a", "b"}, {"a", "b"}, {"c", "d"}, {"c", "d"}],
    )
    assert labelled.f1(selected) == pytest.approx(expected.f1)
    probability = np.array([0.6, 0.1, 0.4, 0.2, 0.55])
    minimum, min2 = tune_probability(labelled, probability)  # only a->c (0.1) is wrong
    assert 0.1 < minimum <= 0.2 and min2 <= minimum
    assert labelled.f1(probability >= minimum) == 1.0
    matched = probability >= 0.5
    assert tune_min2(labelled, matched, probability, np.array([0.3, 0.5])) == 0.3


def test_clusters_join_strongest_edges_first() -> None:
    edges = [(0.9, "a", "b"), (0.8, "b", "c"), (0.7, "c", "d"), (0.95, "e", "f")]
    clusters = capped_components(edges, list("abcdefg"), cap=3)
    assert clusters["a"] == clusters["b"] == clusters["c"] != clusters["d"]
    assert clusters["e"] == clusters["f"] and len(set(clusters.values())) == 4
    assert len(set(capped_components(edges, list("abcdefg"), cap=10).values())) == 3
    table = hand_made_table()
    decide.record(table, np.array([True, False, True, False, False]), "fused score")
    clusters = table_clusters(table, cap=50)
    assert (
        clusters["a"] == clusters["b"] and len({clusters["a"], clusters["c"], clusters["d"]}) == 3
    )
