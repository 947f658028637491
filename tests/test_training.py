"""Fitting the pair model on several sources: pair labels from chains of positives, equal weights,
the operating point chosen on sources left out."""

from __future__ import annotations

import numpy as np

from prodsearch.eval.training import (
    THRESHOLD_GRID,
    Labelled,
    LabelledCollection,
    _pair_labels,
    fit_pair_model,
)
from prodsearch.labels import PairLabel, label_groups
from prodsearch.matching.features import feature_names
from prodsearch.matching.table import PairTable


def test_pair_labels_follow_the_chains_of_positives() -> None:
    ids = ["a", "b", "c", "d", "e"]
    table = PairTable.build(
        ids,
        a=np.array([0, 0, 1, 3, 3]),
        b=np.array([1, 2, 2, 4, 0]),
        fused=np.ones(5),
        scores={},
    )
    labels = [PairLabel("a", "b", True), PairLabel("b", "c", True), PairLabel("d", "e", False)]
    components = np.array(list(label_groups(ids, labels).values()))
    same, weight = _pair_labels(table, labels, components)
    # a-b labelled, a-c and b-c chained through b, d-e labelled different, d-a unknown
    np.testing.assert_array_equal(same, [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(weight, [1, 1, 1, 1, 0])


def grouped_catalog(name: str, n_groups: int, size: int, noise: float, seed: int) -> Labelled:
    """A synthetic catalog: `n_groups` groups of `size` products, every pair within 3 places of
    each other a candidate; the first feature says "same group", blurred by `noise`."""
    rng = np.random.default_rng(seed)
    n = n_groups * size
    ids = [f"{name}{i}" for i in range(n)]
    a = np.repeat(np.arange(n), 3)
    b = (a + np.tile([1, 2, 3], n)) % n
    table = PairTable.build(ids, a=a, b=b, fused=rng.uniform(size=len(a)), scores={})
    group = np.arange(n) // size
    same = (group[a] == group[b]).astype(np.float64)
    features = np.zeros((len(a), len(feature_names())), dtype=np.float32)
    features[:, 0] = same + noise * rng.normal(size=len(a))
    collection = LabelledCollection(
        name, None, [], groups=dict(zip(ids, group.tolist(), strict=True)), queries=set(ids)
    )
    return Labelled(name, table, features, same, np.ones(len(a)), group[a], collection)


def test_the_operating_point_is_chosen_on_held_out_sources() -> None:
    sources = {
        "one": [grouped_catalog("one", 30, 3, 0.2, 0)],
        "two": [grouped_catalog("two", 30, 2, 0.2, 1), grouped_catalog("duo", 40, 2, 0.3, 2)],
        "three": [grouped_catalog("three", 25, 4, 0.2, 3)],
    }
    model, minimum, held_out = fit_pair_model(sources)
    assert minimum in THRESHOLD_GRID and set(held_out) == set(sources)
    # every left-out source decided well above "every product alone" (F1 2 / (1 + size) <= 0.67)
    assert min(held_out.values()) > 0.7, held_out
    for group in sources.values():
        for catalog in group:
            probability = model.probabilities(catalog.table, catalog.features)
            alone = catalog.f1(np.zeros(len(probability), dtype=bool))
            assert catalog.f1(probability >= minimum) > alone + 0.1
