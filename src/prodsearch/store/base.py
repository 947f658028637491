"""The store interface: one facade over the embedded engine and the client/server engine.

Backend-neutral request and result types live here; each backend translates them into its own
engine's Query API objects, so fusion always runs inside Qdrant.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from prodsearch.encoders.base import Distance, Vector
from prodsearch.errors import EncoderMismatchError
from prodsearch.filters import FilterSpec

# Fixed namespace: the same product id always maps to the same point id, in every store.
POINT_ID_NAMESPACE = uuid.UUID("6f1c2a4e-2d0b-5b8e-9a53-6b1e3f0c9d71")
MANIFEST_FORMAT = 1


def point_id(product_id: str) -> str:
    """Return the deterministic Qdrant point id (a UUID string) of a product id."""
    return str(uuid.uuid5(POINT_ID_NAMESPACE, product_id))


@dataclass(frozen=True)
class VectorSpec:
    """One named vector of a collection: dense with `dim`, or sparse (dim None, IDF modifier).

    A `binary` dense vector (a perceptual hash: each dimension +-1/8) gets no HNSW graph but 1-bit
    binary quantization: the engine compares every code (a 64-bit XOR and popcount each,
    rescored exactly), which is exact and, on Shopee's 34k phashes, faster than the graph
    (0.52 vs 0.76 ms a query) and half of the HNSW build's time at ingest's end: ties between
    identical hashes make a graph slow to build and lossy (QDRANT.md, "Scale")."""

    name: str
    dim: int | None
    distance: Distance
    binary: bool = False


@dataclass(frozen=True)
class Manifest:
    """What a collection records about itself: its vectors and the encoders that wrote them."""

    vectors: dict[str, dict[str, Any]]
    encoders: dict[str, dict[str, Any]]
    format: int = MANIFEST_FORMAT

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form."""
        return {"format": self.format, "vectors": self.vectors, "encoders": self.encoders}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Rebuild a manifest from `as_dict` output."""
        return cls(vectors=data["vectors"], encoders=data["encoders"], format=data["format"])

    def specs(self) -> list[VectorSpec]:
        """Return the collection's vector specs."""
        return [
            VectorSpec(n, v["dim"], v["distance"], bool(v.get("binary", False)))
            for n, v in self.vectors.items()
        ]

    def check_encoders(self, current: dict[str, dict[str, Any]], collection: str) -> None:
        """Raise EncoderMismatchError unless `current` equals the recorded encoders."""
        for name in sorted(set(self.encoders) | set(current)):
            recorded, now = self.encoders.get(name), current.get(name)
            if recorded != now:
                raise EncoderMismatchError(
                    f"collection {collection!r} was written by {name} encoder "
                    f"{_describe(recorded)}, "
                    f"but this process would query with {_describe(now)}. Queries would return "
                    "garbage: use the encoders that wrote it, or re-ingest into a new collection."
                )


def _describe(identity: dict[str, Any] | None) -> str:
    if identity is None:
        return "<none>"
    digest = identity.get("weights_sha256", "")[:12]
    return (
        f"{identity['name']} {identity['version']} (weights {digest or '-'}, {identity['params']})"
    )


@dataclass(frozen=True)
class PointRecord:
    """A point to upsert: its id, named vectors and payload."""

    point_id: str
    vectors: dict[str, Vector]
    payload: dict[str, Any]


@dataclass(frozen=True)
class StoredPoint:
    """A point read back from the store."""

    point_id: str
    payload: dict[str, Any]
    vectors: dict[str, Vector] = field(default_factory=dict)


@dataclass(frozen=True)
class ModalityQuery:
    """One prefetch: kNN on one named vector, keeping hits scoring >= threshold.

    With `candidates` (a cheaper query on the same named vector, e.g. a sparse vector cut to its
    rarest terms) the engine first takes the `candidate_limit` best points for `candidates`, then
    rescores them with `vector`: threshold and limit apply to the rescored (full) scores.
    """

    modality: str
    vector: Vector
    threshold: float | None
    limit: int
    candidates: Vector | None = None
    candidate_limit: int = 0


@dataclass(frozen=True)
class Fusion:
    """How the engine fuses prefetches: RRF (rank-based), DBSF (normalised scores) or a formula
    (weighted sum of raw scores, a point missing from a prefetch counting 0) with a root
    threshold on that fused score."""

    method: Literal["rrf", "dbsf", "formula"] = "rrf"
    rrf_k: int = 2
    weights: dict[str, float] = field(default_factory=dict)
    min_fused_score: float | None = None


@dataclass(frozen=True)
class FusedQuery:
    """One Query API request: a prefetch per modality, fused at the root."""

    prefetches: tuple[ModalityQuery, ...]
    fusion: Fusion
    limit: int
    filter: FilterSpec | None = None
    exclude_point_ids: tuple[str, ...] = ()
    hnsw_ef: int | None = None
    exact: bool = False


@dataclass(frozen=True)
class ScoreRequest:
    """Exact scores of one query vector against a few known points (no kNN over the catalog)."""

    modality: str
    vector: Vector
    point_ids: tuple[str, ...]


@dataclass(frozen=True)
class Hit:
    """A fused result: point id, fused score, payload."""

    point_id: str
    score: float
    payload: dict[str, Any]


class Store(ABC):
    """A Qdrant deployment holding prodsearch collections."""

    location: str
    #: a Qdrant server or cluster (its client may serve several threads at once); an embedded
    #: store is entered one thread at a time (serving.SerializedStore)
    remote: bool = False

    @abstractmethod
    def has_collection(self, name: str) -> bool:
        """Return True when the collection exists."""

    @abstractmethod
    def create_collection(self, name: str, manifest: Manifest) -> None:
        """Create a collection with the manifest's vectors and record the manifest."""

    @abstractmethod
    def create_payload_index(self, name: str, field: str, kind: str) -> None:
        """Index a payload field ("keyword", "integer" or "float") so filters on it are fast."""

    @abstractmethod
    def delete_collection(self, name: str) -> None:
        """Delete a collection and everything in it (absent collections are ignored)."""

    @abstractmethod
    def manifest(self, name: str) -> Manifest:
        """Return the collection's manifest; raises CollectionNotFoundError."""

    @abstractmethod
    def upsert(self, name: str, points: Sequence[PointRecord]) -> None:
        """Insert or replace points (all named vectors and payload of each point at once)."""

    @abstractmethod
    def set_payload(self, name: str, point_ids: Sequence[str], payload: dict[str, Any]) -> None:
        """Merge `payload`'s keys into the points' payloads (vectors and other keys kept)."""

    @abstractmethod
    def delete(self, name: str, point_ids: Sequence[str]) -> None:
        """Delete points by id (absent ids are ignored)."""

    @abstractmethod
    def retrieve(
        self, name: str, point_ids: Sequence[str], with_vectors: bool = False
    ) -> list[StoredPoint]:
        """Return the stored points among `point_ids` (absent ones are skipped)."""

    @abstractmethod
    def scroll(
        self, name: str, offset: str | None, limit: int, with_vectors: bool = False
    ) -> tuple[list[StoredPoint], str | None]:
        """Return up to `limit` points from `offset`, and the next offset (None at the end)."""

    @abstractmethod
    def count(self, name: str, exact: bool = True) -> int:
        """Return the number of points (`exact=False`: the engine's cheap estimate)."""

    @abstractmethod
    def build_index(self, name: str) -> None:
        """Build the HNSW index after a bulk load (blocking where the engine needs it)."""

    @abstractmethod
    def query_batch(self, name: str, queries: Sequence[FusedQuery]) -> list[list[Hit]]:
        """Run fused queries in one batch; one hit list per query, best first."""

    @abstractmethod
    def score_batch(self, name: str, requests: Sequence[ScoreRequest]) -> list[dict[str, float]]:
        """Return, per request, the engine's exact score of each listed point with the vector."""

    @abstractmethod
    def close(self) -> None:
        """Release the store (flush, unlock)."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
