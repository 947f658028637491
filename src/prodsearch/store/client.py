"""The server backend: qdrant-client against a Qdrant server or cluster by URL, or its local mode.

The manifest is the collection's own `metadata`, written in the same call that creates it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from prodsearch.encoders.base import SparseVec, Vector
from prodsearch.errors import CollectionNotFoundError, StoreError, StoreLockedError
from prodsearch.filters import Condition, FilterSpec
from prodsearch.store.base import (
    FusedQuery,
    Fusion,
    Hit,
    Manifest,
    PointRecord,
    ScoreRequest,
    Store,
    StoredPoint,
)

T = TypeVar("T")
_DISTANCES = {"cosine": models.Distance.COSINE, "dot": models.Distance.DOT}
_DATATYPES = {"float16": models.Datatype.FLOAT16, "float32": models.Datatype.FLOAT32}
#: a binary code's vector parameters (`VectorSpec.binary`): no HNSW graph, 1-bit quantization
_BINARY_CODE: dict[str, Any] = {
    "hnsw_config": models.HnswConfigDiff(m=0),
    "quantization_config": models.BinaryQuantization(
        binary=models.BinaryQuantizationConfig(always_ram=True)
    ),
}
#: How new collections store their dense vectors on a server: float16 halves the vectors' RAM and
#: disk with no measured recall loss (QDRANT.md, "Scale"). Local mode records it but stores float32.
DEFAULT_DENSE_DATATYPE = "float16"


def _engine_call(what: str, call: Callable[[], T]) -> T:
    try:
        return call()
    except (UnexpectedResponse, ResponseHandlingException, ValueError, KeyError) as exc:
        raise StoreError(f"{what}: {exc}") from exc


def to_client_vector(vector: Vector) -> Any:
    """Convert a project vector into qdrant-client's form."""
    if isinstance(vector, SparseVec):
        return models.SparseVector(indices=vector.indices.tolist(), values=vector.values.tolist())
    return np.asarray(vector, dtype=np.float32).tolist()


def from_client_vector(vector: Any) -> Vector:
    """Convert a qdrant-client vector back into a project vector."""
    if isinstance(vector, models.SparseVector):
        return SparseVec(
            np.asarray(vector.indices, np.int64), np.asarray(vector.values, np.float32)
        )
    return np.asarray(vector, dtype=np.float32)


def _condition(condition: Condition) -> models.FieldCondition:
    if condition.range is not None:
        return models.FieldCondition(
            key=condition.key, range=models.Range(**condition.range.model_dump())
        )
    if condition.any is not None:
        return models.FieldCondition(key=condition.key, match=models.MatchAny(any=condition.any))
    return models.FieldCondition(key=condition.key, match=models.MatchValue(value=condition.value))


def client_filter(spec: FilterSpec | None, exclude_point_ids: Sequence[str] = ()) -> Any:
    """Translate a FilterSpec (+ excluded point ids) into a qdrant-client Filter, or None."""
    must: list[Any] = [_condition(c) for c in spec.must] if spec else []
    must_not: list[Any] = [_condition(c) for c in spec.must_not] if spec else []
    if exclude_point_ids:
        must_not.append(models.HasIdCondition(has_id=list(exclude_point_ids)))
    if not must and not must_not:
        return None
    return models.Filter(must=must or None, must_not=must_not or None)


def _fusion_query(fusion: Fusion, modalities: Sequence[str]) -> Any:
    if fusion.method == "rrf":
        return models.RrfQuery(rrf=models.Rrf(k=fusion.rrf_k))
    if fusion.method == "dbsf":
        return models.FusionQuery(fusion=models.Fusion.DBSF)
    terms = [
        models.MultExpression(mult=[fusion.weights.get(m, 1.0), f"$score[{i}]"])
        for i, m in enumerate(modalities)
    ]
    return models.FormulaQuery(
        formula=models.SumExpression(sum=terms),
        defaults={f"$score[{i}]": 0.0 for i in range(len(modalities))},
    )


def client_request(query: FusedQuery) -> models.QueryRequest:
    """Translate a FusedQuery into one qdrant-client QueryRequest."""
    params = models.SearchParams(hnsw_ef=query.hnsw_ef, exact=query.exact)
    flt = client_filter(query.filter, query.exclude_point_ids)
    prefetches = [
        models.Prefetch(
            query=to_client_vector(p.vector),
            using=p.modality,
            limit=p.limit,
            score_threshold=p.threshold,
            filter=flt,
            params=params,
            prefetch=None
            if p.candidates is None
            else models.Prefetch(
                query=to_client_vector(p.candidates),
                using=p.modality,
                limit=p.candidate_limit,
                filter=flt,
                params=params,
            ),
        )
        for p in query.prefetches
    ]
    root_threshold = query.fusion.min_fused_score if query.fusion.method == "formula" else None
    return models.QueryRequest(
        prefetch=prefetches,
        query=_fusion_query(query.fusion, [p.modality for p in query.prefetches]),
        filter=flt,
        limit=query.limit,
        score_threshold=root_threshold,
        with_payload=True,
    )


class ClientStore(Store):
    """Collections in a Qdrant server/cluster (`url`) or in qdrant-client's local mode (`path`)."""

    def __init__(
        self,
        url: str | None = None,
        path: str | None = None,
        api_key: str | None = None,
        collection_params: Mapping[str, int] | None = None,
        dense_datatype: str = DEFAULT_DENSE_DATATYPE,
    ):
        if dense_datatype not in _DATATYPES:
            raise StoreError(
                f"unknown dense_datatype {dense_datatype!r}; known: {sorted(_DATATYPES)}"
            )
        #: storage type of the dense vectors of the collections this store creates
        self.dense_datatype = dense_datatype
        self.location = url or (f"local:{path}" if path else ":memory:")
        self.remote = url is not None
        # Sharding and replication of the collections this store creates (a cluster's concern).
        self.collection_params = dict(collection_params or {})
        try:
            if url:
                self.client = QdrantClient(url=url, api_key=api_key, timeout=60)
            elif path:
                self.client = QdrantClient(path=path)
            else:
                self.client = QdrantClient(":memory:")
        except RuntimeError as exc:
            raise StoreLockedError(f"{self.location}: {exc}") from exc

    def has_collection(self, name: str) -> bool:
        """Return True when the collection exists."""
        return bool(_engine_call("collection_exists", lambda: self.client.collection_exists(name)))

    def create_collection(self, name: str, manifest: Manifest) -> None:
        """Create the collection with its vectors and manifest (metadata) in one call."""
        dense = {
            s.name: models.VectorParams(
                size=s.dim,
                distance=_DISTANCES[s.distance],
                datatype=_DATATYPES[self.dense_datatype],
                **(_BINARY_CODE if s.binary else {}),
            )
            for s in manifest.specs()
            if s.dim is not None
        }
        sparse = {
            s.name: models.SparseVectorParams(modifier=models.Modifier.IDF)
            for s in manifest.specs()
            if s.dim is None
        }
        _engine_call(
            "create collection",
            lambda: self.client.create_collection(
                name,
                vectors_config=dense,
                sparse_vectors_config=sparse,
                metadata=manifest.as_dict(),
                **self.collection_params,
            ),
        )
        _engine_call(
            "create payload index",
            lambda: self.client.create_payload_index(
                name, "product_id", models.PayloadSchemaType.KEYWORD
            ),
        )

    def create_payload_index(self, name: str, field: str, kind: str) -> None:
        """Index a payload field (a no-op in local mode, which has no payload indexes)."""
        schema = {
            "keyword": models.PayloadSchemaType.KEYWORD,
            "integer": models.PayloadSchemaType.INTEGER,
            "float": models.PayloadSchemaType.FLOAT,
        }[kind]
        _engine_call(
            "create payload index",
            lambda: self.client.create_payload_index(name, field, schema, wait=True),
        )

    def delete_collection(self, name: str) -> None:
        """Delete the collection."""
        if self.has_collection(name):
            _engine_call("delete collection", lambda: self.client.delete_collection(name))

    def manifest(self, name: str) -> Manifest:
        """Return the collection's manifest; raises CollectionNotFoundError."""
        if not self.has_collection(name):
            raise CollectionNotFoundError(
                f"collection {name!r} not found at {self.location}; run `prodsearch ingest` first"
            )
        info = _engine_call("get collection", lambda: self.client.get_collection(name))
        metadata = info.config.metadata or {}
        if "encoders" not in metadata:
            raise StoreError(
                f"collection {name!r} at {self.location} was not created by prodsearch"
            )
        return Manifest.from_dict(metadata)

    def upsert(self, name: str, points: Sequence[PointRecord]) -> None:
        """Upsert points and wait until they are applied."""
        if not points:
            return
        structs = [
            models.PointStruct(
                id=p.point_id,
                vector={k: to_client_vector(v) for k, v in p.vectors.items()},
                payload=p.payload,
            )
            for p in points
        ]
        _engine_call("upsert", lambda: self.client.upsert(name, structs, wait=True))

    def set_payload(self, name: str, point_ids: Sequence[str], payload: dict[str, Any]) -> None:
        """Merge `payload`'s keys into the points' payloads and wait until applied."""
        if point_ids:
            selector = models.PointIdsList(points=list(point_ids))
            _engine_call(
                "set payload",
                lambda: self.client.set_payload(name, payload, points=selector, wait=True),
            )

    def delete(self, name: str, point_ids: Sequence[str]) -> None:
        """Delete points by id."""
        if point_ids:
            selector = models.PointIdsList(points=list(point_ids))
            _engine_call("delete", lambda: self.client.delete(name, selector, wait=True))

    def retrieve(
        self, name: str, point_ids: Sequence[str], with_vectors: bool = False
    ) -> list[StoredPoint]:
        """Return the stored points among `point_ids`."""
        if not point_ids:
            return []
        records = _engine_call(
            "retrieve",
            lambda: self.client.retrieve(
                name, list(point_ids), with_payload=True, with_vectors=with_vectors
            ),
        )
        return [self._stored(r) for r in records]

    def scroll(
        self, name: str, offset: str | None, limit: int, with_vectors: bool = False
    ) -> tuple[list[StoredPoint], str | None]:
        """Return a page of points and the next offset."""
        records, next_offset = _engine_call(
            "scroll",
            lambda: self.client.scroll(
                name, limit=limit, offset=offset, with_payload=True, with_vectors=with_vectors
            ),
        )
        return [self._stored(r) for r in records], (
            None if next_offset is None else str(next_offset)
        )

    @staticmethod
    def _stored(record: Any) -> StoredPoint:
        vectors = record.vector if isinstance(record.vector, dict) else {}
        return StoredPoint(
            point_id=str(record.id),
            payload=dict(record.payload or {}),
            vectors={k: from_client_vector(v) for k, v in vectors.items()},
        )

    def count(self, name: str, exact: bool = True) -> int:
        """Return the number of points (`exact=False`: the engine's cheap estimate)."""
        return int(_engine_call("count", lambda: self.client.count(name, exact=exact).count))

    def build_index(self, name: str) -> None:
        """Nothing to do: a server indexes in the background and local mode has no index."""

    def query_batch(self, name: str, queries: Sequence[FusedQuery]) -> list[list[Hit]]:
        """Run the fused queries with one query_batch_points call."""
        if not queries:
            return []
        requests = [client_request(q) for q in queries]
        responses = _engine_call(
            "query", lambda: self.client.query_batch_points(name, requests=requests)
        )
        return [
            [Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in response.points]
            for response in responses
        ]

    def score_batch(self, name: str, requests: Sequence[ScoreRequest]) -> list[dict[str, float]]:
        """Exact scores of each request's vector against its listed points only."""
        wanted = [r for r in requests if r.point_ids]
        if not wanted:
            return [{} for _ in requests]
        batch = [
            models.QueryRequest(
                query=to_client_vector(r.vector),
                using=r.modality,
                filter=models.Filter(must=[models.HasIdCondition(has_id=list(r.point_ids))]),
                limit=len(r.point_ids),
                params=models.SearchParams(exact=True),
                with_payload=False,
            )
            for r in wanted
        ]
        responses = iter(
            _engine_call("score", lambda: self.client.query_batch_points(name, requests=batch))
        )
        return [
            {str(p.id): float(p.score) for p in next(responses).points} if r.point_ids else {}
            for r in requests
        ]

    def close(self) -> None:
        """Close the client (releases the local-mode lock)."""
        self.client.close()
