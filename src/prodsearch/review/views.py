"""What the review page shows of a product, a pair and a cluster: plain dicts for the API.

A pair shows both products (title tokens marked where they differ, the photo's URL, payload
fields), each modality's engine score against the threshold at which it counts as fired, the
pair's probability and fused score, the current decision and the rule that made it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import pandas as pd

from prodsearch.matching.table import score_column
from prodsearch.settings import MODALITIES

#: payload keys that are bookkeeping, not something a reviewer compares
HIDDEN_FIELDS = frozenset({"product_id", "content_hash", "image_path", "image_phash", "title"})
_SPLIT = re.compile(r"(\s+)")
_EDGE_PUNCTUATION = ".,;:!?()[]{}|\"'`/+*&#@-–—"


def normalised_token(token: str) -> str:
    """A title word as titles are compared: lower case, outer punctuation dropped (`(500ml)`
    and `500ML` are one token; `XB-450` keeps its inner hyphen)."""
    return token.strip(_EDGE_PUNCTUATION).lower()


def title_tokens(title: str, other: str) -> list[dict[str, Any]]:
    """`title` as words and spaces, each word marked `differs` when the other title lacks it
    (a model number, a size, a colour the two titles do not share)."""
    theirs = {normalised_token(t) for t in other.split()}
    out = []
    for part in _SPLIT.split(title):
        if not part:
            continue
        word = "" if part.isspace() else normalised_token(part)
        out.append({"text": part, "differs": bool(word) and word not in theirs})
    return out


def product_view(
    product_id: str, payload: Mapping[str, Any], other_title: str | None = None
) -> dict[str, Any]:
    """A product as the page shows it: id, title (as marked tokens when `other_title` is given),
    the photo's URL under the app (None without one) and the visible payload fields."""
    title = str(payload.get("title") or "")
    return {
        "id": product_id,
        "title": title,
        "tokens": title_tokens(title, other_title) if other_title is not None else [],
        "image": f"/images/{product_id}" if payload.get("image_path") else None,
        "fields": {k: v for k, v in sorted(payload.items()) if k not in HIDDEN_FIELDS},
    }


def signals(row: pd.Series, fired_at: Mapping[str, float]) -> list[dict[str, Any]]:
    """Each modality the pair has a score for: the score, the threshold it counts as fired at,
    and whether it did."""
    out = []
    for modality in MODALITIES:
        score = row.get(score_column(modality))
        if score is None or math.isnan(score):
            continue
        threshold = fired_at[modality]
        out.append(
            {
                "modality": modality,
                "score": round(float(score), 4),
                "threshold": round(float(threshold), 4),
                "fired": bool(score >= threshold),
            }
        )
    return out


def pair_view(
    row: pd.Series,
    ids: list[str],
    payloads: Mapping[str, Mapping[str, Any]],
    fired_at: Mapping[str, float],
) -> dict[str, Any]:
    """A candidate pair (a row of `ReviewPairs.frame`) as the page shows it."""
    id_a, id_b = ids[int(row["a"])], ids[int(row["b"])]
    title_a = str(payloads[id_a].get("title") or "")
    title_b = str(payloads[id_b].get("title") or "")
    probability = float(row["probability"])
    return {
        "id_a": id_a,
        "id_b": id_b,
        "products": [
            product_view(id_a, payloads[id_a], title_b),
            product_view(id_b, payloads[id_b], title_a),
        ],
        "signals": signals(row, fired_at),
        "probability": None if math.isnan(probability) else round(probability, 4),
        "fused": round(float(row["fused"]), 4),
        "match": bool(row["match"]),
        "rule": str(row["rule"]),
        "pattern": str(row["pattern"]),
        "margin": round(float(row["margin"]), 4),
        "uncertain": bool(row["band"]),
    }
