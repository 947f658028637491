"""Building one Query API request: a prefetch per modality with its own score threshold, fused at
the root (RRF, DBSF or the weighted-sum formula), from settings and per-call options."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from prodsearch.encoders import SparseVec, Vector
from prodsearch.errors import ConfigError
from prodsearch.filters import FilterSpec
from prodsearch.settings import MODALITIES, FormulaSettings, FusionName, Settings
from prodsearch.store import FusedQuery, Fusion, ModalityQuery


@dataclass(frozen=True)
class MatchOptions:
    """Per-call knobs of a match; None means "from settings"."""

    k: int | None = None
    #: per-modality prefetch score thresholds (each in its modality's score unit); under the
    #: formula fusion these replace its floors
    thresholds: Mapping[str, float] | None = None
    fusion: FusionName | None = None
    #: the formula fusion's weights, floors and minimum fused score for this call
    formula: FormulaSettings | None = None
    filter: FilterSpec | Mapping[str, Any] | None = None
    exclude_ids: Sequence[str] = ()
    #: restrict the query to these modalities (default: every vector the query has)
    modalities: Sequence[str] | None = None

    def fusion_of(self, settings: Settings) -> FusionName:
        """The fusion this call runs."""
        return self.fusion or settings.fusion

    def formula_of(self, settings: Settings) -> FormulaSettings:
        """The formula this call runs with."""
        return self.formula or settings.formula


def prefetch_thresholds(settings: Settings, options: MatchOptions) -> dict[str, float]:
    """Each modality's prefetch threshold for a call: the formula's floors or the RRF/DBSF
    thresholds, then the call's overrides. Raises ConfigError for an unknown modality."""
    if options.fusion_of(settings) == "formula":
        base = options.formula_of(settings).floors
    else:
        base = settings.thresholds
    thresholds = {m: base.get(m) for m in MODALITIES}
    for name, value in (options.thresholds or {}).items():
        if name not in thresholds:
            raise ConfigError(f"unknown modality {name!r} in thresholds; known: {MODALITIES}")
        thresholds[name] = float(value)
    return thresholds


def fused_query(
    settings: Settings,
    vectors: Mapping[str, Vector],
    thresholds: Mapping[str, float],
    options: MatchOptions,
    query_filter: FilterSpec | None,
    exclude_point_ids: tuple[str, ...],
    hnsw_ef: int | None,
) -> FusedQuery:
    """One fused request: a prefetch per modality of `vectors` (threshold, prefetch limit, and
    for a long sparse query its cut to the heaviest terms), fused as the call asks."""
    prefetches = tuple(
        ModalityQuery(
            m, vectors[m], thresholds[m], settings.prefetch_limit, *_cut(settings, vectors[m])
        )
        for m in MODALITIES
        if m in vectors
    )
    spec = query_filter or options.filter
    if spec is not None and not isinstance(spec, FilterSpec):
        spec = FilterSpec.from_mapping(spec)
    formula = options.formula_of(settings)
    return FusedQuery(
        prefetches=prefetches,
        fusion=Fusion(
            method=options.fusion_of(settings),
            rrf_k=settings.rrf_k,
            weights={m: formula.weights.get(m) for m in MODALITIES},
            min_fused_score=formula.min_fused_score,
        ),
        limit=options.k or settings.k,
        filter=spec,
        exclude_point_ids=exclude_point_ids,
        hnsw_ef=hnsw_ef,
    )


def _cut(settings: Settings, vector: Vector) -> tuple[Vector | None, int]:
    """The cut query and candidate count of a sparse vector with more terms than
    `sparse_query_terms` (its heaviest terms: the rarest n-grams); (None, 0) otherwise."""
    terms = settings.sparse_query_terms
    if not isinstance(vector, SparseVec) or terms is None or len(vector.indices) <= terms:
        return None, 0
    heaviest = np.sort(np.argsort(-np.abs(vector.values), kind="stable")[:terms])
    cut = SparseVec(vector.indices[heaviest], vector.values[heaviest])
    return cut, settings.sparse_candidates
