"""The Index: an open collection plus the encoders that wrote it; `match` runs one fused query.

A match is one Query API request: a prefetch per available named vector, each with its own
`score_threshold`, fused inside the engine (RRF, DBSF or a weighted-sum formula). The
per-modality scores of the hits come from one exact rescoring batch restricted to the hit ids
(Qdrant does not return them with a fused result; this is not a second kNN over the catalog).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prodsearch.encoders import EncoderInput, EncoderSet, Vector
from prodsearch.encoders.phash import compute_phash
from prodsearch.errors import ConfigError
from prodsearch.filters import FilterSpec
from prodsearch.images import ImageSource, load_image
from prodsearch.query import MatchOptions, fused_query, prefetch_thresholds
from prodsearch.settings import LARGE_COLLECTION, MODALITIES, FusionName, Settings
from prodsearch.store import (
    FusedQuery,
    Hit,
    Manifest,
    PointRecord,
    ScoreRequest,
    Store,
    StoredPoint,
    open_store,
    point_id,
)

#: how often a collection's size estimate (which picks the HNSW breadth) is re-read
SIZE_RECHECK_SECONDS = 10.0
#: points per page when a collection is read whole
SCROLL_PAGE = 1000


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

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form."""
        return {
            "product_id": self.product_id,
            "score": self.score,
            "scores": self.scores,
            "matched_by": list(self.matched_by),
            "payload": self.payload,
        }


@dataclass(frozen=True)
class Product:
    """A stored product: its catalog id, payload and (when read with them) named vectors."""

    product_id: str
    payload: dict[str, Any]
    vectors: dict[str, Vector] = field(default_factory=dict)


class Index:
    """An open prodsearch collection: the one owner of its reads and writes by product id.

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
            vectors={
                e.modality: {
                    "dim": e.dim,
                    "distance": e.distance,
                    **({"binary": True} if e.binary else {}),
                }
                for e in self.encoders
            },
            encoders={name: i.as_dict() for name, i in self.encoders.identities().items()},
        )

    def exists(self) -> bool:
        """Return True when the collection exists."""
        return self.store.has_collection(self.collection)

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

    def derived(self, suffix: str) -> Index:
        """A new, empty collection beside this one (same store, settings and encoders) named
        with `suffix`; an existing one of that name is replaced."""
        twin = Index(self.store, self.collection + suffix, self.settings, self.encoders)
        if self.store.has_collection(twin.collection):
            self.store.delete_collection(twin.collection)
        twin.ensure_collection()
        return twin

    def count(self) -> int:
        """Return the number of products in the collection."""
        self.check_encoders()
        return self.store.count(self.collection)

    # -- reads and writes by product id -------------------------------------------------------
    def get(self, product_id: str) -> dict[str, Any] | None:
        """Return the stored payload of a product, or None when it is absent."""
        found = self.products([product_id])
        return found[0].payload if found else None

    def products(self, product_ids: Sequence[str], with_vectors: bool = False) -> list[Product]:
        """Return the stored products among `product_ids` (absent ones left out)."""
        self.check_encoders()
        points = self.store.retrieve(
            self.collection, [point_id(p) for p in product_ids], with_vectors
        )
        return [_product(p) for p in points]

    def scroll(self, with_vectors: bool = True) -> Iterator[Product]:
        """Yield every stored product, page by page."""
        self.check_encoders()
        offset = None
        while True:
            points, offset = self.store.scroll(self.collection, offset, SCROLL_PAGE, with_vectors)
            yield from (_product(p) for p in points)
            if offset is None:
                return

    def content_hashes(self, product_ids: Sequence[str]) -> dict[str, str | None]:
        """Each stored product's content hash (written by ingest), by product id."""
        return {p.product_id: p.payload.get("content_hash") for p in self.products(product_ids)}

    def upsert(self, products: Sequence[Product]) -> None:
        """Insert or replace products whole (every named vector and the payload, which keeps
        the product id), in one engine call."""
        self.check_encoders()
        points = [
            PointRecord(
                point_id(p.product_id), p.vectors, {**p.payload, "product_id": p.product_id}
            )
            for p in products
        ]
        self.store.upsert(self.collection, points)

    def set_payload(self, product_ids: str | Sequence[str], payload: dict[str, Any]) -> None:
        """Merge `payload`'s keys into stored products' payloads (vectors untouched)."""
        self.check_encoders()
        ids = [product_ids] if isinstance(product_ids, str) else product_ids
        self.store.set_payload(self.collection, [point_id(p) for p in ids], payload)

    def delete(self, product_ids: Sequence[str]) -> None:
        """Delete products by id (absent ones are ignored)."""
        self.check_encoders()
        self.store.delete(self.collection, [point_id(p) for p in product_ids])

    def build(self) -> None:
        """Build the engine's search index after bulk writes."""
        self.store.build_index(self.collection)

    def index_payload_fields(self, keys: Iterable[str], products: Sequence[Product]) -> None:
        """Create a payload index on each field (its type read off the stored values), so the
        engine runs filters on it with an index."""
        for key in sorted(keys):
            values = [p.payload[key] for p in products if key in p.payload]
            if not values:
                continue
            if all(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
                kind = "keyword"
            elif all(isinstance(v, int) for v in values):
                kind = "integer"
            else:
                kind = "float"
            self.store.create_payload_index(self.collection, key, kind)

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
        options = MatchOptions(k, thresholds, fusion, None, filter, exclude_ids)
        return self.match_vectors([self.encode_query(title, image, phash)], options)[0]

    def match_vectors(
        self,
        queries: Sequence[Mapping[str, Vector]],
        options: MatchOptions | None = None,
        filters: Sequence[FilterSpec | None] | None = None,
    ) -> list[list[Match]]:
        """Match many already-encoded queries in one engine batch; one list per query.

        `filters`, when given, holds one filter per query (replacing `options.filter`): whole-
        catalog matching restricts each product's matches relative to its own payload.
        A query with no vector among the requested modalities gets an empty list.
        """
        self.check_encoders()
        options = options or MatchOptions()
        thresholds = prefetch_thresholds(self.settings, options)
        wanted = set(options.modalities or MODALITIES)
        queries = [{m: v for m, v in q.items() if m in wanted} for q in queries]
        searchable = [i for i, q in enumerate(queries) if q]
        fused = [
            self.fused_request(queries[i], options, filters[i] if filters else None)
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
        self, product_ids: Sequence[str], options: MatchOptions | None = None
    ) -> list[list[Match]]:
        """Match catalog products against the catalog, using their stored vectors.

        Each product finds itself (as in the Shopee task) unless excluded. Products absent from
        the collection get an empty list.
        """
        stored = {p.product_id: p.vectors for p in self.products(product_ids, with_vectors=True)}
        vectors = [stored.get(p, {}) for p in product_ids]
        present = [i for i, v in enumerate(vectors) if v]
        results = self.match_vectors([vectors[i] for i in present], options)
        out: list[list[Match]] = [[] for _ in product_ids]
        for i, result in zip(present, results, strict=True):
            out[i] = result
        return out

    def fused_request(
        self,
        vectors: Mapping[str, Vector],
        options: MatchOptions | None = None,
        query_filter: FilterSpec | None = None,
    ) -> FusedQuery:
        """The one engine request `match_vectors` sends for a query's vectors (for benchmarks
        that time the engine alone)."""
        options = options or MatchOptions()
        return fused_query(
            self.settings,
            vectors,
            prefetch_thresholds(self.settings, options),
            options,
            query_filter,
            tuple(point_id(p) for p in options.exclude_ids),
            self._hnsw_ef(),
        )

    def modality_scores(
        self, vectors: Mapping[str, Vector], product_ids: Sequence[str]
    ) -> dict[str, dict[str, float]]:
        """The engine's exact score of each of `product_ids` for each query vector (no kNN over
        the catalog): modality -> product id -> score, for the products that have that vector."""
        self.check_encoders()
        points = {point_id(p): p for p in product_ids}
        requests = [ScoreRequest(m, v, tuple(points)) for m, v in vectors.items()]
        results = self.store.score_batch(self.collection, requests)
        return {
            request.modality: {points[pid]: score for pid, score in result.items()}
            for request, result in zip(requests, results, strict=True)
        }

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


def _product(point: StoredPoint) -> Product:
    payload = point.payload
    return Product(str(payload.get("product_id", point.point_id)), payload, point.vectors)


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
