"""Which pairs to ask about: active learning over the decided candidate-pair table.

An answer teaches the decision most where the decision is least sure: a pair whose probability
sits near the operating threshold (uncertainty sampling). Each candidate pair gets a `margin`,
its distance from the decision in the deciding score's own unit:
- where the pair model decided: `logit(p) - logit(min_probability)` (a pair whose odds of being
  a match are within a factor e of the threshold's lies in the uncertain band, |margin| <= 1);
- where the fusion decided (probability NaN): the best modality score minus its threshold, the
  margin of the "any signal fires" rule (band: within 0.1 of the threshold).

A batch is spread out two ways: a product appears at most once in it, and the pairs are taken
round robin from their signal patterns (which modalities fired, which rule decided), each
pattern most uncertain first, so one kind of near-miss cannot fill the queue. Pairs in the
uncertain band come before every pair outside it; nothing is drawn at random. While every
answer so far is one way (calibrating needs both), a batch starts with the surest pair of the
other kind.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from prodsearch.matching.table import PairTable, score_column
from prodsearch.settings import MODALITIES

#: the uncertain band: |logit(p) - logit(threshold)| within this
LOGIT_BAND = 1.0
#: the uncertain band when the fusion decided: the best modality score within this of its
#: threshold
SCORE_BAND = 0.1
EPSILON = 1e-4


@dataclass
class ReviewPairs:
    """The table's candidate pairs once each (unordered), with what the review needs of them.

    `frame` has one row per pair: `a`, `b` (positions in `ids`, a < b), `probability`, `fused`,
    `score_<m>`, `match`, `rule`, `margin`, `band` (in the uncertain band) and `pattern` (the
    signals that fired and the rule, e.g. "text+chars / pair model")."""

    ids: list[str]
    frame: pd.DataFrame
    _keys: list[frozenset[str]] = field(default_factory=list, repr=False)

    def position(self) -> dict[str, int]:
        """Product id -> position in `ids`."""
        return {pid: i for i, pid in enumerate(self.ids)}

    def find(self, id_a: str, id_b: str) -> pd.Series | None:
        """The row of a pair (either order), or None when it is not a candidate pair."""
        position = self.position()
        a, b = position.get(id_a), position.get(id_b)
        if a is None or b is None:
            return None
        low, high = min(a, b), max(a, b)
        rows = self.frame[(self.frame["a"] == low) & (self.frame["b"] == high)]
        return None if rows.empty else rows.iloc[0]

    def keys(self) -> list[frozenset[str]]:
        """Each row's unordered pair of product ids."""
        if len(self._keys) != len(self.frame):
            ids, frame = self.ids, self.frame
            self._keys = [
                frozenset((ids[a], ids[b]))
                for a, b in zip(frame["a"].tolist(), frame["b"].tolist(), strict=True)
            ]
        return self._keys


def review_pairs(
    table: PairTable, fired_at: Mapping[str, float], min_probability: float
) -> ReviewPairs:
    """The decided table's pairs once each, with their margin, band and signal pattern. Of a
    pair found in both directions, the direction with the higher fused score stands for it (the
    probability is the same both ways; a match in either direction is a match)."""
    frame = table.frame.copy()
    frame["match"] = frame["match"].astype(bool)
    low, high = np.minimum(frame["a"], frame["b"]), np.maximum(frame["a"], frame["b"])
    frame["a"], frame["b"] = low, high
    either = frame.groupby(["a", "b"])["match"].transform("any")
    frame = frame.assign(match=either).sort_values("fused", ascending=False)
    frame = frame.drop_duplicates(["a", "b"]).sort_values(["a", "b"]).reset_index(drop=True)
    present = [m for m in MODALITIES if frame[score_column(m)].notna().any()]
    margin = _margins(frame, present, fired_at, min_probability)
    uses_probability = frame["probability"].notna().to_numpy()
    band = np.where(uses_probability, LOGIT_BAND, SCORE_BAND)
    fired = [frame[score_column(m)].to_numpy() >= fired_at[m] for m in present]
    signals = [
        "+".join(m for m, hit in zip(present, row, strict=True) if hit) or "no signal"
        for row in (zip(*fired, strict=True) if fired else [()] * len(frame))
    ]
    rules = frame["rule"].replace("", "no match").tolist()
    frame = frame.assign(
        margin=margin,
        band=np.abs(margin) <= band,
        pattern=[f"{s} / {r}" for s, r in zip(signals, rules, strict=True)],
    )
    return ReviewPairs(list(table.ids), frame)


def _margins(
    frame: pd.DataFrame,
    modalities: list[str],
    fired_at: Mapping[str, float],
    min_probability: float,
) -> np.ndarray:
    probability = frame["probability"].to_numpy(dtype=np.float64)
    by_probability = _logit(probability) - _logit(np.array(min_probability))
    best = np.full(len(frame), -np.inf)
    for modality in modalities:
        scores = np.nan_to_num(frame[score_column(modality)].to_numpy(), nan=-np.inf)
        best = np.maximum(best, scores - fired_at[modality])
    by_score = np.where(np.isfinite(best), best, -1.0)
    return np.where(np.isnan(probability), by_score, by_probability)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPSILON, 1 - EPSILON)
    return np.log(p / (1 - p))


def next_batch(
    pairs: ReviewPairs,
    answered: Collection[frozenset[str]],
    size: int = 10,
    wanted_side: int = 0,
) -> list[int]:
    """The rows of `pairs.frame` to ask about next, in order: unanswered pairs, the uncertain
    band first, round robin over signal patterns (each pattern most uncertain first, patterns
    ordered by their most uncertain pair), a product at most once per batch. `wanted_side` +1
    (or -1) starts the batch with the surest match (non-match): while every answer so far is one
    way, an answer the other way is what calibration lacks, and the surest is quick to give."""
    frame = pairs.frame
    keys = pairs.keys()
    open_rows = [i for i, key in enumerate(keys) if key not in answered]
    order = frame.loc[open_rows].assign(
        distance=np.abs(frame.loc[open_rows, "margin"]), outside=~frame.loc[open_rows, "band"]
    )
    order = order.sort_values(["outside", "distance"], kind="stable")
    chosen: list[int] = []
    used: set[int] = set()
    if wanted_side and open_rows:
        surest = int((order["margin"] * wanted_side).idxmax())
        chosen.append(surest)
        used.update((int(frame.at[surest, "a"]), int(frame.at[surest, "b"])))
        order = order.drop(index=surest)
    for _, tier in order.groupby("outside", sort=True):
        queues = [list(group.index) for _, group in tier.groupby("pattern", sort=False)]
        queues.sort(key=lambda rows: float(order.loc[rows[0], "distance"]))
        while queues and len(chosen) < size:
            for rows in list(queues):
                row = _first_free(rows, frame, used)
                if row is None:
                    queues.remove(rows)
                    continue
                chosen.append(row)
                used.update((int(frame.at[row, "a"]), int(frame.at[row, "b"])))
                if len(chosen) == size:
                    return chosen
    return chosen


def _first_free(rows: list[int], frame: pd.DataFrame, used: set[int]) -> int | None:
    """Take the first row whose products are not in the batch yet out of `rows`; None (and
    `rows` emptied of what cannot be taken) when there is none."""
    for i, row in enumerate(rows):
        if int(frame.at[row, "a"]) not in used and int(frame.at[row, "b"]) not in used:
            del rows[: i + 1]
            return row
    rows.clear()
    return None


def uncertain_left(pairs: ReviewPairs, answered: Collection[frozenset[str]]) -> int:
    """How many candidate pairs in the uncertain band are still unanswered."""
    band = pairs.frame["band"].to_numpy()
    return sum(
        1 for key, inside in zip(pairs.keys(), band, strict=True) if inside and key not in answered
    )
