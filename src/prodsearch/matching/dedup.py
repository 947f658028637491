"""Whole-catalog matching: every product's match set and cluster, through one candidate-pair table.

    products (scroll) -> candidates (batched engine queries) -> decide -> min-2 -> clusters
                                                                       -> audit trail

Two deciders (`DedupSettings.decider`):
- **pair model** (default): the stacked trees of `pair_model.py` score every candidate pair from
  its features (`features.py`); a pair matches at `min_probability`; min-2 on the probability.
- **fusion**: the search's own rule (`decide.search_passes`), after `blend_rounds` rounds of
  neighbourhood blending (the dense vectors blended over the matched pairs, written to a derived
  collection and searched again); min-2 on the formula's fused score.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prodsearch.index import Index, Product
from prodsearch.matching import decide
from prodsearch.matching.audit import write_matches_csv, write_pairs_csv
from prodsearch.matching.blend import blended_products
from prodsearch.matching.calibrate import calibrated, check_calibration
from prodsearch.matching.candidates import RelativeFilters, collect_candidates
from prodsearch.matching.clusters import table_clusters
from prodsearch.matching.features import table_features
from prodsearch.matching.pair_model import MODEL_CANDIDATES, PairModel, ScoredPairs
from prodsearch.matching.relative import CatalogStats
from prodsearch.matching.table import PairTable
from prodsearch.settings import MODALITIES, DedupSettings, SearchSettings

#: the derived collection the fusion decider's blending rounds search
BLENDED_SUFFIX = "__blended"
#: products per upsert into the blended collection
UPSERT_BATCH = 512
Progress = Callable[[str, int, int], None]


@dataclass
class DedupResult:
    """The decided candidate-pair table, every product's cluster, and how the run went."""

    table: PairTable
    clusters: dict[str, int]
    #: the score each modality must reach to count as a signal that fired (audit trail)
    fired_at: dict[str, float]
    #: what decided the matches: "pair model" or "fusion"
    decided_by: str
    seconds: dict[str, float] = field(default_factory=dict)
    #: the pairs the pair model scored, with their features (kept when asked: calibrating
    #: reads them)
    scored: ScoredPairs | None = None

    def match_sets(self) -> dict[str, list[str]]:
        """Each product's match set, itself first, best match next."""
        return self.table.match_sets()

    def rescued(self) -> set[str]:
        """The products min-2 gave their match."""
        frame = self.table.frame
        return {self.table.ids[a] for a in frame.loc[frame["rule"] == "min-2", "a"].tolist()}

    def write(self, out: Path, cluster_ids: Mapping[str, str] | None = None) -> Path:
        """Write the match sets to `out` (each product's cluster: its stored id when given, else
        the run's number) and the audit trail beside it; returns its path."""
        clusters = cluster_ids or self.clusters
        write_matches_csv(out, self.match_sets(), clusters, self.rescued())
        audit = out.with_name(out.stem + ".pairs.csv")
        write_pairs_csv(audit, self.table, self.fired_at)
        return audit


def default_search(index: Index) -> SearchSettings:
    """The index's own search settings (fusion, thresholds, formula)."""
    settings = index.settings
    return SearchSettings(
        fusion=settings.fusion, thresholds=settings.thresholds, formula=settings.formula
    )


def run_dedup(
    index: Index,
    knobs: DedupSettings | None = None,
    filters: RelativeFilters | None = None,
    *,
    search: SearchSettings | None = None,
    progress: Progress | None = None,
    checkpoint: Path | None = None,
    keep_scored: bool = False,
) -> DedupResult:
    """Match every product of the index's collection against it and cluster the result.

    `knobs` default to the index's settings, `search` (fusion, thresholds, formula: the
    candidates' floors and weights) to its search settings. The pair model decides any
    collection, whatever vectors it has (a missing modality is a missing feature).
    `checkpoint` makes the candidate pass resumable after a kill. `keep_scored`: keep the pair
    model's scored pairs and their features in the result (`calibrate` fits on them).
    """
    knobs = knobs or index.settings.dedup
    filters = filters or RelativeFilters()
    search = search or default_search(index)
    seconds: dict[str, float] = {}
    with _timed(seconds, "read vectors"):
        products = list(index.scroll(with_vectors=True))
        index.index_payload_fields(filters.keys(), products)
    pair_model = knobs.decider == "pair-model"
    model = PairModel.load(knobs.pair_model.model) if pair_model else None
    with _timed(seconds, "candidates"):
        table = collect_candidates(
            index,
            products,
            search,
            filters,
            progress=_step(progress, "candidates", len(products)),
            checkpoint=checkpoint,
        )
    scored = None
    if model is not None:
        with _timed(seconds, "pair model"):
            scored = decide_by_pair_model(table, products, model, knobs)
        fired_at = {m: search.formula.floors.get(m) for m in MODALITIES}
    else:
        table, search = _decide_by_fusion(index, table, products, knobs, search, filters, seconds)
        fired_at = {m: search.thresholds.get(m) for m in MODALITIES}
    with _timed(seconds, "clusters"):
        clusters = table_clusters(table, knobs.max_cluster_size)
    decided_by = "pair model" if model is not None else "fusion"
    return DedupResult(
        table, clusters, fired_at, decided_by, seconds, scored if keep_scored else None
    )


def decide_by_pair_model(
    table: PairTable,
    products: Sequence[Product],
    model: PairModel,
    knobs: DedupSettings,
    eligible: np.ndarray | None = None,
    stats: CatalogStats | None = None,
) -> ScoredPairs:
    """The pair model's probabilities of each product's `MODEL_CANDIDATES` best candidates (the
    others get 0), calibrated to the catalog when it has a calibration; its decision and min-2 on
    the probabilities. Pairs not `eligible` (default: all are) are scored, and count in their
    neighbours' graph features, but never match. `stats`: the whole catalog's (default: of
    `products`, when they are the whole catalog). Returns the scored pairs (the model's own
    probabilities and the features)."""
    pair = knobs.pair_model
    top, rows = table.top(MODEL_CANDIDATES)
    features = table_features(top, products, stats)
    if pair.calibration is not None:
        check_calibration(pair.calibration, model)
    scored = ScoredPairs(top, rows, model.probabilities(top, features), features, model.digest)
    probability = np.zeros(len(table))
    probability[rows] = (
        scored.probability if pair.calibration is None else calibrated(scored, pair.calibration)
    )
    if eligible is not None:
        probability = np.where(eligible, probability, 0.0)
    decide.record(table, probability >= pair.min_probability, "pair model", probability)
    if knobs.min2:
        decide.record_min2(table, probability, pair.min2_min_probability)
    return scored


def _decide_by_fusion(
    index: Index,
    table: PairTable,
    products: list[Product],
    knobs: DedupSettings,
    search: SearchSettings,
    filters: RelativeFilters,
    seconds: dict[str, float],
) -> tuple[PairTable, SearchSettings]:
    """The search's own rule, blending rounds (each searched with the blended settings) and
    min-2 on the fused score; returns the final table and the search that produced it."""
    decide.record(table, decide.search_passes(table, search), decide.search_rule(search))
    fusion = knobs.fusion
    for round_number in range(1, fusion.blend_rounds + 1):
        with _timed(seconds, f"blend round {round_number}"):
            blended = index.derived(BLENDED_SUFFIX)
            vectors = blended_products(table, products, table.matched())
            for start in range(0, len(vectors), UPSERT_BATCH):
                blended.upsert(vectors[start : start + UPSERT_BATCH])
            blended.build()
            products = list(blended.scroll(with_vectors=True))
            search = fusion.blended
            table = collect_candidates(blended, products, search, filters)
            decide.record(table, decide.search_passes(table, search), decide.search_rule(search))
    if knobs.min2:
        with _timed(seconds, "min-2"):
            decide.record_min2(table, table.fused, fusion.min2_min_fused_score)
    return table, search


def _step(progress: Progress | None, name: str, total: int) -> Callable[[int], None]:
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        if progress:
            progress(name, done[0], total)

    return advance


@contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
