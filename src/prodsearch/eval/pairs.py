"""The pair-labelled evaluation (`prodsearch eval --pairs FILE` or `CATALOG --labels FILE`): run
the `dedup` a user runs on a labelled catalog and score its labelled pairs.

A labelled pair counts as predicted "same" when either product is in the other's match set.
Reported: pair precision / recall / F1 over the labelled pairs, the mean row F1 against the
groups the positive labels chain into (unlabelled pairs counted as different), and, in the same
run, the char TF-IDF baseline: a pair is "same" when the cosine of its two titles' char 3-5-gram
TF-IDF vectors reaches a threshold tuned on the set's own train labels.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from sklearn.feature_extraction.text import TfidfVectorizer

from prodsearch.catalog import Catalog, CatalogRow, read_catalog
from prodsearch.encoders import EncoderSet
from prodsearch.errors import ConfigError
from prodsearch.eval.metrics import Scores, pair_scores, row_scores
from prodsearch.index import Index
from prodsearch.ingest import ingest_catalog
from prodsearch.labels import PairLabel, label_groups, read_labels, read_pair_file
from prodsearch.matching.dedup import run_dedup
from prodsearch.recipes import load_recipe
from prodsearch.settings import Settings

#: TF-IDF cosine thresholds the baseline is tuned over
TFIDF_GRID = np.round(np.arange(0.05, 0.99, 0.01), 3)


@dataclass(frozen=True)
class LabelledCatalog:
    """A catalog and labelled pairs of its products."""

    name: str
    rows: list[CatalogRow]
    labels: list[PairLabel]


@dataclass
class PairEvalResult:
    """The pair-labelled evaluation of one catalog."""

    catalog: str
    products: int
    labelled_pairs: int
    positive_pairs: int
    decided_by: str
    dedup: Scores
    dedup_row_f1: float
    no_match_row_f1: float
    baseline: Scores | None
    baseline_threshold: float | None
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form."""
        out = dict(vars(self))
        out["dedup"] = self.dedup.as_dict()
        out["baseline"] = self.baseline.as_dict() if self.baseline else None
        out["seconds"] = round(self.seconds, 1)
        return out


def load_labelled(
    pairs: Path | None, catalog: Path | None, labels: Path | None, recipe: str
) -> LabelledCatalog:
    """A labelled catalog from a product_pairs file (`pairs`), or from a catalog CSV read with
    `recipe` and a `labels.csv` of its products. Raises ConfigError for another combination,
    CatalogError for a bad file."""
    if pairs is not None and catalog is None and labels is None:
        rows, pair_labels = read_pair_file(pairs)
        return LabelledCatalog(f"{pairs.parent.name}/{pairs.stem}", rows, pair_labels)
    if pairs is None and catalog is not None and labels is not None:
        read = read_catalog(catalog, load_recipe(recipe))
        known = {r.product_id for r in read.rows}
        return LabelledCatalog(catalog.stem, read.rows, read_labels(labels, known))
    raise ConfigError(
        "pair labels come as --pairs FILE (records and labels in one file), or as a CATALOG "
        "with --labels labels.csv (id_a,id_b,same)"
    )


def predicted_pairs(match_sets: dict[str, list[str]]) -> set[frozenset[str]]:
    """Every unordered pair one product's match set puts together."""
    return {frozenset((pid, other)) for pid, members in match_sets.items() for other in members[1:]}


def group_row_f1(match_sets: dict[str, list[str]], groups: dict[str, int]) -> float:
    """Mean row F1 of match sets (each product in its own) against groups."""
    members: dict[int, set[str]] = {}
    for pid, group in groups.items():
        members.setdefault(group, set()).add(pid)
    ids = list(groups)
    predicted = [set(match_sets.get(pid, [pid])) | {pid} for pid in ids]
    return row_scores(predicted, [members[groups[pid]] for pid in ids]).f1


def tfidf_cosines(rows: Sequence[CatalogRow], labels: Sequence[PairLabel]) -> np.ndarray:
    """The char 3-5-gram TF-IDF cosine of each labelled pair's titles (fitted on the catalog)."""
    titles = {r.product_id: r.title or "" for r in rows}
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5)).fit(list(titles.values()))
    left = vectorizer.transform([titles[label.id_a] for label in labels])
    right = vectorizer.transform([titles[label.id_b] for label in labels])
    return np.asarray(left.multiply(right).sum(axis=1)).ravel()


def tfidf_baseline(valid: LabelledCatalog, train: LabelledCatalog) -> tuple[Scores, float]:
    """The TF-IDF baseline's scores on `valid` at the threshold with the best pair F1 on
    `train`; returns the scores and the threshold."""

    def scores(catalog: LabelledCatalog, threshold: float, cosines: np.ndarray) -> Scores:
        predicted = {
            label.key for label, c in zip(catalog.labels, cosines, strict=True) if c >= threshold
        }
        return pair_scores(predicted, [(lb.id_a, lb.id_b, lb.same) for lb in catalog.labels])

    train_cosines = tfidf_cosines(train.rows, train.labels)
    threshold = float(max(TFIDF_GRID, key=lambda t: scores(train, t, train_cosines).f1))
    return scores(valid, threshold, tfidf_cosines(valid.rows, valid.labels)), threshold


def run_pair_evaluation(
    valid: LabelledCatalog,
    train: LabelledCatalog | None = None,
    *,
    settings: Settings | None = None,
    encoders: EncoderSet | None = None,
    store: str | None = None,
    console: Console | None = None,
) -> PairEvalResult:
    """Ingest `valid`'s catalog into a fresh collection, run `dedup` with `settings` (nothing is
    tuned on the catalog), score its labelled pairs; the TF-IDF baseline is tuned on `train`."""
    started = time.perf_counter()
    console = console or Console(stderr=True)
    settings = settings or Settings()
    workdir = None if store else tempfile.TemporaryDirectory(prefix="prodsearch-eval-pairs-")
    location = store or workdir.name  # type: ignore[union-attr]
    try:
        with Index(location, "eval-pairs", settings, encoders) as index:
            catalog = Catalog(path=None, rows=valid.rows, rows_read=len(valid.rows))
            console.print(f"ingesting {valid.name}: {len(valid.rows):,} products")
            ingest_catalog(index, catalog, console=console)
            console.print(f"dedup of {valid.name}")
            result = run_dedup(index)
    finally:
        if workdir is not None:
            workdir.cleanup()
    sets = result.match_sets()
    groups = label_groups([r.product_id for r in valid.rows], valid.labels)
    baseline, threshold = tfidf_baseline(valid, train) if train else (None, None)
    return PairEvalResult(
        catalog=valid.name,
        products=len(valid.rows),
        labelled_pairs=len(valid.labels),
        positive_pairs=sum(label.same for label in valid.labels),
        decided_by=result.decided_by,
        dedup=pair_scores(
            predicted_pairs(sets), [(lb.id_a, lb.id_b, lb.same) for lb in valid.labels]
        ),
        dedup_row_f1=group_row_f1(sets, groups),
        no_match_row_f1=group_row_f1({}, groups),
        baseline=baseline,
        baseline_threshold=threshold,
        seconds=time.perf_counter() - started,
    )
