"""Why product B does or does not match product A, as `match` sees it (`prodsearch explain`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prodsearch.errors import ConfigError
from prodsearch.index import Index
from prodsearch.query import MatchOptions, prefetch_thresholds
from prodsearch.settings import MODALITIES


@dataclass(frozen=True)
class Explanation:
    """Every modality's score against its threshold, and B's place in A's matches."""

    product_a: str
    product_b: str
    fusion: str
    scores: dict[str, float]
    thresholds: dict[str, float]
    fired: tuple[str, ...]
    matched: bool
    rank: int | None
    fused_score: float | None

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form."""
        return dict(vars(self), fired=list(self.fired))


def explain(index: Index, product_a: str, product_b: str) -> Explanation:
    """Explain whether and why catalog product B matches product A.

    Returns the engine's score of every modality A and B share, the threshold each is compared
    with, which fired, and B's rank and fused score in A's matches (as `match` returns them).
    Raises ConfigError when either product is not in the collection.
    """
    found = {p.product_id: p for p in index.products([product_a, product_b], with_vectors=True)}
    for product in (product_a, product_b):
        if product not in found:
            raise ConfigError(f"product {product!r} is not in collection {index.collection!r}")
    vectors = found[product_a].vectors
    thresholds = prefetch_thresholds(index.settings, MatchOptions())
    scores = {
        modality: per_product[product_b]
        for modality, per_product in index.modality_scores(vectors, [product_b]).items()
        if product_b in per_product
    }
    matches = index.match_vectors([vectors], MatchOptions(k=index.settings.prefetch_limit))[0]
    rank = next((i for i, m in enumerate(matches) if m.product_id == product_b), None)
    return Explanation(
        product_a=product_a,
        product_b=product_b,
        fusion=index.settings.fusion,
        scores=scores,
        thresholds={m: thresholds[m] for m in scores},
        fired=tuple(m for m in MODALITIES if m in scores and scores[m] >= thresholds[m]),
        matched=rank is not None,
        rank=rank,
        fused_score=matches[rank].score if rank is not None else None,
    )
