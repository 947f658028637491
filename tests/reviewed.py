"""A small catalog the pair model decides, for the review tests: the generated listings
(`generated.py`) with a perceptual hash each, so the collection has the shipped pair model's
modalities (text, chars, phash) and every candidate pair gets a probability.

The hashes are made to leave some pairs in doubt (`generated.photo_hashes`).
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

from prodsearch.catalog import read_catalog
from prodsearch.index import Index
from prodsearch.ingest import ingest_catalog
from prodsearch.recipes import load_recipe

from .generated import listings, photo_hashes


def write_phash_catalog(path: Path, n_groups: int = 30, seed: int = 0) -> pd.DataFrame:
    """Write `id,title,image_phash,price,group` for `n_groups` generated products; return it."""
    items = listings(n_groups, seed)
    hashes = photo_hashes(items, n_groups, random.Random(seed))
    rows = [
        (item.product_id, item.title, phash, item.price, item.group)
        for item, phash in zip(items, hashes, strict=True)
    ]
    frame = pd.DataFrame(rows, columns=["id", "title", "image_phash", "price", "group"])
    frame.to_csv(path, index=False)
    return frame


def ingest_phash_catalog(index: Index, folder: Path, n_groups: int = 30) -> pd.DataFrame:
    """Write the catalog into `folder` and ingest it into `index`; returns the catalog."""
    frame = write_phash_catalog(folder / "catalog.csv", n_groups)
    ingest_catalog(index, read_catalog(folder / "catalog.csv", load_recipe("generic")))
    return frame
