"""Vector stores: `open_store(location)` picks the backend from the location's form."""

from __future__ import annotations

import os

from prodsearch.store.base import (
    FusedQuery,
    Fusion,
    Hit,
    Manifest,
    ModalityQuery,
    PointRecord,
    ScoreRequest,
    Store,
    StoredPoint,
    VectorSpec,
    point_id,
)

__all__ = [
    "FusedQuery",
    "Fusion",
    "Hit",
    "Manifest",
    "ModalityQuery",
    "PointRecord",
    "ScoreRequest",
    "Store",
    "StoredPoint",
    "VectorSpec",
    "open_store",
    "point_id",
]

LOCAL_PREFIX = "local:"


def open_store(location: str) -> Store:
    """Open the store at `location`.

    - `http://...` / `https://...`: a Qdrant server or cluster (qdrant-client; API key from
      PRODSEARCH_QDRANT_API_KEY);
    - `:memory:` or `local:DIR`: qdrant-client's local mode (tests, small experiments);
    - anything else: a directory for the embedded Qdrant Edge engine (the default).
    """
    if location.startswith(("http://", "https://")):
        from prodsearch.store.client import ClientStore

        return ClientStore(url=location, api_key=os.environ.get("PRODSEARCH_QDRANT_API_KEY"))
    if location == ":memory:" or location.startswith(LOCAL_PREFIX):
        from prodsearch.store.client import ClientStore

        path = location.removeprefix(LOCAL_PREFIX) if location != ":memory:" else None
        return ClientStore(path=path)
    from prodsearch.store.edge import EdgeStore

    return EdgeStore(location)
