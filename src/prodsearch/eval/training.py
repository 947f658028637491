"""Fitting the pair model on several labelled sources, so that it decides catalogs it never saw.

A source is one labelled catalog family (Shopee; each product_pairs set; Grocery Store photos,
the one with images: its catalogue image of each product beside untitled shop photos, and one
photo per product). Its fit catalogs come
in several structures, so the model meets several "offers per product" regimes (README, Transfer):
- Shopee: `val` with `train` groups as distractors (groups of 2-50 listings), and `val` cut to
  at most 2 listings per group (one listing per product and source, like a two-shop catalog);
- a product_pairs set: every record of its `train.txt` (pair labels: labelled pairs keep their
  label, pairs inside one chain of positive labels are the same product, the other candidate
  pairs are not fitted on), and the records of its positive pairs alone (every candidate pair
  labelled by the chains: a mostly-pairs catalog);
- Shopee's two listings per group again, one listing in three cut to its title and one in
  three to its photo: duplicates that do not share every modality (a title-only query beside a
  listing with a photo);
- and for each: one listing per product (Shopee `val`'s groups; a set's chains of positives), a
  catalog without a duplicate, where every candidate pair is a different product: a product's
  nearest neighbour is then not its duplicate, however mutual, so the model learns what the
  relative signals mean only beside absolute evidence (a new catalog's first batch looks so).
Each catalog is ingested into its own collection, its candidate-pair table collected with the
default search and cut to each product's `MODEL_CANDIDATES` best, its features computed with
its own statistics. Each catalog weighs the same in the fit, whatever its size; folds are
group-disjoint across catalogs.

The operating point (minimum probability) is chosen the way it will be used, on catalogs the
model did not see: leaving each source out in turn, a model fitted on the others decides it,
and the threshold with the best mean F1 over the held-out sources is kept.
"""

from __future__ import annotations

import hashlib
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
from prodsearch.matching.candidates import collect_candidates
from prodsearch.matching.dedup import default_search
from prodsearch.matching.features import table_features
from prodsearch.matching.pair_model import MODEL_CANDIDATES, PairModel, TrainingSet
from prodsearch.matching.table import PairTable

#: minimum probabilities the operating point is chosen from
THRESHOLD_GRID = np.round(np.arange(0.05, 0.91, 0.05), 3)
#: the product_pairs sets (../shared/data/product_pairs)
PAIR_SOURCES = ("wdc_computers", "wdc_cameras", "amazon_google")
SOURCES = ("shopee", *PAIR_SOURCES, "grocery")


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


@dataclass
class Labelled:
    """One catalog's candidate table (each product's best candidates), features and labels."""

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
            groups = dict(collection.groups or {})
            return LabelledTable.from_groups(self.table, groups, collection.scored()).f1(matched)
        ids, table = self.table.ids, self.table
        a, b = table.a[matched].tolist(), table.b[matched].tolist()
        predicted = {frozenset((ids[i], ids[j])) for i, j in zip(a, b, strict=True)}
        labels = [(x.id_a, x.id_b, x.same) for x in collection.labels]
        return pair_scores(predicted, labels).f1


def label_collection(collection: LabelledCollection) -> Labelled:
    """Collect the collection's candidates with the default search, keep each product's best
    `MODEL_CANDIDATES`, compute their features and label them (module docstring)."""
    table = collect_candidates(
        collection.index, collection.products, default_search(collection.index)
    )
    table, _ = table.top(MODEL_CANDIDATES)
    features = table_features(table, collection.products)
    ids = table.ids
    scored = np.array([pid in collection.scored() for pid in ids])[table.a]
    if collection.labels is None:
        group = np.array([collection.groups[pid] for pid in ids])  # type: ignore[index]
        codes = np.unique(group, return_inverse=True)[1]
        same = (group[table.a] == group[table.b]).astype(np.float64)
        weight = scored.astype(np.float64)
        return Labelled(collection.name, table, features, same, weight, codes[table.a], collection)
    components = np.array(list(label_groups(ids, collection.labels).values()))
    same, weight = _pair_labels(table, collection.labels, components)
    return Labelled(
        collection.name, table, features, same, weight * scored, components[table.a], collection
    )


def _pair_labels(
    table: PairTable, labels: Sequence[PairLabel], components: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each pair's label and weight: labelled pairs as labelled, pairs inside one chain of
    positives the same product (weight 1); the others unknown (weight 0, not fitted on)."""
    a, b = table.a, table.b
    sizes = np.bincount(components)
    chained = (components[a] == components[b]) & (sizes[components[a]] > 1)
    same, weight = chained.astype(np.float64), chained.astype(np.float64)
    position = {pid: i for i, pid in enumerate(table.ids)}
    answer = {frozenset((position[x.id_a], position[x.id_b])): x.same for x in labels}
    for row, (i, j) in enumerate(zip(a.tolist(), b.tolist(), strict=True)):
        given = answer.get(frozenset((i, j)))
        if given is not None:
            same[row], weight[row] = float(given), 1.0
    return same, weight


def fit_model(catalogs: Sequence[Labelled], cache: Path | None = None) -> PairModel:
    """The pair model fitted on every catalog, each weighing the same; with `cache`, a model
    fitted on the same catalogs before (a file named after them there) is read instead."""
    names = "+".join(sorted(c.name for c in catalogs))
    path = cache / f"{hashlib.sha1(names.encode()).hexdigest()[:16]}.json" if cache else None
    if path is not None and path.is_file():
        return PairModel.load(path)
    sets, offset = [], 0
    for catalog in catalogs:
        sets.append(catalog.training_set(offset))
        offset += int(catalog.groups.max()) + 1 if len(catalog.groups) else 0
    model = PairModel.fit(sets)[0]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(path)
    return model


def held_out_f1(model: PairModel, catalogs: Sequence[Labelled]) -> np.ndarray:
    """The mean F1 over `catalogs` (which the model did not see) at each THRESHOLD_GRID value."""
    curves = []
    for catalog in catalogs:
        probability = model.probabilities(catalog.table, catalog.features)
        curves.append([catalog.f1(probability >= t) for t in THRESHOLD_GRID])
    return np.mean(curves, axis=0)


def fit_pair_model(
    sources: Mapping[str, Sequence[Labelled]],
    console: Console | None = None,
    cache: Path | None = None,
) -> tuple[PairModel, float, dict[str, float]]:
    """The pair model fitted on every source's catalogs, and its operating point: leaving each
    source out in turn, the threshold with the best mean F1 over the held-out sources. Returns
    the model, the minimum probability and each held-out source's F1 there. `cache`: where
    fitted models are kept and reused (`fit_model`)."""
    console = console or Console(stderr=True, quiet=True)
    curves = {}
    for held in sources:
        console.print(f"operating point: {held} held out")
        rest = [c for name, group in sources.items() if name != held for c in group]
        curves[held] = held_out_f1(fit_model(rest, cache), sources[held])
    best = int(np.argmax(np.mean(list(curves.values()), axis=0)))
    console.print("fitting on every source")
    model = fit_model([c for group in sources.values() for c in group], cache)
    return model, float(THRESHOLD_GRID[best]), {s: float(c[best]) for s, c in curves.items()}


def decided(catalog: Labelled, model: PairModel, min_probability: float) -> np.ndarray:
    """The pairs the model decides match in a catalog it was not fitted on (no min-2)."""
    probability = model.probabilities(catalog.table, catalog.features)
    return probability >= min_probability


# -- the shared data's catalogs -----------------------------------------------------------------
def ingest_labelled(
    index: Index, rows: Sequence[CatalogRow], console: Console | None = None
) -> list[Product]:
    """Ingest a labelled catalog's rows into `index` (its own collection; a re-run skips what
    is stored); return its products with their vectors, in the rows' order."""
    catalog = Catalog(path=None, rows=list(rows), rows_read=len(rows))
    ingest_catalog(index, catalog, console=console or Console(stderr=True, quiet=True))
    ids = [r.product_id for r in rows]
    stored = {p.product_id: p for p in index.products(ids, with_vectors=True)}
    return [stored[pid] for pid in ids if pid in stored]


def open_source(
    data: Path, name: str, part: str, store: Index, console: Console | None = None
) -> list[LabelledCollection]:
    """A source's catalogs of the shared data, each in its own collection of `store`'s store.

    `part` "fit": what learned parts are fitted on (module docstring); "eval": what is only
    scored (Shopee `test`, a set's `valid.txt`)."""
    console = console or Console(stderr=True, quiet=True)
    if name == "shopee":
        return _shopee(data, part, store, console)
    if name == "grocery":
        return _grocery(data, part, store, console)
    folder = data / "product_pairs" / name
    rows, labels = read_pair_file(folder / f"{'train' if part == 'fit' else 'valid'}.txt")
    out = [_pair_collection(store, f"{name}-{part}", rows, labels, console)]
    if part == "fit":
        positive = {x for label in labels if label.same for x in (label.id_a, label.id_b)}
        chained = [r for r in rows if r.product_id in positive]
        kept = [x for x in labels if x.id_a in positive and x.id_b in positive]
        out.append(_pair_collection(store, f"{name}-fit-pairs", chained, kept, console))
        chains = label_groups([r.product_id for r in chained], kept)
        singles = _first_of_each(chained, chains)
        out.append(_grouped_collection(store, f"{name}-fit-singles", singles, chains, console))
    return out


def _first_of_each(rows: Sequence[CatalogRow], groups: Mapping[str, object]) -> list[CatalogRow]:
    """The first of `rows` of each group: a catalog without duplicates (module docstring)."""
    first: dict[object, CatalogRow] = {}
    for row in rows:
        first.setdefault(groups[row.product_id], row)
    return list(first.values())


def _pair_collection(
    store: Index, name: str, rows: list[CatalogRow], labels: list[PairLabel], console: Console
) -> LabelledCollection:
    index = Index(store.store, name, store.settings, store.encoders)
    return LabelledCollection(name, index, ingest_labelled(index, rows, console), labels=labels)


def _shopee(data: Path, part: str, store: Index, console: Console) -> list[LabelledCollection]:
    from prodsearch.catalog import read_catalog
    from prodsearch.eval.shopee import prepare_split, read_splits
    from prodsearch.recipes import load_recipe

    catalog = read_catalog(data / "shopee" / "train.csv", load_recipe("shopee"))
    splits = read_splits(data / "shopee" / "split.csv")
    if part != "fit":
        test = prepare_split(store, catalog, splits, "test", "label_group", console)
        return [_split_collection("shopee-eval", test)]
    size = sum(1 for s in splits.values() if s == "test")
    val = prepare_split(store, catalog, splits, "val", "label_group", console, size)
    pairs: dict[str, int] = {}
    two = []
    for row in (r for r in catalog.rows if splits.get(r.product_id) == "val"):
        group = str(row.payload["label_group"])
        if pairs.get(group, 0) < 2:
            pairs[group] = pairs.get(group, 0) + 1
            two.append(row)
    groups = {r.product_id: r.payload["label_group"] for r in two}
    return [
        _split_collection("shopee-fit", val),
        _grouped_collection(store, "shopee-fit-pairs", two, groups, console),
        _grouped_collection(
            store, "shopee-fit-singles", _first_of_each(two, groups), groups, console
        ),
        _grouped_collection(store, "shopee-fit-mixed", _cut_modalities(two), groups, console),
    ]


def _cut_modalities(rows: Sequence[CatalogRow]) -> list[CatalogRow]:
    """`rows` with one listing in three cut to its title (no photo) and one in three to its
    photo (no title), chosen by a hash of the id: a catalog whose duplicates do not share every
    modality (a title-only query beside listings with photos; photo-only shop listings)."""
    out = []
    for row in rows:
        kind = hashlib.sha1(row.product_id.encode()).digest()[0] % 3
        if kind == 1:
            row = row.model_copy(update={"image_path": None, "image_bytes": None, "phash": None})
        elif kind == 2:
            row = row.model_copy(update={"title": None})
        out.append(row)
    return out


def _grouped_collection(
    store: Index,
    name: str,
    rows: Sequence[CatalogRow],
    groups: Mapping[str, object],
    console: Console,
) -> LabelledCollection:
    """`rows` ingested into a collection of `store`'s store, labelled by their `groups`."""
    index = Index(store.store, name, store.settings, store.encoders)
    products = ingest_labelled(index, rows, console)
    return LabelledCollection(
        name, index, products, groups={r.product_id: groups[r.product_id] for r in rows}
    )


def _grocery(data: Path, part: str, store: Index, console: Console) -> list[LabelledCollection]:
    """Grocery Store photos as a catalog: the catalogue image of each of its 81 products (titled
    with the product's name) beside the shop photos of a split, untitled (fit: `val`, whose
    photos the image encoder was not trained on; eval: `test`); grouped by product."""
    import pandas as pd

    folder = data / "grocery_store"
    frame = pd.read_csv(folder / "images.csv")
    split = "val" if part == "fit" else "test"
    frame = frame[frame["split"].isin([split, "iconic"])]
    rows = [
        CatalogRow(
            row=number,
            product_id=f"grocery-{record.id}",
            title=record.class_name.replace("-", " ") if record.split == "iconic" else None,
            image_path=folder / record.image,
            payload={"label_group": int(record.label_group)},
        )
        for number, record in enumerate(frame.itertuples(), start=1)
    ]
    groups = {r.product_id: r.payload["label_group"] for r in rows}
    name = f"grocery-{part}"
    index = Index(store.store, name, store.settings, store.encoders)
    collection = LabelledCollection(name, index, ingest_labelled(index, rows, console), groups)
    if part != "fit":
        return [collection]
    singles = _first_of_each(rows, groups)
    return [collection, _grouped_collection(store, "grocery-fit-singles", singles, groups, console)]


def _split_collection(name: str, split: object) -> LabelledCollection:
    return LabelledCollection(
        name,
        split.index,  # type: ignore[attr-defined]
        split.products,  # type: ignore[attr-defined]
        groups=split.groups,  # type: ignore[attr-defined]
        queries=set(split.ids),  # type: ignore[attr-defined]
    )
