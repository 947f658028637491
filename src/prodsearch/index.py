"""The Index: an open collection plus the encoders that wrote it; `match` runs one fused query.

A match is one Query API request: a prefetch per available named vector, each with its own
`score_threshold`, fused inside the engine (RRF, DBSF or a weighted-sum formula). The
per-modality scores of the hits come from one exact rescoring batch restricted to the hit ids
(Qdrant does not return them with a fused result; this is not a second kNN over the catalog).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel

from prodsearch.encoders import EncoderInput, EncoderSet, SparseVec, Vector
from prodsearch.encoders.phash import compute_phash
from prodsearch.errors import ConfigError
from prodsearch.filters import FilterSpec
from prodsearch.images import ImageSource, load_image
from prodsearch.settings import LARGE_COLLECTION, MODALITIES, FusionName, Settings
from prodsearch.store import (
    FusedQuery,
    Fusion,
    Hit,
    Manifest,
    ModalityQuery,
    ScoreRequest,
    Store,
    open_store,
    point_id,
)

#: how often a collection's size estimate (which picks the HNSW breadth) is re-read
SIZE_RECHECK_SECONDS = 10.0


@dataclass(frozen=True)
class Match:
    """One matching product and why it matched."""

    product_id: str
    #: the fused score (its scale depends on the fusion: RRF ranks, DBSF, or the formula's sum)
    score: float
    #: the engine's score of every modality that scored this product, e.g. {"text": 0.91}
    scores: dict[str, float]
    #: the modalities whose score reached their threshold (the signals that fired)
    matched_by: tuple[str, ...]
    payload: dict[str, Any] = field(default_factory=dict)
    #: whole-catalog matching only: the pair model's probability that this is the same product
    probability: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form (`probability` only when the pair model decided)."""
        out = {
            "product_id": self.product_id,
            "score": self.score,
            "scores": self.scores,
            "matched_by": list(self.matched_by),
            "payload": self.payload,
        }
        if self.probability is not None:
            out["probability"] = self.probability
        return out


@dataclass(frozen=True)
class Explanation:
    """Why product B does or does not match product A (see `Index.explain`)."""

    product_a: str
    product_b: str
    fusion: str
    scores: dict[str, float]
    thresholds: dict[str, float]
    fired: tuple[str, ...]
    matched: bool
    rank: int | None
    fused_score: float | None

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form."""
        return dict(vars(self), fired=list(self.fired))


@dataclass(frozen=True)
class MatchOptions:
    """Per-call knobs; None means "from settings"."""

    k: int | None = None
    thresholds: Mapping[str, float] | None = None
    fusion: FusionName | None = None
    filter: FilterSpec | Mapping[str, Any] | None = None
    exclude_ids: Sequence[str] = ()
    #: restrict the query to these modalities (default: every vector the query has)
    modalities: Sequence[str] | None = None


class Index:
    """An open prodsearch collection: ingest into it, match against it.

    Opening an existing collection checks that it was written by this process's encoders and
    raises EncoderMismatchError otherwise. Use as a context manager, or call `close()`.
    """

    def __init__(
        self,
        store: str | Store | None = None,
        collection: str | None = None,
        settings: Settings | None = None,
        encoders: EncoderSet | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.collection = collection or self.settings.collection
        self.encoders = encoders or EncoderSet.from_settings(
            self.settings.encoders, self.settings.text_max_tokens
        )
        self.store = (
            open_store(store or self.settings.store, self.settings.collection_params())
            if not isinstance(store, Store)
            else store
        )
        self._checked = False
        #: (point count estimate, when it was read): picks the HNSW search breadth
        self._size_estimate: tuple[int, float] | None = None

    def with_settings(self, **changes: Any) -> Index:
        """Return an Index on the same store, collection and encoders with some settings changed.

        Changes may be setting models or plain dicts; either way they are validated.
        """
        merged = self.settings.model_dump()
        for name, value in changes.items():
            merged[name] = value.model_dump() if isinstance(value, BaseModel) else value
        twin = Index(self.store, self.collection, Settings.model_validate(merged), self.encoders)
        twin._checked = self._checked
        return twin

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the store."""
        self.store.close()

    # -- collection ---------------------------------------------------------------------------
    def expected_manifest(self) -> Manifest:
        """Return the manifest a collection written by these encoders has."""
        return Manifest(
            vectors={e.modality: {"dim": e.dim, "distance": e.distance} for e in self.encoders},
            encoders={name: i.as_dict() for name, i in self.encoders.identities().items()},
        )

    def ensure_collection(self) -> None:
        """Create the collection if it is missing; otherwise check its encoders."""
        if not self.store.has_collection(self.collection):
            self.store.create_collection(self.collection, self.expected_manifest())
            self._checked = True
        self.check_encoders()

    def check_encoders(self) -> None:
        """Raise CollectionNotFoundError or EncoderMismatchError unless the collection fits."""
        if self._checked:
            return
        manifest = self.store.manifest(self.collection)
        manifest.check_encoders(self.expected_manifest().encoders, self.collection)
        self._checked = True

    def count(self) -> int:
        """Return the number of products in the collection."""
        self.check_encoders()
        return self.store.count(self.collection)

    def get(self, product_id: str) -> dict[str, Any] | None:
        """Return the stored payload of a product, or None when it is absent."""
        self.check_encoders()
        points = self.store.retrieve(self.collection, [point_id(product_id)])
        return points[0].payload if points else None

    # -- encoding -----------------------------------------------------------------------------
    def encode_query(
        self, title: str | None = None, image: ImageSource | None = None, phash: str | None = None
    ) -> dict[str, Vector]:
        """Return the query vectors of a title and/or image (or a known perceptual hash)."""
        from prodsearch.catalog import clean_title

        title = clean_title(title) if title else None
        decoded = (
            load_image(image, max_pixels=self.settings.max_image_pixels)
            if image is not None
            else None
        )
        if decoded is not None and phash is None:
            phash = compute_phash(decoded)
        if not title and decoded is None and not phash:
            raise ConfigError("match needs a title, an image or a phash")
        return self.encoders.encode(
            [EncoderInput(title=title or None, image=decoded, phash=phash)]
        )[0]

    # -- matching -----------------------------------------------------------------------------
    def match(
        self,
        title: str | None = None,
        image: ImageSource | None = None,
        *,
        phash: str | None = None,
        k: int | None = None,
        thresholds: Mapping[str, float] | None = None,
        fusion: FusionName | None = None,
        filter: FilterSpec | Mapping[str, Any] | None = None,
        exclude_ids: Sequence[str] = (),
    ) -> list[Match]:
        """Return the catalog products matching a title and/or an image, best first.

        `image` is a path, encoded bytes or a PIL image. `thresholds` overrides the per-modality
        prefetch score thresholds (for the formula: its floors), `fusion` the fusion method
        ("rrf", "dbsf", "formula"), `filter` is a
        payload filter (see FilterSpec.from_mapping), `exclude_ids` product ids to leave out.
        Raises ConfigError without any input, ImageError for an unreadable image, and
        CollectionNotFoundError / EncoderMismatchError when the collection does not fit.
        """
        options = MatchOptions(k, thresholds, fusion, filter, exclude_ids)
        return self.match_vectors([self.encode_query(title, image, phash)], options)[0]

    def match_vectors(
        self,
        queries: Sequence[Mapping[str, Vector]],
        options: MatchOptions = MatchOptions(),
        filters: Sequence[FilterSpec | None] | None = None,
    ) -> list[list[Match]]:
        """Match many already-encoded queries in one engine batch; one list per query.

        `filters`, when given, holds one filter per query (replacing `options.filter`): whole-
        catalog matching restricts each product's matches relative to its own payload.
        A query with no vector among the requested modalities gets an empty list.
        """
        self.check_encoders()
        thresholds = self._thresholds(options.thresholds, options.fusion or self.settings.fusion)
        wanted = set(options.modalities or MODALITIES)
        queries = [{m: v for m, v in q.items() if m in wanted} for q in queries]
        searchable = [i for i, q in enumerate(queries) if q]
        fused = [
            self._fused_query(queries[i], thresholds, options, filters[i] if filters else None)
            for i in searchable
        ]
        hits = self.store.query_batch(self.collection, fused)
        scores = self._modality_scores([queries[i] for i in searchable], hits)
        out: list[list[Match]] = [[] for _ in queries]
        for i, query_hits, query_scores in zip(searchable, hits, scores, strict=True):
            out[i] = [
                Match(
                    product_id=str(hit.payload.get("product_id", hit.point_id)),
                    score=hit.score,
                    scores=per_hit,
                    matched_by=tuple(
                        m for m in MODALITIES if m in per_hit and per_hit[m] >= thresholds[m]
                    ),
                    payload=hit.payload,
                )
                for hit, per_hit in zip(query_hits, query_scores, strict=True)
            ]
        return out

    def match_products(
        self, product_ids: Sequence[str], options: MatchOptions = MatchOptions()
    ) -> list[list[Match]]:
        """Match catalog products against the catalog, using their stored vectors.

        Each product finds itself (as in the Shopee task) unless excluded. Products absent from
        the collection get an empty list.
        """
        self.check_encoders()
        stored = {
            p.point_id: p.vectors
            for p in self.store.retrieve(
                self.collection, [point_id(p) for p in product_ids], with_vectors=True
            )
        }
        vectors = [stored.get(point_id(p), {}) for p in product_ids]
        present = [i for i, v in enumerate(vectors) if v]
        results = self.match_vectors([vectors[i] for i in present], options)
        out: list[list[Match]] = [[] for _ in product_ids]
        for i, result in zip(present, results, strict=True):
            out[i] = result
        return out

    def explain(self, product_a: str, product_b: str) -> Explanation:
        """Explain whether and why catalog product B matches product A.

        Returns the engine's score of every modality A and B share, the threshold each is
        compared with, which fired, and B's rank and fused score in A's matches (as `match`
        returns them). Raises ConfigError when either product is not in the collection.
        """
        self.check_encoders()
        found = {
            p.payload.get("product_id"): p
            for p in self.store.retrieve(
                self.collection, [point_id(product_a), point_id(product_b)], with_vectors=True
            )
        }
        for product in (product_a, product_b):
            if product not in found:
                raise ConfigError(f"product {product!r} is not in collection {self.collection!r}")
        vectors = found[product_a].vectors
        thresholds = self._thresholds(None, self.settings.fusion)
        requests = [ScoreRequest(m, v, (point_id(product_b),)) for m, v in vectors.items()]
        scores = {
            request.modality: result[point_id(product_b)]
            for request, result in zip(
                requests, self.store.score_batch(self.collection, requests), strict=True
            )
            if point_id(product_b) in result
        }
        matches = self.match_vectors([vectors], MatchOptions(k=self.settings.prefetch_limit))[0]
        rank = next((i for i, m in enumerate(matches) if m.product_id == product_b), None)
        return Explanation(
            product_a=product_a,
            product_b=product_b,
            fusion=self.settings.fusion,
            scores=scores,
            thresholds={m: thresholds[m] for m in scores},
            fired=tuple(m for m in MODALITIES if m in scores and scores[m] >= thresholds[m]),
            matched=rank is not None,
            rank=rank,
            fused_score=matches[rank].score if rank is not None else None,
        )

    def _thresholds(self, overrides: Mapping[str, float] | None, fusion: str) -> dict[str, float]:
        """Prefetch thresholds: the formula's floors or the RRF/DBSF thresholds, then overrides."""
        base = self.settings.formula.floors if fusion == "formula" else self.settings.thresholds
        thresholds = {m: base.get(m) for m in MODALITIES}
        for name, value in (overrides or {}).items():
            if name not in thresholds:
                raise ConfigError(f"unknown modality {name!r} in thresholds; known: {MODALITIES}")
            thresholds[name] = float(value)
        return thresholds

    def _fused_query(
        self,
        vectors: Mapping[str, Vector],
        thresholds: dict[str, float],
        options: MatchOptions,
        query_filter: FilterSpec | None = None,
    ) -> FusedQuery:
        settings = self.settings
        prefetches = tuple(
            ModalityQuery(
                m,
                vectors[m],
                thresholds[m],
                settings.prefetch_limit,
                *self._sparse_candidates(vectors[m]),
            )
            for m in MODALITIES
            if m in vectors
        )
        spec = query_filter or options.filter
        if spec is not None and not isinstance(spec, FilterSpec):
            spec = FilterSpec.from_mapping(spec)
        return FusedQuery(
            prefetches=prefetches,
            fusion=Fusion(
                method=options.fusion or settings.fusion,
                rrf_k=settings.rrf_k,
                weights={m: settings.formula.weights.get(m) for m in MODALITIES},
                threshold=settings.formula.threshold,
            ),
            limit=options.k or settings.k,
            filter=spec,
            exclude_point_ids=tuple(point_id(p) for p in options.exclude_ids),
            hnsw_ef=self._hnsw_ef(),
        )

    def _hnsw_ef(self) -> int | None:
        """The HNSW search breadth: `hnsw_ef` when set, else `hnsw_ef_large` for a collection of
        LARGE_COLLECTION points or more (its size estimate re-read every SIZE_RECHECK_SECONDS)."""
        settings = self.settings
        if settings.hnsw_ef is not None or settings.hnsw_ef_large is None:
            return settings.hnsw_ef
        now = time.monotonic()
        if self._size_estimate is None or now - self._size_estimate[1] > SIZE_RECHECK_SECONDS:
            self._size_estimate = (self.store.count(self.collection, exact=False), now)
        return settings.hnsw_ef_large if self._size_estimate[0] >= LARGE_COLLECTION else None

    def _sparse_candidates(self, vector: Vector) -> tuple[Vector | None, int]:
        """The cut query and candidate count of a sparse vector with more terms than
        `sparse_query_terms` (its heaviest terms: the rarest n-grams); (None, 0) otherwise."""
        terms = self.settings.sparse_query_terms
        if not isinstance(vector, SparseVec) or terms is None or len(vector.indices) <= terms:
            return None, 0
        heaviest = np.sort(np.argsort(-np.abs(vector.values), kind="stable")[:terms])
        cut = SparseVec(vector.indices[heaviest], vector.values[heaviest])
        return cut, self.settings.sparse_candidates

    def _modality_scores(
        self, queries: Sequence[Mapping[str, Vector]], hits: list[list[Hit]]
    ) -> list[list[dict[str, float]]]:
        requests = [
            ScoreRequest(modality, vector, tuple(h.point_id for h in query_hits))
            for vectors, query_hits in zip(queries, hits, strict=True)
            for modality, vector in vectors.items()
        ]
        scored = iter(self.store.score_batch(self.collection, requests))
        out = []
        for vectors, query_hits in zip(queries, hits, strict=True):
            per_modality = {modality: next(scored) for modality in vectors}
            out.append(
                [
                    {m: s[h.point_id] for m, s in per_modality.items() if h.point_id in s}
                    for h in query_hits
                ]
            )
        return out


_default_index: Index | None = None


def match(
    title: str | None = None,
    image: ImageSource | None = None,
    **options: Any,
) -> list[Match]:
    """Match a title and/or image against the default collection (from settings).

    Keeps one Index open for the process; see `Index.match` for the options, results and errors.
    """
    global _default_index
    if _default_index is None:
        _default_index = Index()
    return _default_index.match(title, image, **options)
