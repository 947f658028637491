"""The active-learning queue: uncertain pairs first, a product at most once per batch, signal
patterns taken in turn, answered pairs never asked again."""

from __future__ import annotations

import numpy as np
import pytest

from prodsearch.matching import decide
from prodsearch.matching.table import PairTable
from prodsearch.review.queue import next_batch, review_pairs, uncertain_left

FIRED_AT = {"text": 0.5, "chars": 0.5, "charcnn": 0.5, "image": 0.5, "phash": 0.8}


def table(probability: list[float], text: list[float], chars: list[float]) -> PairTable:
    """Pairs (0,1), (0,2), (1,2), (3,4), (5,6), (7,8) ... one per probability, both
    directions, decided at 0.5."""
    ends = [(0, 1), (0, 2), (1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12)][: len(probability)]
    a = np.array([x for x, y in ends] + [y for x, y in ends])
    b = np.array([y for x, y in ends] + [x for x, y in ends])
    p = np.array(probability * 2)
    scores = {"text": np.array(text * 2), "chars": np.array(chars * 2)}
    built = PairTable.build([f"p{i}" for i in range(13)], a, b, np.array(text * 2), scores)
    decide.record(built, p >= 0.5, "pair model", p)
    return built


def test_uncertain_pairs_come_first_spread_across_products_and_signals() -> None:
    built = table(
        probability=[0.51, 0.48, 0.45, 0.99, 0.01, 0.6, 0.3, 0.56],
        text=[0.9, 0.9, 0.9, 0.9, 0.1, 0.9, 0.9, 0.9],
        chars=[0.1, 0.1, 0.1, 0.9, 0.1, 0.9, 0.1, 0.1],
    )
    pairs = review_pairs(built, FIRED_AT, 0.5)
    assert len(pairs.frame) == 8  # each pair once, though the table has both directions
    assert pairs.frame["pattern"].tolist()[:2] == ["text / pair model", "text / no match"]

    def named(rows: list[int]) -> list[tuple[str, str]]:
        frame = pairs.frame
        return [(pairs.ids[frame.at[i, "a"]], pairs.ids[frame.at[i, "b"]]) for i in rows]

    batch = named(next_batch(pairs, set(), size=5))
    # round one: each pattern's most uncertain pair whose products are free: p0-p1 (0.51);
    # "text / no match" skips p0-p2 and p1-p2 (p0, p1 are taken) for p9-p10 (0.3); p7-p8 (0.6);
    # round two: p11-p12 (0.56); then, the uncertain band spent, a confident pair
    assert batch[:4] == [("p0", "p1"), ("p9", "p10"), ("p7", "p8"), ("p11", "p12")]
    assert batch[4] in {("p3", "p4"), ("p5", "p6")}
    products = [pid for pair in batch for pid in pair]
    assert len(products) == len(set(products)), "a product at most once per batch"
    assert uncertain_left(pairs, set()) == 6
    answered = {frozenset(pair) for pair in batch}
    later = named(next_batch(pairs, answered, size=10))
    assert later[0] == ("p0", "p2") and ("p1", "p2") not in later  # p2 is taken by then
    assert not {frozenset(pair) for pair in later} & answered, "an answered pair is not asked"
    assert uncertain_left(pairs, answered) == 2


def test_without_probabilities_the_best_signal_near_its_threshold_is_uncertain() -> None:
    built = table(
        probability=[0.5, 0.5, 0.5, 0.5],
        text=[0.52, 0.95, 0.2, 0.45],
        chars=[0.1, 0.1, 0.1, 0.1],
    )
    decide.record(built, decide.modality_passes(built, {"text": 0.5}), "modality score")
    pairs = review_pairs(built, FIRED_AT, 0.32)
    assert np.allclose(pairs.frame["margin"], [0.02, 0.45, -0.3, -0.05])
    assert pairs.frame["band"].tolist() == [True, False, False, True]
    first = next_batch(pairs, set(), size=4)
    assert pairs.frame.loc[first[0], "margin"] == pytest.approx(0.02)


def test_while_every_answer_is_one_way_a_batch_starts_with_the_surest_other_kind() -> None:
    built = table(
        probability=[0.51, 0.48, 0.45, 0.99, 0.01, 0.6, 0.3, 0.56],
        text=[0.9] * 8,
        chars=[0.1] * 8,
    )
    pairs = review_pairs(built, FIRED_AT, 0.5)
    frame = pairs.frame
    first = next_batch(pairs, set(), size=3, wanted_side=1)  # all answers "different" so far
    assert (frame.at[first[0], "a"], frame.at[first[0], "b"]) == (3, 4)  # p = 0.99
    assert frame.loc[first[1:], "band"].all()
    first = next_batch(pairs, set(), size=3, wanted_side=-1)  # all "same" so far
    assert (frame.at[first[0], "a"], frame.at[first[0], "b"]) == (5, 6)  # p = 0.01
