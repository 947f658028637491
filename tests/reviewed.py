"""A small catalog the pair model decides, for the review tests: the generated listings
(`generated.py`) with a perceptual hash each, so the collection has the shipped pair model's
modalities (text, chars, phash) and every candidate pair gets a probability.

The hashes are made to leave some pairs in doubt: most listings carry their product's photo
hash with a few bits flipped, some a photo of their own, and every other product's photo looks
like its neighbour's (a product line shot the same way).
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

from prodsearch.catalog import read_catalog
from prodsearch.index import Index
from prodsearch.ingest import ingest_catalog
from prodsearch.recipes import load_recipe

from .generated import listings


def _flip(value: int, bits: int, rng: random.Random) -> int:
    for position in rng.sample(range(64), bits):
        value ^= 1 << position
    return value


def write_phash_catalog(path: Path, n_groups: int = 30, seed: int = 0) -> pd.DataFrame:
    """Write `id,title,image_phash,price,group` for `n_groups` generated products; return it."""
    rng = random.Random(seed)
    photos: dict[int, int] = {}
    for group in range(n_groups):
        photos[group] = _flip(photos[group - 1], 10, rng) if group % 2 else rng.getrandbits(64)
    rows = []
    for item in listings(n_groups, seed):
        if rng.random() < 0.25:
            phash = rng.getrandbits(64)
        else:
            phash = _flip(photos[item.group], rng.randrange(0, 9), rng)
        rows.append((item.product_id, item.title, f"{phash:016x}", item.price, item.group))
    frame = pd.DataFrame(rows, columns=["id", "title", "image_phash", "price", "group"])
    frame.to_csv(path, index=False)
    return frame


def ingest_phash_catalog(index: Index, folder: Path, n_groups: int = 30) -> pd.DataFrame:
    """Write the catalog into `folder` and ingest it into `index`; returns the catalog."""
    frame = write_phash_catalog(folder / "catalog.csv", n_groups)
    ingest_catalog(index, read_catalog(folder / "catalog.csv", load_recipe("generic")))
    return frame
