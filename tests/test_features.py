"""The pair model's features over the candidate-pair table, and neighbourhood blending."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from prodsearch.encoders.base import SparseVec
from prodsearch.index import Product
from prodsearch.matching.blend import blend, blended_products
from prodsearch.matching.features import (
    STAGE_FEATURES,
    feature_names,
    pair_features,
    stage_features,
    symmetric,
    title_numbers,
)
from prodsearch.matching.relative import (
    CODE_FEATURES,
    CatalogStats,
    code_features,
    title_codes,
    token_features,
)
from prodsearch.matching.table import PairTable, group_rank


def hand_made_table() -> PairTable:
    """Four products: a and b close to each other, c and d close to each other."""
    nan = np.nan
    return PairTable.build(
        ["a", "b", "c", "d"],
        a=np.array([0, 0, 1, 2, 3]),
        b=np.array([1, 2, 0, 3, 2]),
        fused=np.array([1.5, 0.5, 1.4, 0.9, 0.85]),
        scores={
            "text": np.array([0.9, 0.4, 0.9, 0.7, 0.7]),
            "chars": np.array([0.6, nan, 0.5, 0.2, 0.15]),
            "phash": np.array([0.75, 0.5, 0.75, 0.6, 0.6]),
        },
    )


HAND_MADE_TEXT = np.array([[1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8]], dtype=np.float32)
HAND_MADE_TITLES = ["Oat drink 500ml", "oat drink 500 ml x2", "phone case", "case XB-450"]


def hand_made_features() -> dict[str, np.ndarray]:
    features = pair_features(
        hand_made_table(),
        dense={"text": HAND_MADE_TEXT},
        titles=HAND_MADE_TITLES,
        stats=CatalogStats.of(HAND_MADE_TITLES),
    )
    return {name: features[:, i] for i, name in enumerate(feature_names())}


def test_the_table_ranks_each_products_candidates() -> None:
    table = hand_made_table()
    np.testing.assert_allclose(table.column("rank"), [1, 2, 1, 1, 1])
    np.testing.assert_allclose(table.column("gap"), [0, 1.0, 0, 0, 0])
    np.testing.assert_allclose(table.reverse(table.fused), [1.4, np.nan, 1.5, 0.85, 0.9])
    assert table.modalities() == ["text", "chars", "phash"]


@pytest.mark.parametrize("ties", ["first", "average"])
def test_group_rank_is_pandas_descending_group_rank(ties: str) -> None:
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 40, 2000)
    values = rng.integers(0, 6, 2000).astype(np.float64) / 5  # many ties
    values[rng.random(2000) < 0.1] = np.nan
    expected = pd.Series(values).groupby(groups).rank(ascending=False, method=ties).to_numpy()
    np.testing.assert_array_equal(group_rank(groups, values, ties=ties), expected)
    assert group_rank(np.zeros(0, dtype=np.int64), np.zeros(0)).shape == (0,)


def test_relative_features_follow_their_definition() -> None:
    column = hand_made_features()  # text: a->b .9, a->c .4, b->a .9, c->d .7, d->c .7
    np.testing.assert_allclose(column["text"], [0.9, 0.4, 0.9, 0.7, 0.7], rtol=1e-6)
    # a->c: c's candidates do not hold a (rank = its one candidate + 1)
    np.testing.assert_allclose(column["text_rank_min"], [1, 2, 1, 1, 1])
    np.testing.assert_allclose(column["text_rank_max"], [1, 2, 1, 1, 1])
    np.testing.assert_allclose(column["text_gap_min"], [0, 0.3, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(column["text_gap_max"], [0, 0.5, 0, 0, 0], atol=1e-6)
    # above each side's 2nd best (only a has one: 0.4)
    np.testing.assert_allclose(column["text_over2_min"], [0.5, 0, 0.5, np.nan, np.nan], atol=1e-6)
    # CSLS: 2s - mean(top-5 of a) - mean(top-5 of b); a's mean is 0.65
    np.testing.assert_allclose(column["text_csls5"], [0.25, -0.55, 0.25, 0, 0], atol=1e-6)
    np.testing.assert_allclose(column["text_quantile"], [1, 0.2, 1, 0.6, 0.6], atol=1e-6)
    np.testing.assert_allclose(column["text_dense_max"], [1, 1, 1, 1, 1])
    # a missing score is a missing feature; a modality the catalog lacks is missing everywhere
    assert np.isnan(column["chars_rank_min"][1]) and not np.isnan(column["chars_rank_min"][0])
    assert np.isnan(column["image"]).all() and np.isnan(column["image_csls5"]).all()
    np.testing.assert_allclose(column["fused_rank_max"], [1, 2, 1, 1, 1])
    # neighbourhoods (each product and its candidates): {a,b,c} {a,b} {c,d} {c,d}
    np.testing.assert_allclose(column["neighbours_jaccard"], [2 / 3, 0.25, 2 / 3, 1, 1], rtol=1e-6)
    # blending over mutual best candidates: a + 0.9 b and b + 0.9 a, c + 0.7 d and d + 0.7 c
    a, b, c, d = HAND_MADE_TEXT.astype(np.float64)
    unit = [v / np.linalg.norm(v) for v in (a + 0.9 * b, b + 0.9 * a, c + 0.7 * d, d + 0.7 * c)]
    expected = [unit[0] @ unit[1], unit[0] @ unit[2], unit[1] @ unit[0], unit[2] @ unit[3]]
    np.testing.assert_allclose(column["blended_text"], [*expected, unit[3] @ unit[2]], rtol=1e-5)
    assert np.isnan(column["blended_image"]).all()
    # title numbers: {500} vs {500, 2}; a number-less title; {450}
    np.testing.assert_allclose(column["numbers_jaccard"], [0.5, -1, 0.5, -1, -1])
    np.testing.assert_allclose(column["numbers_one_sided"], [0, 1, 0, 1, 1])
    assert title_numbers("Oat drink 1.5L x 6") == {"1.5", "6"}
    # model codes: only "case XB-450" has one ("500ml" is a size)
    np.testing.assert_allclose(column["code_one_sided"], [0, 0, 0, 1, 1])
    np.testing.assert_allclose(column["code_both"], 0)


def test_a_product_without_a_modality_is_missing_from_its_blended_cosine() -> None:
    # d has no text vector (a photo-only listing): its pairs' blended text is unknown, not 0
    # ("different"); the pairs of products that both have one keep their cosine
    text = HAND_MADE_TEXT.copy()
    text[3] = 0
    features = pair_features(
        hand_made_table(),
        dense={"text": text},
        titles=HAND_MADE_TITLES,
        stats=CatalogStats.of(HAND_MADE_TITLES),
    )
    blended = features[:, feature_names().index("blended_text")]  # a-b a-c b-a c-d d-c
    assert np.isnan(blended[3:]).all()
    assert np.isfinite(blended[:3]).all() and blended[0] > 0.9


def test_model_codes_are_read_off_titles() -> None:
    assert title_codes("Sony Bravia KDL-46V5100 46in LCD TV 2009") == {"kdl46v5100"}
    assert title_codes("Samsung 32GB microSD 1920x1080 500ml") == frozenset()
    assert title_codes("HP 637414-B21 Xeon E5607") == {"637414b21", "e5607"}
    pairs = code_features(
        ["TL-SF1008D switch", "tl sf1008d", "TL-SF1016D", "switch", "KDL46V51"],
        np.array([0, 0, 2, 4]),
        np.array([2, 3, 0, 2]),
    )
    names = list(CODE_FEATURES)
    np.testing.assert_allclose(pairs[0], [1, 0, 1, 0, 0, 0])  # both coded, none shared
    assert pairs[1][names.index("code_one_sided")] == 1
    np.testing.assert_allclose(pairs[2], pairs[0])


def test_symmetric_and_stage_features_follow_their_definition() -> None:
    table = hand_made_table()  # a->b, a->c, b->a, c->d, d->c
    previous = np.array([0.8, 0.6, 0.4, 0.9, 0.7])
    np.testing.assert_allclose(symmetric(table, previous), [0.6, 0.6, 0.6, 0.8, 0.8])
    column = dict(zip(STAGE_FEATURES, stage_features(table, previous).T, strict=True))
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
    shared = PairTable.build(
        ["a", "b", "x"], a=np.array([0, 0, 1]), b=np.array([1, 2, 2]), fused=np.ones(3), scores={}
    )
    features = dict(
        zip(STAGE_FEATURES, stage_features(shared, np.array([0.3, 0.9, 0.5])).T, strict=True)
    )
    assert features["shared_weight"][0] == pytest.approx(0.9 * 0.5)
    assert features["shared_count"][0] == 1 and features["shared_count"][1] == 0


def test_blending_changes_dense_vectors_only_as_specified() -> None:
    def product(pid: str, text: list[float]) -> Product:
        sparse = SparseVec(np.array([1, 2]), np.array([0.5, 0.5], np.float32))
        vectors = {
            "text": np.array(text, np.float32),
            "chars": sparse,
            "phash": np.full(4, 0.5, np.float32),
        }
        return Product(pid, {"product_id": pid}, vectors)

    products = [product("a", [1, 0]), product("b", [0, 1]), product("c", [0.6, 0.8])]
    # a's candidates: b (text 0.5, matched) and c (text 0.9, not matched); b's: a (not matched)
    table = PairTable.build(
        ["a", "b", "c"],
        a=np.array([0, 0, 1]),
        b=np.array([1, 2, 0]),
        fused=np.array([1.0, 0.5, 1.0]),
        scores={"text": np.array([0.5, 0.9, 0.5])},
    )
    selected = np.array([True, False, False])
    blended = {p.product_id: p for p in blended_products(table, products, selected)}
    expected_a = np.array([1, 0.5]) / np.linalg.norm([1, 0.5])
    np.testing.assert_allclose(blended["a"].vectors["text"], expected_a, rtol=1e-6)
    np.testing.assert_allclose(blended["b"].vectors["text"], [0, 1])  # nothing selected: as is
    np.testing.assert_allclose(blended["c"].vectors["text"], [0.6, 0.8], rtol=1e-6)
    for p in products:  # sparse and hash vectors are never blended; payloads are kept
        assert blended[p.product_id].vectors["chars"] is p.vectors["chars"]
        np.testing.assert_array_equal(blended[p.product_id].vectors["phash"], np.full(4, 0.5))
        assert blended[p.product_id].payload == p.payload
    # the feature and the fusion path use the same blend
    matrix = np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)
    np.testing.assert_allclose(blend(table, "text", matrix, selected)[0], expected_a, rtol=1e-6)


def test_token_features_and_catalog_statistics() -> None:
    titles = [
        "Adobe Photoshop CS3 upgrade",
        "adobe photoshop cs3",
        "Adobe Photoshop CS3 academic",
        "TL-SF1008D switch 8 port",
        "TP-Link TL-SF1008D",
    ]
    stats = CatalogStats.of(titles)
    assert stats.titles == 5 and stats.document_frequency["photoshop"] == 3
    assert stats.idf("upgrade") > stats.idf("photoshop") > 0
    features = token_features(titles, np.array([0, 1, 3]), np.array([1, 2, 4]), stats)
    column = dict(
        zip(
            (
                "fraction_min",
                "fraction_max",
                "mass_min",
                "mass_max",
                "jaccard",
                "rarest_min",
                "rarest_max",
                "subset",
                "length",
                "numbers_subset",
            ),
            features.T,
            strict=True,
        )
    )
    # "upgrade" is the only word 0 has and 1 lacks; 1's words are a subset of 0's
    assert column["mass_min"][0] == 0 and column["mass_max"][0] == pytest.approx(
        stats.idf("upgrade")
    )
    assert column["subset"].tolist() == [1, 1, 0]  # "tp-link" and "switch 8 port" differ
    assert column["rarest_max"][1] == pytest.approx(stats.idf("academic"))
    assert 0 < column["jaccard"][2] < 1
