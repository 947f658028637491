"""A generated, redistributable labelled catalog: product titles in groups, for the tests that must
run without the shared data (every user's machine).

Each group is one product (brand, kind, model code, size, colour); its listings are variants of
its title as different shops write it: word order, case, a dropped word, a typo, a shop suffix.
Neighbouring groups share brand and kind and differ in the model code or size (hard negatives).
`labelled_catalog` adds what a marketplace catalog carries beside the title: a photo hash per
listing (so the collection has the shipped pair model's modalities: text, chars, phash), a
category, the seller and the true group as `label_group` (the Shopee column's name).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

BRANDS = ["Arla", "Oatly", "Samsung", "Philips", "Bosch", "Lenovo", "Sony", "Nikon", "Garant"]
KINDS = [
    "oat drink",
    "milk",
    "phone",
    "kettle",
    "drill",
    "laptop",
    "headphones",
    "camera lens",
    "yoghurt",
]
COLOURS = ["black", "white", "silver", "blue", "red"]
SHOPS = ["| TechShop", "- Best Price", "(free delivery)", "@ MegaStore", ""]
CATEGORIES = {
    "oat drink": "drinks",
    "milk": "dairy",
    "yoghurt": "dairy",
    "phone": "electronics",
    "laptop": "electronics",
    "headphones": "electronics",
    "camera lens": "photo",
    "kettle": "home",
    "drill": "tools",
}
SELLERS = ["TechShop", "Best Price", "MegaStore", "Corner Shop"]


@dataclass(frozen=True)
class Listing:
    """One generated product listing and the group (true product) it belongs to."""

    product_id: str
    title: str
    group: int
    price: float


def _variant(rng: random.Random, words: list[str]) -> str:
    words = list(words)
    change = rng.randrange(5)
    if change == 0 and len(words) > 3:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    elif change == 1 and len(words) > 4:
        del words[rng.randrange(1, len(words))]
    elif change == 2:
        i = rng.randrange(len(words))
        w = words[i]
        if len(w) > 3:
            j = rng.randrange(len(w) - 1)
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    elif change == 3:
        words = [w.upper() if rng.random() < 0.3 else w.lower() for w in words]
    title = " ".join(words)
    suffix = rng.choice(SHOPS)
    return f"{title} {suffix}".strip()


def listings(n_groups: int = 60, seed: int = 0) -> list[Listing]:
    """`n_groups` products with 2-4 listings each (deterministic for a seed)."""
    rng = random.Random(seed)
    out: list[Listing] = []
    for group in range(n_groups):
        brand = BRANDS[group % len(BRANDS)]
        kind = _kind(group)
        code = f"{brand[:2].upper()}-{100 + (group * 37) % 900}"
        size = rng.choice(["250ml", "1L", "1.5L", "500W", "2000W", "64GB", "128GB", "50mm"])
        colour = rng.choice(COLOURS)
        words = [brand, kind, code, size, colour]
        price = round(rng.uniform(5, 500), 2)
        for copy in range(rng.randint(2, 4)):
            title = " ".join(words) if copy == 0 else _variant(rng, words)
            out.append(
                Listing(f"g{group}-{copy}", title, group, round(price * rng.uniform(0.9, 1.1), 2))
            )
    return out


def _kind(group: int) -> str:
    return KINDS[(group // len(BRANDS)) % len(KINDS)]


def _flip(value: int, bits: int, rng: random.Random) -> int:
    for position in rng.sample(range(64), bits):
        value ^= 1 << position
    return value


def photo_hashes(items: list[Listing], n_groups: int, rng: random.Random) -> list[str]:
    """A 16-hex perceptual hash per listing, made to leave some pairs in doubt: most listings
    carry their product's photo hash with a few bits flipped, some a photo of their own, and
    every other product's photo looks like its neighbour's (a product line shot the same way)."""
    photos: dict[int, int] = {}
    for group in range(n_groups):
        photos[group] = _flip(photos[group - 1], 10, rng) if group % 2 else rng.getrandbits(64)
    hashes = []
    for item in items:
        if rng.random() < 0.25:
            phash = rng.getrandbits(64)
        else:
            phash = _flip(photos[item.group], rng.randrange(0, 9), rng)
        hashes.append(f"{phash:016x}")
    return hashes


def labelled_catalog(n_groups: int = 60, seed: int = 0) -> pd.DataFrame:
    """The generated listings as a marketplace catalog: `id,title,image_phash,price,category,
    seller,label_group` (one category per product, one seller per listing of a product)."""
    items = listings(n_groups, seed)
    hashes = photo_hashes(items, n_groups, random.Random(seed))
    return pd.DataFrame(
        {
            "id": [x.product_id for x in items],
            "title": [x.title for x in items],
            "image_phash": hashes,
            "price": [x.price for x in items],
            "category": [CATEGORIES[_kind(x.group)] for x in items],
            "seller": [SELLERS[int(x.product_id.rsplit("-", 1)[1])] for x in items],
            "label_group": [x.group for x in items],
        }
    )


def write_catalog(path: Path, n_groups: int = 60, seed: int = 0) -> pd.DataFrame:
    """Write a generated catalog as CSV (`id,title,price,group`) and return it."""
    frame = pd.DataFrame(
        [(x.product_id, x.title, x.price, x.group) for x in listings(n_groups, seed)],
        columns=["id", "title", "price", "group"],
    )
    frame.to_csv(path, index=False)
    return frame
