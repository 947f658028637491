"""Evaluation: tune thresholds and fusion on `val`, report precision/recall/F1 on `test`.

The metric is the Shopee one: for every product, its predicted match set (itself included) is
compared with its label group within the same split's catalog; precision, recall and F1 are
averaged over rows.

How tuning works. One engine pass per split collects every product's candidates (the union of
each modality's top `prefetch_limit` above a low floor) together with the engine's exact score of
every modality for each candidate. The search over thresholds and fusion knobs then runs on those
cached scores, reproducing the engine's rules (a prefetch keeps a candidate whose score reaches
its threshold; RRF keeps the union; the formula sums weighted scores, 0 where a prefetch missed).
Every figure reported afterwards, on val and on test, comes from real fused queries in the engine.

Catalog size. A threshold's best value depends on how many look-alikes a catalog holds: tuned on
a catalog half the size, the formula's threshold came out 0.07 lower and cost 0.005 F1 on the
larger one (Shopee val halves). So the val queries search a catalog of the size the results are
reported at: val plus whole groups of `train` rows as distractors (they are never queries and
match no val row), up to `val_catalog_size` products (default: the test catalog's size).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomli_w
from rich.console import Console
from rich.table import Table
from sklearn.feature_extraction.text import TfidfVectorizer

from prodsearch.catalog import Catalog, read_catalog
from prodsearch.encoders import EncoderSet
from prodsearch.errors import CatalogError
from prodsearch.index import Index, MatchOptions
from prodsearch.ingest import ingest_catalog
from prodsearch.pair_model import PairModel
from prodsearch.recipes import load_recipe
from prodsearch.settings import MODALITIES, Settings

#: candidate-generation floors: well below any useful threshold
FLOORS = {"text": 0.3, "chars": 0.15, "charcnn": 0.3, "image": 0.3, "phash": 0.5}
#: a threshold no score reaches: the modality is off
OFF = 9.0
THRESHOLD_GRID = {
    "text": np.round(np.arange(0.30, 0.981, 0.01), 3),  # ArcFace-tuned cosines run lower
    "chars": np.round(np.arange(0.20, 0.901, 0.01), 3),
    "charcnn": np.round(np.arange(0.30, 0.981, 0.01), 3),
    "image": np.round(np.arange(0.40, 0.981, 0.01), 3),
    "phash": np.round(1.0 - np.arange(0, 17) / 32.0, 5),  # Hamming 0..16
}
WEIGHT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)


@dataclass(frozen=True)
class Scores:
    """Precision, recall and F1, each the mean over rows."""

    precision: float
    recall: float
    f1: float

    def as_dict(self) -> dict[str, float]:
        """Return a JSON-serialisable form (rounded to 4 places)."""
        return {k: round(v, 4) for k, v in vars(self).items()}


def row_scores(predicted: Sequence[set[str]], truth: Sequence[set[str]]) -> Scores:
    """Return the row-mean precision, recall and F1 of predicted vs true match sets."""
    tp = np.array([len(p & t) for p, t in zip(predicted, truth, strict=True)], dtype=float)
    n_pred = np.array([len(p) for p in predicted], dtype=float)
    n_true = np.array([len(t) for t in truth], dtype=float)
    return Scores(
        precision=float(np.mean(tp / n_pred)),
        recall=float(np.mean(tp / n_true)),
        f1=float(np.mean(2 * tp / (n_pred + n_true))),
    )


def map_at_r(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Mean average precision at R (Musgrave et al. 2020): for each item, R = the number of
    other items of its class; precision is averaged over the relevant items in its top R."""
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    order = np.argsort(-similarity, axis=1)
    scores = []
    for i in range(len(labels)):
        r = int(np.sum(labels == labels[i])) - 1
        if r == 0:
            continue
        relevant = labels[order[i, :r]] == labels[i]
        precision_at = np.cumsum(relevant) / np.arange(1, r + 1)
        scores.append(float(np.sum(precision_at * relevant) / r))
    return float(np.mean(scores))


def top1_accuracy(
    queries: np.ndarray,
    query_labels: np.ndarray,
    catalogue: np.ndarray,
    catalogue_labels: np.ndarray,
) -> float:
    """Fraction of queries whose nearest catalogue item has their label."""
    nearest = np.argmax(queries @ catalogue.T, axis=1)
    return float(np.mean(catalogue_labels[nearest] == query_labels))


def grocery_image_metrics(grocery_dir: Path, encoders: EncoderSet) -> dict[str, dict[str, float]]:
    """Image-modality quality on Grocery Store `test` photos: top-1 accuracy of the nearest
    catalogue (iconic) image and mAP@R among the test photos, for Packages and all 81 groups."""
    from prodsearch.images import load_image

    frame = pd.read_csv(grocery_dir / "images.csv")
    frame = frame[frame["split"].isin(["test", "iconic"])].reset_index(drop=True)
    images = [load_image(grocery_dir / path) for path in frame["image"]]
    embeddings = encoders["image"].encode_images(images)  # type: ignore[attr-defined]
    out = {}
    for name, subset in (
        ("Packages", frame["category"] == "Packages"),
        ("all 81 groups", frame.index >= 0),
    ):
        test = (subset & (frame["split"] == "test")).to_numpy()
        iconic = (subset & (frame["split"] == "iconic")).to_numpy()
        labels = frame["label_group"].to_numpy()
        out[name] = {
            "test_photos": int(test.sum()),
            "map_at_r": round(map_at_r(embeddings[test], labels[test]), 4),
            "top1_to_catalogue": round(
                top1_accuracy(embeddings[test], labels[test], embeddings[iconic], labels[iconic]), 4
            ),
        }
    return out


@dataclass
class SplitData:
    """The catalog one split's queries search, in its own collection: the split's products
    first (the queries), then any distractors; with labels and cached candidates."""

    name: str
    index: Index
    catalog_ids: list[str]
    catalog_labels: np.ndarray
    catalog_titles: list[str]
    #: the first `n_queries` products of the catalog are the split's own
    n_queries: int
    truth: list[set[str]] = field(default_factory=list)
    pairs: pd.DataFrame | None = None

    def __post_init__(self) -> None:
        members: dict[Any, set[str]] = {}
        for pid, label in zip(self.catalog_ids, self.catalog_labels, strict=True):
            members.setdefault(label, set()).add(pid)
        self.truth = [members[label] for label in self.catalog_labels[: self.n_queries]]

    @cached_property
    def ids(self) -> list[str]:
        """The split's own products: the queries."""
        return self.catalog_ids[: self.n_queries]


@dataclass
class MethodResult:
    """One method's configuration and scores."""

    method: str
    config: dict[str, Any]
    val: Scores
    test: Scores
    #: val F1 predicted by the tuning simulation (None for the baseline); it should equal val.f1
    simulated_val_f1: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form."""
        return {
            "method": self.method,
            "config": self.config,
            "val": self.val.as_dict(),
            "test": self.test.as_dict(),
            "simulated_val_f1": self.simulated_val_f1,
        }


@dataclass
class EvalResult:
    """The evaluation table and the tuned settings."""

    methods: list[MethodResult]
    tuned: dict[str, Any]
    sizes: dict[str, int]
    seconds: float
    #: the pair model fitted on val (None without post-processing)
    pair_model: PairModel | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form."""
        return {
            "sizes": self.sizes,
            "seconds": round(self.seconds, 1),
            "methods": [m.as_dict() for m in self.methods],
            "tuned_settings": self.tuned,
        }

    def write_settings(self, path: Path) -> None:
        """Write the tuned thresholds and fusion as a prodsearch settings TOML file, and the pair
        model beside it (`<name>.pair_model.json`, which the file points to)."""
        tuned = self.tuned
        if self.pair_model is not None:
            model_path = path.with_name(path.stem + ".pair_model.json")
            self.pair_model.save(model_path)
            pair = {**tuned["dedup"]["pair_model"], "model": str(model_path.resolve())}
            tuned = {**tuned, "dedup": {**tuned["dedup"], "pair_model": pair}}
        path.write_text(tomli_w.dumps(tuned), encoding="utf-8")


def format_table(result: EvalResult) -> Table:
    """Return the results as a rich table."""
    table = Table(title=f"F1 on test (tuned on val); catalog sizes {result.sizes}")
    for column in ("method", "val F1", "test P", "test R", "test F1", "config"):
        table.add_column(column)
    for m in result.methods:
        table.add_row(
            m.method,
            f"{m.val.f1:.4f}",
            f"{m.test.precision:.4f}",
            f"{m.test.recall:.4f}",
            f"{m.test.f1:.4f}",
            _describe(m.config),
        )
    return table


def _describe(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


# -- the run ----------------------------------------------------------------------------------
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
    splits = _read_splits(split_file)
    workdir = None if store else tempfile.TemporaryDirectory(prefix="prodsearch-eval-")
    location = store or workdir.name  # type: ignore[union-attr]
    encoders = encoders or EncoderSet.from_settings(settings.encoders, settings.text_max_tokens)
    base = Index(location, "eval-val", settings, encoders)
    try:
        test = _prepare_split(base, catalog, splits, "test", label_column, console)
        target = test.n_queries if val_catalog_size is None else val_catalog_size
        val = _prepare_split(base, catalog, splits, "val", label_column, console, target)
        data = {"val": val, "test": test}
        for split in data.values():
            console.print(f"collecting candidates on {split.name} ({split.n_queries:,} products)")
            split.pairs = _candidate_pairs(split)
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


def _read_splits(split_file: Path) -> dict[str, str]:
    try:
        frame = pd.read_csv(split_file, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CatalogError(f"cannot read split file {split_file}: {exc}") from exc
    if "split" not in frame.columns:
        raise CatalogError(f"{split_file}: needs columns <id>,split; found {list(frame.columns)}")
    id_column = next(c for c in frame.columns if c != "split")
    return dict(zip(frame[id_column], frame["split"], strict=True))


def _prepare_split(
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
    distractors = _distractors(catalog, splits, label_column, catalog_size - len(rows))
    missing = [r.row for r in rows if label_column not in r.payload]
    if missing:
        raise CatalogError(f"rows {missing[:5]} have no {label_column!r} label")
    index = Index(base.store, f"eval-{name}", base.settings, base.encoders)
    everything = rows + distractors
    part = Catalog(path=catalog.path, rows=everything, rows_read=len(everything))
    extra = f" + {len(distractors):,} train rows as distractors" if distractors else ""
    console.print(f"ingesting {name}: {len(rows):,} products{extra}")
    if len(everything) < 0.99 * catalog_size:
        console.print(
            f"[yellow]the {name} catalog holds {len(everything):,} products, "
            f"fewer than the {catalog_size:,} asked: the split file has too few train rows; "
            "thresholds tuned on a smaller catalog come out lower than a larger one needs"
        )
    ingest_catalog(index, part, console=console)
    return SplitData(
        name=name,
        index=index,
        catalog_ids=[r.product_id for r in everything],
        catalog_labels=np.array([r.payload[label_column] for r in everything]),
        catalog_titles=[r.title or "" for r in everything],
        n_queries=len(rows),
    )


def _distractors(
    catalog: Catalog, splits: dict[str, str], label_column: str, wanted: int
) -> list[Any]:
    """Up to `wanted` labelled `train` rows, whole groups at a time, in a seeded random order."""
    if wanted <= 0:
        return []
    groups: dict[str, list[Any]] = {}
    for r in catalog.rows:
        if splits.get(r.product_id) == "train" and label_column in r.payload:
            groups.setdefault(str(r.payload[label_column]), []).append(r)
    chosen: list[Any] = []
    for key in np.random.default_rng(0).permutation(sorted(groups)):
        if len(chosen) + len(groups[key]) > wanted:
            continue
        chosen += groups[key]
    return chosen


def _candidate_pairs(split: SplitData) -> pd.DataFrame:
    """Every product's candidates with the engine's score of each modality (NaN = not scored)."""
    settings = split.index.settings
    generator = split.index.with_settings(
        fusion="formula",
        formula=settings.formula.model_copy(
            update={"threshold": None, "floors": settings.formula.floors.model_copy(update=FLOORS)}
        ),
    )
    limit = generator.settings.prefetch_limit * len(MODALITIES)
    position = {pid: i for i, pid in enumerate(split.catalog_ids)}
    records = []
    for start in range(0, split.n_queries, 256):
        chunk = split.ids[start : start + 256]
        for pid, matches in zip(
            chunk, generator.match_products(chunk, MatchOptions(k=limit)), strict=True
        ):
            q = position[pid]
            for m in matches:
                c = position.get(m.product_id)
                if c is None:
                    continue
                records.append((q, c, *(m.scores.get(x, np.nan) for x in MODALITIES)))
    pairs = pd.DataFrame.from_records(records, columns=["query", "candidate", *MODALITIES])
    labels = split.catalog_labels
    pairs["match"] = labels[pairs["query"].to_numpy()] == labels[pairs["candidate"].to_numpy()]
    return pairs


# -- simulation of the engine's rules on cached scores ------------------------------------------
def _simulated_f1(split: SplitData, selected: np.ndarray) -> float:
    """Mean F1 when the pairs flagged in `selected` are predicted (each query always has itself)."""
    pairs = split.pairs
    assert pairs is not None
    n = split.n_queries
    not_self = (pairs["query"] != pairs["candidate"]).to_numpy()
    chosen = selected & not_self
    queries = pairs["query"].to_numpy()
    tp = 1 + np.bincount(queries, weights=chosen & pairs["match"].to_numpy(), minlength=n)
    n_pred = 1 + np.bincount(queries, weights=chosen, minlength=n)
    n_true = np.array([len(t) for t in split.truth], dtype=float)
    return float(np.mean(2 * tp / (n_pred + n_true)))


def _passes(split: SplitData, modality: str, threshold: float) -> np.ndarray:
    scores = split.pairs[modality].to_numpy()  # type: ignore[index]
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(scores, nan=-np.inf) >= threshold


def _union(split: SplitData, thresholds: dict[str, float]) -> np.ndarray:
    selected = np.zeros(len(split.pairs), dtype=bool)  # type: ignore[arg-type]
    for modality, threshold in thresholds.items():
        selected |= _passes(split, modality, threshold)
    return selected


def _tune_single(split: SplitData, modality: str) -> float:
    grid = THRESHOLD_GRID[modality]
    return float(max(grid, key=lambda t: _simulated_f1(split, _passes(split, modality, t))))


def _tune_union(
    split: SplitData, modalities: list[str], start: dict[str, float]
) -> dict[str, float]:
    """Coordinate ascent over per-modality thresholds of the OR (RRF) fusion."""
    best = dict(start)
    best_f1 = _simulated_f1(split, _union(split, best))
    for _ in range(3):
        improved = False
        for modality in modalities:
            for t in (*THRESHOLD_GRID[modality], OFF):
                trial = {**best, modality: float(t)}
                f1 = _simulated_f1(split, _union(split, trial))
                if f1 > best_f1 + 1e-9:
                    best, best_f1, improved = trial, f1, True
        if not improved:
            break
    return best


def _formula_total(split: SplitData, weights: dict[str, float]) -> np.ndarray:
    """The formula's fused score per pair: weighted scores, 0 where a prefetch (floor) missed."""
    pairs = split.pairs
    assert pairs is not None
    total = np.zeros(len(pairs))
    for modality, weight in weights.items():
        scores = np.nan_to_num(pairs[modality].to_numpy(), nan=0.0)
        total += weight * scores * _passes(split, modality, FLOORS[modality])
    return total


def _tune_formula(
    split: SplitData, modalities: list[str]
) -> tuple[dict[str, float], float, dict[str, float]]:
    """Coordinate ascent over the weights (chars', or the first modality's, fixed at 1) and a
    search over the root threshold of the weighted-sum formula; prefetches keep the floors."""
    anchor = "chars" if "chars" in modalities else modalities[0]
    weights = {m: 1.0 for m in modalities}

    def best_threshold(trial: dict[str, float]) -> tuple[float, float]:
        total = _formula_total(split, trial)
        candidates = np.quantile(total[total > 0], np.linspace(0.5, 0.995, 60))
        return max((_simulated_f1(split, total >= t), float(t)) for t in candidates)

    best_f1, threshold = best_threshold(weights)
    for _ in range(3):
        improved = False
        for modality in (m for m in modalities if m != anchor):
            for weight in WEIGHT_GRID:
                trial = {**weights, modality: weight}
                f1, t = best_threshold(trial)
                if f1 > best_f1 + 1e-9:
                    best_f1, threshold, weights, improved = f1, t, trial, True
        if not improved:
            break
    return weights, round(threshold, 4), {m: FLOORS[m] for m in modalities}


# -- engine runs ---------------------------------------------------------------------------------
def _engine_scores(split: SplitData, modalities: list[str], **changes: Any) -> Scores:
    index = split.index.with_settings(**changes)
    options = MatchOptions(k=index.settings.prefetch_limit, modalities=modalities)
    predicted = []
    for start in range(0, split.n_queries, 256):
        chunk = split.ids[start : start + 256]
        for pid, matches in zip(chunk, index.match_products(chunk, options), strict=True):
            predicted.append({pid} | {m.product_id for m in matches})
    return row_scores(predicted, split.truth)


def _thresholds(settings: Settings, values: dict[str, float]) -> Any:
    return settings.thresholds.model_copy(update=values)


def _tfidf_scores(split: SplitData, threshold: float) -> Scores:
    vectors = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5)).fit_transform(
        split.catalog_titles
    )
    similarity = (vectors[: split.n_queries] @ vectors.T).tocsr()
    predicted = []
    for q in range(split.n_queries):
        row = similarity.getrow(q)
        predicted.append(
            {split.ids[q]} | {split.catalog_ids[c] for c in row.indices[row.data >= threshold]}
        )
    return row_scores(predicted, split.truth)


def _tune_and_report(
    data: dict[str, SplitData], settings: Settings, console: Console, postprocess: bool = True
) -> tuple[list[MethodResult], dict[str, Any], PairModel | None]:
    val, test = data["val"], data["test"]
    modalities = [m for m in MODALITIES if val.pairs[m].notna().any()]  # type: ignore[index]
    results: list[MethodResult] = []

    def report(
        method: str, config: dict[str, Any], mods: list[str], simulated: np.ndarray, **changes: Any
    ) -> None:
        console.print(f"scoring {method} on val and test in the engine")
        results.append(
            MethodResult(
                method,
                config,
                _engine_scores(val, mods, **changes),
                _engine_scores(test, mods, **changes),
                round(_simulated_f1(val, simulated), 4),
            )
        )

    tfidf_threshold = max(
        np.round(np.arange(0.2, 0.9, 0.01), 3), key=lambda t: _tfidf_scores(val, t).f1
    )
    results.append(
        MethodResult(
            "baseline: TF-IDF char 3-5 (sklearn)",
            {"threshold": float(tfidf_threshold)},
            _tfidf_scores(val, tfidf_threshold),
            _tfidf_scores(test, tfidf_threshold),
        )
    )

    singles = {m: _tune_single(val, m) for m in modalities}
    for m in modalities:
        report(
            f"{m} alone",
            {"threshold": singles[m]},
            [m],
            _passes(val, m, singles[m]),
            thresholds=_thresholds(settings, {m: singles[m]}),
            fusion="rrf",
        )

    union = _tune_union(val, modalities, singles)
    report(
        "fused: RRF (union of thresholded prefetches)",
        {**union, "rrf_k": settings.rrf_k},
        modalities,
        _union(val, union),
        thresholds=_thresholds(settings, union),
        fusion="rrf",
    )

    weights, root, floors = _tune_formula(val, modalities)
    formula_selected = _formula_total(val, weights) >= root
    formula = settings.formula.model_copy(
        update={
            "weights": settings.formula.weights.model_copy(update=weights),
            "threshold": root,
            "floors": settings.formula.floors.model_copy(update=floors),
        }
    )
    report(
        "fused: formula (weighted sum of scores)",
        {"weights": weights, "threshold": root},
        modalities,
        formula_selected,
        fusion="formula",
        formula=formula,
    )

    rrf_result, formula_result = results[-2], results[-1]
    tuned = {
        "fusion": "formula" if formula_result.val.f1 > rrf_result.val.f1 else "rrf",
        "thresholds": _thresholds(settings, union).model_dump(),
        "formula": formula.model_dump(),
    }
    pair_model = None
    if postprocess:
        best = settings.model_copy(
            update={
                "fusion": tuned["fusion"],
                "thresholds": _thresholds(settings, union),
                "formula": formula,
            }
        )
        post_results, tuned["dedup"], pair_model = _postprocess(data, best, modalities, console)
        results += post_results
    return results, tuned, pair_model


# -- catalog-level post-processing (prodsearch dedup) -------------------------------------------
def _dedup_sets(split: SplitData, settings: Settings, options: Any) -> list[set[str]]:
    """Match sets of every product of the split from a real `run_dedup` in the engine."""
    from prodsearch.dedup import run_dedup

    result = run_dedup(
        split.index.with_settings(
            **settings.model_dump(include={"fusion", "thresholds", "formula", "dedup"})
        ),
        options,
    )
    return [set(result.neighbourhoods[pid].ids()) for pid in split.ids]


def _cluster_sets(split: SplitData, settings: Settings, options: Any) -> list[set[str]]:
    """Match sets read off the duplicate clusters of a real `run_dedup`."""
    from prodsearch.dedup import run_dedup

    result = run_dedup(
        split.index.with_settings(
            **settings.model_dump(include={"fusion", "thresholds", "formula", "dedup"})
        ),
        options,
    )
    members: dict[int, set[str]] = {}
    for pid, cluster in result.clusters.items():
        members.setdefault(cluster, set()).add(pid)
    return [members[result.clusters[pid]] for pid in split.ids]


def _tune_min2(split: SplitData, base_sets: list[set[str]], formula: Any) -> float:
    """The looser formula threshold a lone product's best neighbour must reach, tuned on the
    cached candidate scores (the engine's rule: the top non-self candidate by formula score)."""
    pairs = split.pairs
    assert pairs is not None
    total = _formula_total(
        split,
        {m: formula.weights.get(m) for m in MODALITIES if m in pairs and pairs[m].notna().any()},
    )
    frame = pd.DataFrame(
        {
            "query": pairs["query"],
            "candidate": pairs["candidate"],
            "total": total,
            "match": pairs["match"],
        }
    )
    frame = frame[frame["query"] != frame["candidate"]].sort_values("total", ascending=False)
    best = frame.drop_duplicates("query").set_index("query")
    alone = [q for q, s in enumerate(base_sets) if len(s) == 1 and q in best.index]
    n_true = np.array([len(t) for t in split.truth], dtype=float)
    base = np.array(
        [2 * len(s & t) / (len(s) + len(t)) for s, t in zip(base_sets, split.truth, strict=True)]
    )
    gain_if_added = {q: 2 * (1 + best.loc[q, "match"]) / (2 + n_true[q]) - base[q] for q in alone}
    grid = np.round(np.arange(0.2, 1.2, 0.01), 3)
    return float(
        max(
            grid,
            key=lambda t: sum(g for q, g in gain_if_added.items() if best.loc[q, "total"] >= t),
        )
    )


def _fit_pair_model(
    split: SplitData, settings: Settings, modalities: list[str]
) -> tuple[PairModel, Any, float, float]:
    """Fit the pair model on the candidate pairs of the split's own products; tune its match and
    min-2 probability thresholds for row F1 on out-of-fold probabilities (group-disjoint folds).

    Returns the model (fitted on every own pair), its knobs, and the out-of-fold F1 without and
    with min-2.
    """
    from prodsearch.dedup import (
        DedupOptions,
        candidate_features,
        collect_candidates,
        stored_products,
    )

    knobs = settings.dedup.pair_model
    index = split.index.with_settings(**settings.model_dump(include={"formula"}))
    products = list(stored_products(index))
    pairs = collect_candidates(index, products, DedupOptions())
    features = candidate_features(index, products, pairs, modalities, knobs)
    position = {pid: i for i, pid in enumerate(split.catalog_ids)}
    to_catalog = np.array([position[pid] for pid in pairs.ids])
    query, candidate = to_catalog[pairs.query], to_catalog[pairs.candidate]
    labels = split.catalog_labels
    same = labels[query] == labels[candidate]
    own = query < split.n_queries  # fitted and tuned on the split's own products only
    model, probability = PairModel.fit(pairs, features, same, labels[query], modalities, own)
    probability, same, query = probability[own], same[own], query[own]
    n = split.n_queries
    truth_sizes = np.array([len(t) for t in split.truth], dtype=float)

    def f1(selected: np.ndarray) -> float:
        tp = 1 + np.bincount(query, weights=selected & same, minlength=n)
        predicted = 1 + np.bincount(query, weights=selected, minlength=n)
        return float(np.mean(2 * tp / (predicted + truth_sizes)))

    grid = np.round(np.arange(0.05, 0.96, 0.01), 3)
    threshold = float(max(grid, key=lambda t: f1(probability >= t)))
    selected = probability >= threshold
    # min-2: a query with nothing selected takes its most probable candidate if it reaches t2
    order = np.lexsort((-probability, query))
    first = order[np.r_[True, query[order][1:] != query[order][:-1]]] if len(order) else order
    lonely = first[np.bincount(query, weights=selected, minlength=n)[query[first]] == 0]
    sizes = truth_sizes[query[lonely]]
    gain = 2 * (1 + same[lonely]) / (2 + sizes) - 2 / (1 + sizes)
    min2_threshold = float(
        max(grid[grid <= threshold], key=lambda t: gain[probability[lonely] >= t].sum())
    )
    with_min2 = selected.copy()
    with_min2[lonely[probability[lonely] >= min2_threshold]] = True
    tuned = knobs.model_copy(update={"threshold": threshold, "min2_threshold": min2_threshold})
    return model, tuned, f1(selected), f1(with_min2)


def _postprocess(
    data: dict[str, SplitData], settings: Settings, modalities: list[str], console: Console
) -> tuple[list[MethodResult], dict[str, Any], PairModel]:
    """Each catalog-level step added in turn, tuned on val, every figure from `run_dedup`;
    returns the rows, the tuned knobs and the pair model fitted on val."""
    from dataclasses import replace

    from prodsearch.dedup import (
        DedupOptions,
        blended_vectors,
        fused_neighbours,
        stored_products,
        write_blended,
    )

    val, test = data["val"], data["test"]
    results: list[MethodResult] = []

    def report(
        method: str,
        config: dict[str, Any],
        tuned: Settings,
        options: DedupOptions,
        clusters: bool = False,
    ) -> None:
        console.print(f"dedup: {method} on val and test")
        sets = _cluster_sets if clusters else _dedup_sets
        results.append(
            MethodResult(
                method,
                config,
                row_scores(sets(val, tuned, options), val.truth),
                row_scores(sets(test, tuned, options), test.truth),
            )
        )

    plain = DedupOptions(min2=False)
    base_val = _dedup_sets(val, settings, plain)
    min2_threshold = _tune_min2(val, base_val, settings.formula)
    with_min2 = DedupOptions(min2=True, min2_threshold=min2_threshold)
    report("dedup: fused + min-2", {"min2_threshold": min2_threshold}, settings, with_min2)

    # Blending: build the blended val collection once, tune its fusion on its candidates.
    console.print("dedup: tuning the blended search on val")
    products = list(stored_products(val.index))
    neighbours = fused_neighbours(
        val.index.with_settings(**settings.model_dump(include={"fusion", "thresholds", "formula"})),
        products,
        plain,
    )
    dense = [m for m in modalities if m not in ("chars", "phash")]
    payloads = {p.payload["product_id"]: p.payload for p in products}
    blended_index = write_blended(val.index, blended_vectors(products, neighbours, dense), payloads)
    blended_val = replace(val, index=blended_index, pairs=None)
    blended_val.pairs = _candidate_pairs(blended_val)
    union = _tune_union(
        blended_val, modalities, {m: _tune_single(blended_val, m) for m in modalities}
    )
    weights, root, floors = _tune_formula(blended_val, modalities)
    union_f1 = _simulated_f1(blended_val, _union(blended_val, union))
    formula_f1 = _simulated_f1(blended_val, _formula_total(blended_val, weights) >= root)
    blended_formula = settings.formula.model_copy(
        update={
            "weights": settings.formula.weights.model_copy(update=weights),
            "threshold": root,
            "floors": settings.formula.floors.model_copy(update=floors),
        }
    )
    blended = {
        "fusion": "formula" if formula_f1 > union_f1 else "rrf",
        "thresholds": _thresholds(settings, union).model_dump(),
        "formula": blended_formula.model_dump(),
    }
    blend_settings = settings.model_copy(
        update={
            "dedup": settings.dedup.model_copy(
                update={"blended": settings.dedup.blended.model_validate(blended)}
            )
        }
    )
    report(
        "dedup: fused + 1 blending round",
        {"blended": blended},
        blend_settings,
        DedupOptions(min2=False, blend_rounds=1),
    )
    both_val = _dedup_sets(val, blend_settings, DedupOptions(min2=False, blend_rounds=1))
    min2_blended = _tune_min2(blended_val, both_val, blended_formula)
    both = DedupOptions(min2=True, min2_threshold=min2_blended, blend_rounds=1)
    report(
        "dedup: fused + blending + min-2", {"min2_threshold": min2_blended}, blend_settings, both
    )
    report(
        "dedup: clusters (capped components) of the above",
        {"max_cluster_size": 50},
        blend_settings,
        both,
        clusters=True,
    )
    blending_f1 = results[-2].val.f1

    console.print("dedup: fitting the pair model on val")
    model, knobs, plain_f1, min2_f1 = _fit_pair_model(val, settings, modalities)
    with tempfile.TemporaryDirectory(prefix="prodsearch-pair-model-") as folder:
        model.save(Path(folder) / "pair_model.json")
        knobs = knobs.model_copy(update={"model": Path(folder) / "pair_model.json"})
        pair_settings = settings.model_copy(
            update={"dedup": settings.dedup.model_copy(update={"pair_model": knobs})}
        )
        report(
            "dedup: pair model (stacked trees over candidates; val F1 in-sample, see config)",
            {"threshold": knobs.threshold, "val_f1_out_of_fold": round(plain_f1, 4)},
            pair_settings,
            DedupOptions(min2=False, pair_model=knobs),
        )
        report(
            "dedup: pair model + min-2",
            {"min2_threshold": knobs.min2_threshold, "val_f1_out_of_fold": round(min2_f1, 4)},
            pair_settings,
            DedupOptions(min2=True, pair_model=knobs),
        )
        report(
            "dedup: clusters (capped components) of the above",
            {"max_cluster_size": 50},
            pair_settings,
            DedupOptions(min2=True, pair_model=knobs),
            clusters=True,
        )
    # the pair model is chosen on honest val figures: out of fold against blending + min-2
    pair_wins = min2_f1 > blending_f1
    tuned = {
        "blend_rounds": 1,
        "min2": True,
        "min2_threshold": min2_blended,
        "max_cluster_size": 50,
        "pair_model": knobs.model_copy(update={"enabled": pair_wins}).model_dump(exclude={"model"}),
        "blended": blended,
    }
    return results, tuned, model
