"""The group-labelled evaluation (`prodsearch eval CATALOG --split-file F`): tune on `val`,
report precision/recall/F1 on `test`.

The metric is the Shopee one: for every product, its predicted match set (itself included) is
compared with its label group within the same split's catalog; precision, recall and F1 are
averaged over rows. Each split is ingested as its own collection and its candidate-pair table is
collected once; every knob is tuned on val's table (`tuning.py`), then every figure, on val and
on test, comes from real engine runs: fused queries for the `match` methods, `run_dedup` for the
whole-catalog ones (`postprocess.py`).

Catalog size. A threshold's best value depends on how many look-alikes a catalog holds: tuned on
a catalog half the size, the formula's threshold came out 0.07 lower and cost 0.005 F1 on the
larger one (Shopee val halves). So the val queries search a catalog of the size the results are
reported at: val plus whole groups of `train` rows as distractors (they are never queries and
match no val row), up to `val_catalog_size` products (default: the test catalog's size).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from sklearn.feature_extraction.text import TfidfVectorizer

from prodsearch.catalog import Catalog, CatalogRow, read_catalog
from prodsearch.encoders import EncoderSet
from prodsearch.errors import CatalogError
from prodsearch.eval.metrics import Scores, row_scores
from prodsearch.eval.postprocess import dedup_rows
from prodsearch.eval.report import EvalResult, MethodResult
from prodsearch.eval.tuning import LabelledTable, tune_formula, tune_single, tune_union
from prodsearch.index import Index, Product
from prodsearch.ingest import ingest_catalog
from prodsearch.matching import decide
from prodsearch.matching.candidates import collect_candidates
from prodsearch.matching.dedup import default_search
from prodsearch.query import MatchOptions
from prodsearch.recipes import load_recipe
from prodsearch.settings import SearchSettings, Settings


@dataclass
class SplitData:
    """The catalog one split's queries search, in its own collection: the split's products
    first (the queries), then any distractors; their groups and the labelled candidate table."""

    name: str
    index: Index
    catalog_ids: list[str]
    catalog_labels: np.ndarray
    catalog_titles: list[str]
    #: the first `n_queries` products of the catalog are the split's own
    n_queries: int
    products: list[Product] = field(default_factory=list)
    labelled: LabelledTable | None = None

    @property
    def ids(self) -> list[str]:
        """The split's own products: the queries."""
        return self.catalog_ids[: self.n_queries]

    @property
    def groups(self) -> dict[str, Any]:
        """Every catalog product's group."""
        return dict(zip(self.catalog_ids, self.catalog_labels.tolist(), strict=True))

    @property
    def truth(self) -> list[set[str]]:
        """Each query's true match set (its group in this catalog)."""
        members: dict[Any, set[str]] = {}
        for pid, label in zip(self.catalog_ids, self.catalog_labels, strict=True):
            members.setdefault(label, set()).add(pid)
        return [members[label] for label in self.catalog_labels[: self.n_queries]]

    def label(self, search: SearchSettings) -> LabelledTable:
        """The candidate table of the whole catalog under `search`, labelled by groups."""
        table = collect_candidates(self.index, self.products, search)
        return LabelledTable.from_groups(table, self.groups, set(self.ids))

    def scores(self, sets: dict[str, list[str]] | dict[str, set[str]]) -> Scores:
        """Row scores of match sets (product id -> its set, itself included) on the queries."""
        return row_scores([set(sets[pid]) | {pid} for pid in self.ids], self.truth)


def run_evaluation(
    catalog_path: Path,
    split_file: Path,
    *,
    recipe: str = "shopee",
    label_column: str = "label_group",
    store: str | None = None,
    settings: Settings | None = None,
    encoders: EncoderSet | None = None,
    console: Console | None = None,
    val_catalog_size: int | None = None,
) -> EvalResult:
    """Ingest val and test as their own collections, tune on val, report on test.

    `val_catalog_size`: the val queries search a catalog of this many products, val plus whole
    `train` groups as distractors (default: the test catalog's size; 0: val alone).
    """
    started = time.perf_counter()
    console = console or Console(stderr=True)
    settings = settings or Settings()
    catalog = read_catalog(catalog_path, load_recipe(recipe))
    splits = read_splits(split_file)
    workdir = None if store else tempfile.TemporaryDirectory(prefix="prodsearch-eval-")
    location = store or workdir.name  # type: ignore[union-attr]
    encoders = encoders or EncoderSet.from_settings(settings.encoders, settings.text_max_tokens)
    base = Index(location, "eval-val", settings, encoders)
    try:
        test = prepare_split(base, catalog, splits, "test", label_column, console)
        target = test.n_queries if val_catalog_size is None else val_catalog_size
        val = prepare_split(base, catalog, splits, "val", label_column, console, target)
        data = {"val": val, "test": test}
        for split in data.values():
            console.print(f"collecting candidates on {split.name} ({len(split.products):,})")
            split.labelled = split.label(default_search(split.index))
        methods, tuned, pair_model = _tune_and_report(data, settings, console)
    finally:
        base.close()
        if workdir is not None:
            workdir.cleanup()
    return EvalResult(
        methods=methods,
        tuned=tuned,
        pair_model=pair_model,
        sizes={
            **{name: split.n_queries for name, split in data.items()},
            "val catalog": len(data["val"].catalog_ids),
        },
        seconds=time.perf_counter() - started,
    )


def read_splits(split_file: Path) -> dict[str, str]:
    """The split file as product id -> split name. Raises CatalogError when unreadable."""
    try:
        frame = pd.read_csv(split_file, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CatalogError(f"cannot read split file {split_file}: {exc}") from exc
    if "split" not in frame.columns:
        raise CatalogError(f"{split_file}: needs columns <id>,split; found {list(frame.columns)}")
    id_column = next(c for c in frame.columns if c != "split")
    return dict(zip(frame[id_column], frame["split"], strict=True))


def prepare_split(
    base: Index,
    catalog: Catalog,
    splits: dict[str, str],
    name: str,
    label_column: str,
    console: Console,
    catalog_size: int = 0,
) -> SplitData:
    """Ingest split `name` into its own collection, topped up to `catalog_size` products with
    whole groups of `train` rows as distractors (shuffled with a fixed seed)."""
    rows = [r for r in catalog.rows if splits.get(r.product_id) == name]
    if not rows:
        raise CatalogError(f"no catalog row is in split {name!r}")
    missing = [r.row for r in rows if label_column not in r.payload]
    if missing:
        raise CatalogError(f"rows {missing[:5]} have no {label_column!r} label")
    distractors = _distractors(catalog, splits, label_column, catalog_size - len(rows))
    index = Index(base.store, f"eval-{name}", base.settings, base.encoders)
    everything = rows + distractors
    extra = f" + {len(distractors):,} train rows as distractors" if distractors else ""
    console.print(f"ingesting {name}: {len(rows):,} products{extra}")
    if len(everything) < 0.99 * catalog_size:
        console.print(
            f"[yellow]the {name} catalog holds {len(everything):,} products, "
            f"fewer than the {catalog_size:,} asked: the split file has too few train rows; "
            "thresholds tuned on a smaller catalog come out lower than a larger one needs"
        )
    part = Catalog(path=catalog.path, rows=everything, rows_read=len(everything))
    ingest_catalog(index, part, console=console)
    ids = [r.product_id for r in everything]
    stored = {p.product_id: p for p in index.products(ids, with_vectors=True)}
    return SplitData(
        name=name,
        index=index,
        catalog_ids=ids,
        catalog_labels=np.array([r.payload[label_column] for r in everything]),
        catalog_titles=[r.title or "" for r in everything],
        n_queries=len(rows),
        products=[stored[pid] for pid in ids],
    )


def _distractors(
    catalog: Catalog, splits: dict[str, str], label_column: str, wanted: int
) -> list[CatalogRow]:
    """Up to `wanted` labelled `train` rows, whole groups at a time, in a seeded random order."""
    if wanted <= 0:
        return []
    groups: dict[str, list[CatalogRow]] = {}
    for r in catalog.rows:
        if splits.get(r.product_id) == "train" and label_column in r.payload:
            groups.setdefault(str(r.payload[label_column]), []).append(r)
    chosen: list[CatalogRow] = []
    for key in np.random.default_rng(0).permutation(sorted(groups)):
        if len(chosen) + len(groups[key]) > wanted:
            continue
        chosen += groups[key]
    return chosen


def _engine_scores(split: SplitData, options: MatchOptions) -> Scores:
    """Row scores of real fused queries: every query product matched with its stored vectors."""
    predicted: dict[str, set[str]] = {}
    for start in range(0, split.n_queries, 256):
        chunk = split.ids[start : start + 256]
        for pid, matches in zip(chunk, split.index.match_products(chunk, options), strict=True):
            predicted[pid] = {m.product_id for m in matches}
    return split.scores(predicted)


def _tfidf_scores(split: SplitData, threshold: float) -> Scores:
    vectors = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5)).fit_transform(
        split.catalog_titles
    )
    similarity = (vectors[: split.n_queries] @ vectors.T).tocsr()
    predicted = {}
    for q, pid in enumerate(split.ids):
        row = similarity.getrow(q)
        predicted[pid] = {split.catalog_ids[c] for c in row.indices[row.data >= threshold]}
    return split.scores(predicted)


def _tune_and_report(
    data: dict[str, SplitData], settings: Settings, console: Console
) -> tuple[list[MethodResult], dict[str, Any], Any]:
    """The baseline, each modality alone, RRF and the formula (tuned on val's table, scored by
    engine queries), then the whole-catalog rows; returns the rows, the tuned settings (a
    settings-file document) and the pair model fitted on val."""
    val, test = data["val"], data["test"]
    labelled = val.labelled
    assert labelled is not None
    modalities = labelled.table.modalities()
    limit = settings.prefetch_limit
    results: list[MethodResult] = []

    def report(method: str, config: dict, selected: np.ndarray, options: MatchOptions) -> None:
        console.print(f"scoring {method} on val and test in the engine")
        scores = [_engine_scores(split, options) for split in (val, test)]
        results.append(MethodResult(method, config, *scores, round(labelled.f1(selected), 4)))

    grid = np.round(np.arange(0.2, 0.9, 0.01), 3)
    tfidf = float(max(grid, key=lambda t: _tfidf_scores(val, t).f1))
    baseline = [_tfidf_scores(split, tfidf) for split in (val, test)]
    results.append(
        MethodResult("baseline: TF-IDF char 3-5 (sklearn)", {"threshold": tfidf}, *baseline)
    )
    singles = {m: tune_single(labelled, m) for m in modalities}
    for m, t in singles.items():
        passes = decide.modality_passes(labelled.table, {m: t})
        options = MatchOptions(k=limit, thresholds={m: t}, fusion="rrf", modalities=[m])
        report(f"{m} alone", {"threshold": t}, passes, options)
    union = tune_union(labelled, modalities, singles)
    passes = decide.modality_passes(labelled.table, union)
    options = MatchOptions(k=limit, thresholds=union, fusion="rrf")
    report(
        "fused: RRF (union of thresholded prefetches)",
        {**union, "rrf_k": settings.rrf_k},
        passes,
        options,
    )
    floors = settings.formula.floors
    weights, minimum = tune_formula(labelled, modalities, floors)
    formula = settings.formula.model_copy(
        update={
            "weights": settings.formula.weights.model_copy(update=weights),
            "min_fused_score": minimum,
        }
    )
    passes = decide.formula_scores(labelled.table, weights, floors) >= minimum
    options = MatchOptions(k=limit, fusion="formula", formula=formula)
    report(
        "fused: formula (weighted sum of scores)",
        {"weights": weights, "min_fused_score": minimum},
        passes,
        options,
    )
    rrf_result, formula_result = results[-2], results[-1]
    best = SearchSettings(
        fusion="formula" if formula_result.val.f1 > rrf_result.val.f1 else "rrf",
        thresholds=settings.thresholds.model_copy(update=union),
        formula=formula,
    )
    post_results, dedup_tuned, pair_model = dedup_rows(data, best, settings.dedup, console)
    tuned = {**best.model_dump(mode="json"), "dedup": dedup_tuned}
    return results + post_results, tuned, pair_model
