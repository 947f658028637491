"""The embedded backend: Qdrant Edge, one shard per collection in a directory on disk.

Layout: `<root>/<collection>/manifest.json` (written first, atomically) and
`<root>/<collection>/shard/` (the engine's segments and write-ahead log).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import qdrant_edge as qe

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
_DISTANCES = {"cosine": qe.Distance.Cosine, "dot": qe.Distance.Dot}
#: a binary code's vector parameters (`VectorSpec.binary`): no HNSW graph (m 0; the other two
#: fields are required and unused), 1-bit quantization
_BINARY_CODE: dict[str, Any] = {
    "hnsw_config": qe.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10000),
    "quantization_config": qe.BinaryQuantizationConfig(always_ram=True),
}
_DATATYPES = {
    "float16": qe.VectorStorageDatatype.Float16,
    "float32": qe.VectorStorageDatatype.Float32,
}
#: How new collections store their dense vectors. float16 halves the vectors' RAM and disk with
#: no measured recall loss (see QDRANT.md, "Scale"); it applies to collections created from now on.
DEFAULT_DENSE_DATATYPE = "float16"


#: the file a process holds an exclusive lock on while it has the collection's shard open
LOCK_FILE = "prodsearch.lock"


def _engine_call(what: str, call: Callable[[], T]) -> T:
    """Run an engine call, turning its bare exceptions into the project's errors."""
    try:
        return call()
    except Exception as exc:  # Edge raises bare Exception with a message
        message = str(exc)
        # A shard opened by a program that does not take LOCK_FILE: the engine's own WAL lock.
        if "WouldBlock" in message:
            raise StoreLockedError(
                f"{what}: the store is open in another process ({message}); "
                "close it or use a Qdrant server for concurrent access"
            ) from exc
        raise StoreError(f"{what}: {message}") from exc


def _lock_collection(directory: Path) -> int:
    """Take the exclusive lock of a collection's directory; return its file descriptor.

    Raises StoreLockedError while another process (or another store object of this one) has
    the collection open: the engine admits one writer per shard, and this says so before it is
    asked, in words that do not depend on its messages.
    """
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise StoreLockedError(
            f"collection {directory.name!r} in {directory.parent} is open in another process "
            "(an ingest, dedup or `prodsearch serve` on the same store?): wait for it or stop "
            "it, or run a Qdrant server (--store http://...) for concurrent access"
        ) from exc
    return fd


def to_edge_vector(vector: Vector) -> Any:
    """Convert a project vector into the Edge binding's form."""
    if isinstance(vector, SparseVec):
        return qe.SparseVector(vector.indices.tolist(), vector.values.tolist())
    return np.asarray(vector, dtype=np.float32).tolist()


def from_edge_vector(vector: Any) -> Vector:
    """Convert an Edge vector back into a project vector."""
    if isinstance(vector, qe.SparseVector):
        return SparseVec(
            np.asarray(vector.indices, np.int64), np.asarray(vector.values, np.float32)
        )
    return np.asarray(vector, dtype=np.float32)


def _condition(condition: Condition) -> Any:
    if condition.range is not None:
        r = condition.range
        return qe.FieldCondition(
            key=condition.key, range=qe.RangeFloat(gt=r.gt, gte=r.gte, lt=r.lt, lte=r.lte)
        )
    if condition.any is not None:
        return qe.FieldCondition(key=condition.key, match=qe.MatchAny(condition.any))
    return qe.FieldCondition(key=condition.key, match=qe.MatchValue(condition.value))


def edge_filter(spec: FilterSpec | None, exclude_point_ids: Sequence[str] = ()) -> Any:
    """Translate a FilterSpec (+ excluded point ids) into an Edge Filter, or None."""
    must = [_condition(c) for c in spec.must] if spec else []
    must_not = [_condition(c) for c in spec.must_not] if spec else []
    if exclude_point_ids:
        must_not.append(qe.HasIdCondition(set(exclude_point_ids)))
    if not must and not must_not:
        return None
    return qe.Filter(must=must or None, must_not=must_not or None)


def _fusion_query(fusion: Fusion, modalities: Sequence[str]) -> Any:
    if fusion.method == "rrf":
        return qe.Fusion.Rrf(k=fusion.rrf_k)
    if fusion.method == "dbsf":
        return qe.Fusion.Dbsf()
    terms = [
        qe.Expression.Mult(
            [
                qe.Expression.Constant(fusion.weights.get(m, 1.0)),
                qe.Expression.Variable(f"$score[{i}]"),
            ]
        )
        for i, m in enumerate(modalities)
    ]
    defaults = {f"$score[{i}]": 0.0 for i in range(len(modalities))}
    return qe.Formula(qe.Expression.Sum(terms), defaults=defaults)


def edge_request(query: FusedQuery) -> qe.QueryRequest:
    """Translate a FusedQuery into one Edge QueryRequest."""
    params = qe.SearchParams(hnsw_ef=query.hnsw_ef, exact=query.exact)
    flt = edge_filter(query.filter, query.exclude_point_ids)
    prefetches = [
        qe.Prefetch(
            limit=p.limit,
            query=qe.Query.Nearest(to_edge_vector(p.vector), using=p.modality),
            score_threshold=p.threshold,
            filter=flt,
            params=params,
            prefetches=None
            if p.candidates is None
            else [
                qe.Prefetch(
                    limit=p.candidate_limit,
                    query=qe.Query.Nearest(to_edge_vector(p.candidates), using=p.modality),
                    filter=flt,
                    params=params,
                )
            ],
        )
        for p in query.prefetches
    ]
    root_threshold = query.fusion.min_fused_score if query.fusion.method == "formula" else None
    return qe.QueryRequest(
        limit=query.limit,
        prefetches=prefetches,
        query=_fusion_query(query.fusion, [p.modality for p in query.prefetches]),
        filter=flt,
        score_threshold=root_threshold,
        with_payload=True,
    )


class EdgeStore(Store):
    """Collections as Qdrant Edge shards under a root directory."""

    def __init__(self, root: str | Path, dense_datatype: str = DEFAULT_DENSE_DATATYPE) -> None:
        if dense_datatype not in _DATATYPES:
            raise StoreError(
                f"unknown dense_datatype {dense_datatype!r}; known: {sorted(_DATATYPES)}"
            )
        self.root = Path(root)
        self.location = str(self.root)
        #: storage type of the dense vectors of the collections this store creates
        self.dense_datatype = dense_datatype
        self._shards: dict[str, qe.EdgeShard] = {}
        #: the lock file descriptor of every collection whose shard this store has open
        self._locks: dict[str, int] = {}

    def _dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise StoreError(
                f"invalid collection name {name!r}: a collection of an embedded store is a "
                "folder, so its name must be non-empty, without '/', and not start with '.'"
            )
        return self.root / name

    def has_collection(self, name: str) -> bool:
        """Return True when the collection's manifest exists."""
        return (self._dir(name) / "manifest.json").is_file()

    def create_collection(self, name: str, manifest: Manifest) -> None:
        """Write the manifest, then create the shard with its named vectors."""
        directory = self._dir(name)
        if self.has_collection(name):
            raise StoreError(f"collection {name!r} already exists in {self.root}")
        directory.mkdir(parents=True, exist_ok=True)
        temporary = directory / "manifest.json.tmp"
        temporary.write_text(json.dumps(manifest.as_dict(), indent=2), encoding="utf-8")
        os.replace(temporary, directory / "manifest.json")
        self._shard(name)

    def create_payload_index(self, name: str, field: str, kind: str) -> None:
        """Index a payload field in the shard (idempotent)."""
        schema = {
            "keyword": qe.PayloadSchemaType.Keyword,
            "integer": qe.PayloadSchemaType.Integer,
            "float": qe.PayloadSchemaType.Float,
        }[kind]
        shard = self._shard(name)
        _engine_call(
            "create payload index",
            lambda: shard.update(qe.UpdateOperation.create_field_index(field, schema)),
        )

    def delete_collection(self, name: str) -> None:
        """Close the collection's shard and remove its directory; raises StoreLockedError
        while another process has it open (its files are not removed under it)."""
        self._close_shard(name)
        directory = self._dir(name)
        if not directory.is_dir():
            return
        lock = _lock_collection(directory)
        try:
            shutil.rmtree(directory, ignore_errors=True)
        finally:
            os.close(lock)

    def _close_shard(self, name: str) -> None:
        shard = self._shards.pop(name, None)
        try:
            if shard is not None:
                _engine_call("close", shard.close)
        finally:
            lock = self._locks.pop(name, None)
            if lock is not None:
                os.close(lock)  # releases the lock

    def manifest(self, name: str) -> Manifest:
        """Return the collection's manifest; raises CollectionNotFoundError."""
        path = self._dir(name) / "manifest.json"
        if not path.is_file():
            raise CollectionNotFoundError(
                f"collection {name!r} not found in store {self.root}; run `prodsearch ingest` first"
            )
        return Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def _shard(self, name: str) -> qe.EdgeShard:
        if name in self._shards:
            return self._shards[name]
        manifest = self.manifest(name)
        lock = _lock_collection(self._dir(name))
        try:
            shard = self._open_shard(self._dir(name) / "shard", manifest)
        except BaseException:
            os.close(lock)
            raise
        self._shards[name], self._locks[name] = shard, lock
        return shard

    def _open_shard(self, shard_dir: Path, manifest: Manifest) -> qe.EdgeShard:
        config = self._config(manifest, self.dense_datatype)
        # A crash between manifest and shard creation leaves no segments: finish the creation.
        if shard_dir.is_dir() and any(shard_dir.iterdir()):
            return _engine_call(f"open {shard_dir}", lambda: qe.EdgeShard.load(str(shard_dir)))
        shard_dir.mkdir(parents=True, exist_ok=True)
        shard = _engine_call(
            f"create {shard_dir}", lambda: qe.EdgeShard.create(str(shard_dir), config)
        )
        _engine_call(
            "create payload index",
            lambda: shard.update(
                qe.UpdateOperation.create_field_index("product_id", qe.PayloadSchemaType.Keyword)
            ),
        )
        return shard

    @staticmethod
    def _config(manifest: Manifest, dense_datatype: str) -> qe.EdgeConfig:
        dense = {
            s.name: qe.EdgeVectorParams(
                size=s.dim,
                distance=_DISTANCES[s.distance],
                datatype=_DATATYPES[dense_datatype],
                **(_BINARY_CODE if s.binary else {}),
            )
            for s in manifest.specs()
            if s.dim is not None
        }
        sparse = {
            s.name: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)
            for s in manifest.specs()
            if s.dim is None
        }
        return qe.EdgeConfig(vectors=dense, sparse_vectors=sparse or None)

    def upsert(self, name: str, points: Sequence[PointRecord]) -> None:
        """Upsert points; each point's vectors and payload land together."""
        if not points:
            return
        edge_points = [
            qe.Point(p.point_id, {k: to_edge_vector(v) for k, v in p.vectors.items()}, p.payload)
            for p in points
        ]
        shard = self._shard(name)
        _engine_call("upsert", lambda: shard.update(qe.UpdateOperation.upsert_points(edge_points)))

    def set_payload(self, name: str, point_ids: Sequence[str], payload: dict[str, Any]) -> None:
        """Merge `payload`'s keys into the points' payloads."""
        if point_ids:
            shard = self._shard(name)
            operation = qe.UpdateOperation.set_payload(list(point_ids), payload)
            _engine_call("set payload", lambda: shard.update(operation))

    def delete(self, name: str, point_ids: Sequence[str]) -> None:
        """Delete points by id."""
        if point_ids:
            shard = self._shard(name)
            _engine_call(
                "delete", lambda: shard.update(qe.UpdateOperation.delete_points(list(point_ids)))
            )

    def retrieve(
        self, name: str, point_ids: Sequence[str], with_vectors: bool = False
    ) -> list[StoredPoint]:
        """Return the stored points among `point_ids`."""
        if not point_ids:
            return []
        shard = self._shard(name)
        records = _engine_call(
            "retrieve", lambda: shard.retrieve(list(point_ids), True, with_vectors)
        )
        return [self._stored(r) for r in records]

    def scroll(
        self, name: str, offset: str | None, limit: int, with_vectors: bool = False
    ) -> tuple[list[StoredPoint], str | None]:
        """Return a page of points and the next offset."""
        shard = self._shard(name)
        request = qe.ScrollRequest(
            offset=offset, limit=limit, with_payload=True, with_vector=with_vectors
        )
        records, next_offset = _engine_call("scroll", lambda: shard.scroll(request))
        return [self._stored(r) for r in records], (
            None if next_offset is None else str(next_offset)
        )

    @staticmethod
    def _stored(record: Any) -> StoredPoint:
        vectors = record.vector if isinstance(record.vector, dict) else {}
        return StoredPoint(
            point_id=str(record.id),
            payload=dict(record.payload or {}),
            vectors={k: from_edge_vector(v) for k, v in vectors.items()},
        )

    def count(self, name: str, exact: bool = True) -> int:
        """Return the number of points (`exact=False`: the engine's cheap estimate)."""
        shard = self._shard(name)
        return int(_engine_call("count", lambda: shard.count(qe.CountRequest(exact=exact))))

    def build_index(self, name: str) -> None:
        """Run the optimizers (HNSW build); Edge does no background indexing."""
        shard = self._shard(name)
        _engine_call("optimize", shard.optimize)

    def query_batch(self, name: str, queries: Sequence[FusedQuery]) -> list[list[Hit]]:
        """Run the fused queries as one planned Edge batch."""
        if not queries:
            return []
        shard = self._shard(name)
        request = qe.QueryBatchRequest([edge_request(q) for q in queries])
        results = _engine_call("query", lambda: shard.query_batch(request))
        return [
            [Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in points]
            for points in results
        ]

    def score_batch(self, name: str, requests: Sequence[ScoreRequest]) -> list[dict[str, float]]:
        """Exact scores of each request's vector against its listed points only."""
        wanted = [r for r in requests if r.point_ids]
        if not wanted:
            return [{} for _ in requests]
        shard = self._shard(name)
        batch = qe.QueryBatchRequest(
            [
                qe.QueryRequest(
                    limit=len(r.point_ids),
                    query=qe.Query.Nearest(to_edge_vector(r.vector), using=r.modality),
                    filter=qe.Filter(must=[qe.HasIdCondition(set(r.point_ids))]),
                    params=qe.SearchParams(exact=True),
                    with_payload=False,
                )
                for r in wanted
            ]
        )
        results = iter(_engine_call("score", lambda: shard.query_batch(batch)))
        return [
            {str(p.id): float(p.score) for p in next(results)} if r.point_ids else {}
            for r in requests
        ]

    def close(self) -> None:
        """Flush and close every open shard, and release their locks."""
        while self._shards:
            self._close_shard(next(iter(self._shards)))
