"""prodsearch: find the same product elsewhere in a catalog, by title and/or image.

    from prodsearch import match, Index
    hits = match(title="Double Tape 3M VHB 12 mm x 4,5 m")

Heavy parts (torch, the models, the engine) load on first use, not on import.
"""

from __future__ import annotations

import os
from importlib import import_module
from typing import TYPE_CHECKING, Any

# OpenMP threads (LightGBM's, torch's) that finish their work wait for the next by spinning on a
# core. On a machine whose cores are shared (2 cores, other jobs) that spinning starves the
# threads doing the work: a pair-model fit measured 105 s with 2 spinning threads, 3.4 s with
# passive waiting, 7.6 s on 1 thread. Set before any OpenMP runtime starts; a user's own value
# wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

__all__ = [
    "CatalogError",
    "CollectionNotFoundError",
    "ConfigError",
    "EncoderMismatchError",
    "ImageError",
    "Index",
    "Match",
    "ProdsearchError",
    "Settings",
    "StoreError",
    "StoreLockedError",
    "match",
]

_LOCATIONS = {
    "Index": "prodsearch.index",
    "Match": "prodsearch.index",
    "match": "prodsearch.index",
    "Settings": "prodsearch.settings",
    **{
        name: "prodsearch.errors"
        for name in (
            "CatalogError",
            "CollectionNotFoundError",
            "ConfigError",
            "EncoderMismatchError",
            "ImageError",
            "ProdsearchError",
            "StoreError",
            "StoreLockedError",
        )
    },
}

if TYPE_CHECKING:
    from prodsearch.errors import (
        CatalogError,
        CollectionNotFoundError,
        ConfigError,
        EncoderMismatchError,
        ImageError,
        ProdsearchError,
        StoreError,
        StoreLockedError,
    )
    from prodsearch.index import Index, Match, match
    from prodsearch.settings import Settings


def __getattr__(name: str) -> Any:
    if name in _LOCATIONS:
        return getattr(import_module(_LOCATIONS[name]), name)
    raise AttributeError(f"module 'prodsearch' has no attribute {name!r}")
