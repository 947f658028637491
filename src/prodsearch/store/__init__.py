"""Vector stores: `open_store(location)` picks the backend from the location's form."""

from __future__ import annotations

import os
from collections.abc import Mapping

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


def open_store(location: str, collection_params: Mapping[str, int] | None = None) -> Store:
    """Open the store at `location`.

    - `http://...` / `https://...`: a Qdrant server or cluster (qdrant-client; API key from
      PRODSEARCH_QDRANT_API_KEY); collections it creates get `collection_params` (shard_number,
      replication_factor, write_consistency_factor), by default those of `Settings()`;
    - `:memory:` or `local:DIR`: qdrant-client's local mode (tests, small experiments);
    - anything else: a directory for the embedded Qdrant Edge engine (the default).
    """
    if location.startswith(("http://", "https://")):
        from prodsearch.settings import Settings
        from prodsearch.store.client import ClientStore

        if collection_params is None:
            collection_params = Settings().collection_params()
        return ClientStore(
            url=location,
            api_key=os.environ.get("PRODSEARCH_QDRANT_API_KEY"),
            collection_params=collection_params,
        )
    if location == ":memory:" or location.startswith(LOCAL_PREFIX):
        from prodsearch.store.client import ClientStore

        path = location.removeprefix(LOCAL_PREFIX) if location != ":memory:" else None
        return ClientStore(path=path)
    from prodsearch.store.edge import EdgeStore

    return EdgeStore(location)
