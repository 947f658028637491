"""The synthetic catalog of benchmarks/bench_scale.py (see its docstring for the structure):
products with the real vectors' dimensions, 4 near-duplicate variants each, in topic groups.
Every draw is seeded by (seed, batch), so any batch or query can be rebuilt."""

from __future__ import annotations

import numpy as np

from prodsearch.encoders.base import SparseVec
from prodsearch.store import Manifest, PointRecord, point_id

DIM, PHASH_BITS = 384, 64
TOPICS, VARIANTS = 2_000, 4
PRODUCT_NOISE, VARIANT_NOISE = 1.0, 0.4  # cos(products of a topic) ~0.5, cos(variants) ~0.86
VOCAB, ZIPF_S = 30_000, 1.05
TOPIC_GRAMS, PRODUCT_GRAMS, DROP, TYPO_GRAMS = 12, 72, 0.15, 7
FLIPPED_BITS = 3
#: the collection's vectors (no encoders: the vectors are drawn, not encoded)
MANIFEST = Manifest(
    vectors={
        "text": {"dim": DIM, "distance": "cosine"},
        "chars": {"dim": None, "distance": "dot"},
        "phash": {"dim": PHASH_BITS, "distance": "dot"},
    },
    encoders={},
)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class Catalog:
    """The synthetic catalog: every draw is seeded by (seed, batch), so a batch can be rebuilt."""

    def __init__(self, seed: int, products_per_batch: int) -> None:
        self.seed = seed
        self.per_batch = products_per_batch
        rng = np.random.default_rng([seed, 0])
        self.centres = _unit(rng.normal(size=(TOPICS, DIM)))
        # Zipf 3-gram vocabulary, hashed into the chars encoder's 2**20 feature space.
        freq = 1.0 / np.arange(1, VOCAB + 1) ** ZIPF_S
        self.p_gram = freq / freq.sum()
        self.cdf = np.cumsum(self.p_gram)
        self.gram_index = rng.choice(2**20, size=VOCAB, replace=False).astype(np.int64)
        expected_df = 1.0 - np.exp(-self.p_gram * (TOPIC_GRAMS + PRODUCT_GRAMS))
        self.sqrt_idf = np.sqrt(np.log1p((1 - expected_df + 0.5 / 1e6) / (expected_df + 0.5 / 1e6)))
        self.topic_grams = self._grams(rng, (TOPICS, TOPIC_GRAMS))

    def _grams(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        return np.minimum(np.searchsorted(self.cdf, rng.random(shape)), VOCAB - 1)

    def products(self, batch: int) -> dict[str, np.ndarray]:
        """The product-level draws of one batch (its products' anchors, grams and hashes)."""
        rng = np.random.default_rng([self.seed, 1, batch])
        n = self.per_batch
        topic = rng.integers(TOPICS, size=n)
        noise = rng.normal(size=(n, DIM)).astype(np.float32) * (PRODUCT_NOISE / np.sqrt(DIM))
        anchor = _unit(self.centres[topic] + noise)
        grams = np.concatenate(
            [self.topic_grams[topic], self._grams(rng, (n, PRODUCT_GRAMS))], axis=1
        )
        bits = rng.random((n, PHASH_BITS)) < 0.5
        return {"anchor": anchor, "grams": grams, "bits": bits}

    def variants(
        self, products: dict[str, np.ndarray], rng: np.random.Generator, rows: np.ndarray
    ) -> tuple[np.ndarray, list[SparseVec], np.ndarray]:
        """One variant of each product in `rows`: text, chars and phash vectors."""
        n = len(rows)
        noise = rng.normal(size=(n, DIM)).astype(np.float32) * (VARIANT_NOISE / np.sqrt(DIM))
        text = _unit(products["anchor"][rows] + noise)
        keep = rng.random((n, TOPIC_GRAMS + PRODUCT_GRAMS)) >= DROP
        typos = self._grams(rng, (n, TYPO_GRAMS))
        chars = []
        for i, row in enumerate(rows):
            grams = np.unique(np.concatenate([products["grams"][row][keep[i]], typos[i]]))
            idx = self.gram_index[grams]
            order = np.argsort(idx)
            weights = self.sqrt_idf[grams][order]
            values = weights / np.sqrt(np.sum(weights**2 * weights**2))
            chars.append(SparseVec(idx[order], values.astype(np.float32)))
        bits = products["bits"][rows].copy()
        flips = np.argsort(rng.random((n, PHASH_BITS)), axis=1)[:, :FLIPPED_BITS]
        np.put_along_axis(bits, flips, ~np.take_along_axis(bits, flips, axis=1), axis=1)
        phash = np.where(bits, 0.125, -0.125).astype(np.float32)
        return text, chars, phash

    def batch(self, batch: int) -> list[PointRecord]:
        """The points of one batch: every variant of its products."""
        products = self.products(batch)
        rng = np.random.default_rng([self.seed, 2, batch])
        rows = np.repeat(np.arange(self.per_batch), VARIANTS)
        text, chars, phash = self.variants(products, rng, rows)
        points = []
        for i, row in enumerate(rows):
            product = batch * self.per_batch + int(row)
            pid = f"s{product}-{i % VARIANTS}"
            vectors = {"text": text[i], "chars": chars[i], "phash": phash[i]}
            payload = {"product_id": pid, "group": product, "price": float(product % 997)}
            points.append(PointRecord(point_id(pid), vectors, payload))
        return points

    def query(self, batch: int, row: int, number: int) -> dict[str, object]:
        """A new (5th) variant of product `row` of `batch`, as the query's named vectors."""
        products = self.products(batch)
        rng = np.random.default_rng([self.seed, 3, number])
        text, chars, phash = self.variants(products, rng, np.array([row]))
        return {"text": text[0], "chars": chars[0], "phash": phash[0]}


def make_queries(
    catalog: Catalog, seed: int, n: int, batches: int
) -> tuple[list[dict[str, object]], list[set[str]]]:
    """`n` queries (new variants of random products) and each one's true matches' point ids."""
    picks = np.random.default_rng([seed, 4]).integers(batches * catalog.per_batch, size=n)
    queries = [
        catalog.query(int(p) // catalog.per_batch, int(p) % catalog.per_batch, i)
        for i, p in enumerate(picks)
    ]
    return queries, [{point_id(f"s{p}-{v}") for v in range(VARIANTS)} for p in picks]
