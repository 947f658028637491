"""Neighbourhood blending: each product's dense vector plus its matches' vectors, each weighted
by the pair's score of that modality (the Shopee winners' trick, +0.02 F1 there).

One function serves both uses: the pair model reads the cosine of two blended vectors as a
feature, and the fusion decider searches a derived collection of blended vectors again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prodsearch.index import Product
from prodsearch.matching.table import PairTable

#: the modalities whose vectors are blended: the dense, learned ones (a sparse chars vector and
#: a perceptual hash are kept as they are)
BLENDED_MODALITIES = ("text", "charcnn", "image")


def blended_modalities(modalities: Sequence[str]) -> list[str]:
    """The modalities among `modalities` that blending changes."""
    return [m for m in modalities if m in BLENDED_MODALITIES]


def blend(table: PairTable, modality: str, vectors: np.ndarray, selected: np.ndarray) -> np.ndarray:
    """Each product's vector (row of `vectors`, in `table.ids` order; zeros where it has none)
    plus the vectors of its `selected` pairs' candidates, each weighted by the pair's score of
    `modality` (negative scores count 0); unit length (a zero row stays zero)."""
    blended = np.asarray(vectors, dtype=np.float64).copy()
    weights = np.maximum(np.nan_to_num(table.scores(modality), nan=0.0), 0.0)
    a, b = table.a[selected], table.b[selected]
    np.add.at(blended, a, weights[selected][:, None] * vectors[b])
    norms = np.linalg.norm(blended, axis=1, keepdims=True)
    return blended / np.where(norms > 0, norms, 1.0)


def dense_matrix(products: Sequence[Product], modality: str) -> np.ndarray:
    """The products' vectors of a dense modality as rows, in order (zeros where a product has
    none)."""
    width = next((len(p.vectors[modality]) for p in products if modality in p.vectors), 0)
    matrix = np.zeros((len(products), width), dtype=np.float32)
    for row, product in enumerate(products):
        if modality in product.vectors:
            matrix[row] = product.vectors[modality]
    return matrix


def blended_products(
    table: PairTable, products: Sequence[Product], selected: np.ndarray
) -> list[Product]:
    """Every product of the table (in `table.ids` order) with each of its blended modalities'
    vectors replaced by the `blend` over its `selected` pairs; other vectors and the payload as
    they are."""
    by_id = {p.product_id: p for p in products}
    ordered = [by_id[pid] for pid in table.ids]
    present = {m for p in ordered for m in p.vectors}
    blended = {
        m: blend(table, m, dense_matrix(ordered, m), selected)
        for m in blended_modalities(sorted(present))
    }
    return [
        Product(
            p.product_id,
            p.payload,
            {
                m: blended[m][row].astype(np.float32) if m in blended else v
                for m, v in p.vectors.items()
            },
        )
        for row, p in enumerate(ordered)
    ]
