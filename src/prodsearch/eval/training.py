"""Fitting the pair model on several labelled catalogs, so that it decides catalogs it never saw.

A labelled catalog is ingested into its own collection, its candidate-pair table collected with
the default search, its features computed and its pairs labelled:
- by **groups** (Shopee's `label_group`): a pair is the same product when both share a group;
  only the pairs of the catalog's own products (not distractors) are fitted on;
- by **pair labels** (the product_pairs sets): labelled pairs keep their label; pairs inside
  one chain of positive labels (connected components) are the same product; the other,
  unlabelled candidate pairs count as different products with a lower weight
  (`UNLABELLED_WEIGHT`), since most are, but not every one.
Each catalog weighs the same in the fit, whatever its size. Folds are group-disjoint across
catalogs (a chain of positives, or a label group, never straddles two folds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console

from prodsearch.catalog import Catalog, CatalogRow
from prodsearch.eval.metrics import pair_scores
from prodsearch.eval.tuning import LabelledTable
from prodsearch.index import Index, Product
from prodsearch.ingest import ingest_catalog
from prodsearch.labels import PairLabel, label_groups, read_pair_file
from prodsearch.matching import decide
from prodsearch.matching.candidates import collect_candidates
from prodsearch.matching.dedup import default_search
from prodsearch.matching.features import table_features
from prodsearch.matching.pair_model import PairModel, TrainingSet
from prodsearch.matching.table import PairTable

#: the weight of an unlabelled candidate pair of a pair-labelled catalog (fitted as different)
UNLABELLED_WEIGHT = 0.3
#: minimum probabilities the decision threshold is chosen from
THRESHOLD_GRID = np.round(np.arange(0.1, 0.91, 0.02), 3)


@dataclass
class LabelledCollection:
    """A labelled catalog ingested into its own collection."""

    name: str
    index: Index
    products: list[Product]
    #: group labels: product id -> group (None for a pair-labelled catalog)
    groups: Mapping[str, object] | None = None
    #: pair labels (None for a group-labelled catalog)
    labels: list[PairLabel] | None = None
    #: the products whose pairs are fitted on and scored (default: every product)
    queries: set[str] = field(default_factory=set)

    def scored(self) -> set[str]:
        """The products whose pairs count."""
        return self.queries or {p.product_id for p in self.products}


def ingest_labelled(
    index: Index, name: str, rows: Sequence[CatalogRow], console: Console | None = None
) -> list[Product]:
    """Ingest a labelled catalog's rows into `index` (a fresh collection); return its products
    with their vectors, in the rows' order."""
    catalog = Catalog(path=None, rows=list(rows), rows_read=len(rows))
    ingest_catalog(index, catalog, console=console or Console(stderr=True, quiet=True))
    ids = [r.product_id for r in rows]
    stored = {p.product_id: p for p in index.products(ids, with_vectors=True)}
    return [stored[pid] for pid in ids if pid in stored]


@dataclass
class Labelled:
    """One catalog's candidate table, features and labels, ready to fit on and to score."""

    name: str
    table: PairTable
    features: np.ndarray
    same: np.ndarray
    weight: np.ndarray
    groups: np.ndarray
    collection: LabelledCollection

    def training_set(self, group_offset: int = 0) -> TrainingSet:
        """This catalog as a training set, its weights summing to 1, its fold groups offset
        so they never collide with another catalog's."""
        total = self.weight.sum()
        weight = self.weight / total if total else self.weight
        return TrainingSet(self.table, self.features, self.same, self.groups + group_offset, weight)

    def f1(self, matched: np.ndarray) -> float:
        """The catalog's F1 of a decision: row F1 against its groups, or pair F1 over its labels
        (a pair predicted same when either direction is matched)."""
        collection = self.collection
        if collection.labels is None:
            labelled = LabelledTable.from_groups(
                self.table, dict(collection.groups or {}), collection.scored()
            )
            return labelled.f1(matched)
        ids = self.table.ids
        predicted = {
            frozenset((ids[a], ids[b]))
            for a, b in zip(
                self.table.a[matched].tolist(), self.table.b[matched].tolist(), strict=True
            )
        }
        labels = [(x.id_a, x.id_b, x.same) for x in collection.labels]
        return pair_scores(predicted, labels).f1


def label_collection(collection: LabelledCollection) -> Labelled:
    """Collect the collection's candidates with the default search, compute their features and
    label them (see the module docstring)."""
    table = collect_candidates(
        collection.index, collection.products, default_search(collection.index)
    )
    features = table_features(table, collection.products)
    ids = table.ids
    scored = np.array([pid in collection.scored() for pid in ids])[table.a]
    if collection.labels is None:
        group = np.array([collection.groups[pid] for pid in ids])  # type: ignore[index]
        codes = np.unique(group, return_inverse=True)[1]
        same = (group[table.a] == group[table.b]).astype(np.float64)
        return Labelled(
            collection.name,
            table,
            features,
            same,
            scored.astype(np.float64),
            codes[table.a],
            collection,
        )
    components = np.array(list(label_groups(ids, collection.labels).values()))
    same, weight = _pair_labels(table, collection.labels, components)
    return Labelled(
        collection.name, table, features, same, weight * scored, components[table.a], collection
    )


def _pair_labels(
    table: PairTable, labels: Sequence[PairLabel], components: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each pair's label and weight: labelled pairs as labelled (weight 1), pairs in one chain of
    positives same (weight 1), the rest different (UNLABELLED_WEIGHT)."""
    a, b = table.a, table.b
    sizes = np.bincount(components)
    chained = (components[a] == components[b]) & (sizes[components[a]] > 1)
    same = chained.astype(np.float64)
    weight = np.where(chained, 1.0, UNLABELLED_WEIGHT)
    position = {pid: i for i, pid in enumerate(table.ids)}
    answer = {frozenset((position[x.id_a], position[x.id_b])): x.same for x in labels}
    for row, (i, j) in enumerate(zip(a.tolist(), b.tolist(), strict=True)):
        given = answer.get(frozenset((i, j)))
        if given is not None:
            same[row], weight[row] = float(given), 1.0
    return same, weight


def fit_pair_model(
    catalogs: Sequence[Labelled], stages: int | None = None
) -> tuple[PairModel, float, dict[str, float]]:
    """Fit the pair model on every catalog (each weighing the same) and choose its minimum
    probability: the one with the best mean F1 over the catalogs, on out-of-fold
    probabilities. Returns the model, the minimum and each catalog's out-of-fold F1 there."""
    sets, offset = [], 0
    for catalog in catalogs:
        sets.append(catalog.training_set(offset))
        offset += int(catalog.groups.max()) + 1 if len(catalog.groups) else 0
    model, probabilities = (
        PairModel.fit(sets) if stages is None else PairModel.fit(sets, stages=stages)
    )
    scores = {
        t: [c.f1(p >= t) for c, p in zip(catalogs, probabilities, strict=True)]
        for t in THRESHOLD_GRID
    }
    best = float(max(THRESHOLD_GRID, key=lambda t: float(np.mean(scores[t]))))
    return model, best, {c.name: f for c, f in zip(catalogs, scores[best], strict=True)}


def decided(catalog: Labelled, model: PairModel, min_probability: float) -> np.ndarray:
    """The pairs the model decides match in a catalog it was not fitted on (no min-2)."""
    probability = model.probabilities(catalog.table, catalog.features)
    decide.record(catalog.table, probability >= min_probability, "pair model", probability)
    return catalog.table.matched()


#: the product_pairs catalogs (../shared/data/product_pairs)
PAIR_CATALOGS = ("wdc_computers", "wdc_cameras", "amazon_google")
CATALOGS = ("shopee", *PAIR_CATALOGS)


def open_catalog(
    data: Path,
    name: str,
    part: str,
    store: Index,
    console: Console | None = None,
) -> LabelledCollection:
    """A labelled catalog of the shared data in its own collection of `store`'s store (reused
    when a previous run ingested it: ingest skips unchanged products).

    `part` "fit" is what learned parts are fitted on: Shopee `val` (with `train` groups as
    distractors, up to the test catalog's size), a product_pairs set's `train.txt`; "eval" is
    what is only scored: Shopee `test`, a set's `valid.txt`.
    """
    console = console or Console(stderr=True, quiet=True)
    collection = f"{name}-{part}"
    index = Index(store.store, collection, store.settings, store.encoders)
    if name == "shopee":
        from prodsearch.catalog import read_catalog
        from prodsearch.eval.shopee import prepare_split, read_splits
        from prodsearch.recipes import load_recipe

        catalog = read_catalog(data / "shopee" / "train.csv", load_recipe("shopee"))
        splits = read_splits(data / "shopee" / "split.csv")
        size = sum(1 for s in splits.values() if s == "test")
        split = "val" if part == "fit" else "test"
        prepared = prepare_split(
            index, catalog, splits, split, "label_group", console, size if part == "fit" else 0
        )
        return LabelledCollection(
            collection,
            prepared.index,
            prepared.products,
            groups=prepared.groups,
            queries=set(prepared.ids),
        )
    rows, labels = read_pair_file(
        data / "product_pairs" / name / f"{'train' if part == 'fit' else 'valid'}.txt"
    )
    products = ingest_labelled(index, collection, rows, console)
    return LabelledCollection(collection, index, products, labels=labels)
