"""The candidate-pair table: the one currency of whole-catalog matching.

One row per (product `a`, candidate `b`) pair the engine found, the product itself left out;
`a` and `b` are positions in `PairTable.ids`. Columns, filled stage by stage:

- from the engine (`candidates.collect_candidates`): `score_<m>`, each modality's engine score
  (NaN where the candidate has no such vector), and `fused`, the formula fusion's score;
- `rank` (1 = the product's best candidate by fused score) and `gap` (its best fused score
  minus this one), computed here;
- from a decision (`decide.py`): `probability` (the pair model's, NaN when a fused-score rule
  decided), `match` (bool) and `rule` (what decided: `RULES`);
- labels, where an evaluation has them: `same` (bool).

The feature matrix of the pair model (`features.py`) is computed from the table and kept beside
it, not in it: it is wide and only the pair model reads it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from prodsearch.settings import MODALITIES

#: decimals an engine score is kept to in the table
SCORE_DECIMALS = 5
#: what decided a pair (the `rule` column); "" = not a match
RULES = ("", "modality score", "fused score", "pair model", "min-2")


def score_column(modality: str) -> str:
    """The table column holding a modality's engine score."""
    return f"score_{modality}"


def candidate_order(match: Any) -> tuple[float, str]:
    """The sort key of a product's candidates: best score first (to SCORE_DECIMALS, as the table
    keeps it: the engine's last bits vary from run to run), ties by product id, so the engine's
    order of tied candidates never shows."""
    return (-round(match.score, SCORE_DECIMALS), match.product_id)


def candidate_rows(pid: str, matches: Sequence[Any]) -> list[tuple[str, float, list[float]]]:
    """A product's rows of the table from its engine matches, in `candidate_order`, itself left
    out: (candidate id, fused score, each of MODALITIES' scores or NaN), to SCORE_DECIMALS.
    `PairTable.from_matches` and `dedup --ray`'s query workers both flatten matches with it."""
    return [
        (
            match.product_id,
            round(match.score, SCORE_DECIMALS),
            [
                np.nan if (value := match.scores.get(m)) is None else round(value, SCORE_DECIMALS)
                for m in MODALITIES
            ],
        )
        for match in sorted(matches, key=candidate_order)
        if match.product_id != pid
    ]


def group_rank(groups: np.ndarray, values: np.ndarray, ties: str = "first") -> np.ndarray:
    """Each value's rank among its group's values, 1 for the largest (pandas' descending
    `groupby().rank()`, without its per-call cost on the small tables an assignment builds);
    NaN stays NaN. `ties`: "first" (tied values ranked in row order) or "average"."""
    v = np.asarray(values, dtype=np.float64)
    out = np.full(len(v), np.nan)
    known = np.flatnonzero(~np.isnan(v))
    if not len(known):
        return out
    g = np.asarray(groups, dtype=np.int64)[known]
    order = np.lexsort((-v[known], g))  # stable: tied values keep their row order
    sorted_groups, sorted_values = g[order], v[known][order]
    starts = np.flatnonzero(np.r_[True, np.diff(sorted_groups) != 0])
    sizes = np.diff(np.r_[starts, len(order)])
    rank = np.arange(len(order)) - np.repeat(starts, sizes) + 1.0
    if ties == "average":
        new_run = np.r_[True, (np.diff(sorted_groups) != 0) | (np.diff(sorted_values) != 0)]
        run = np.cumsum(new_run) - 1
        rank = (np.bincount(run, weights=rank) / np.bincount(run))[run]
    elif ties != "first":
        raise ValueError(f"ties must be 'first' or 'average', not {ties!r}")
    out[known[order]] = rank
    return out


@dataclass
class PairTable:
    """Every product's candidates as one table (see the module docstring for its columns)."""

    ids: list[str]
    frame: pd.DataFrame

    @classmethod
    def build(
        cls,
        ids: Sequence[str],
        a: np.ndarray,
        b: np.ndarray,
        fused: np.ndarray,
        scores: dict[str, np.ndarray],
    ) -> PairTable:
        """A table of the given pairs with `rank` and `gap` computed; missing modalities get NaN
        columns."""
        n = len(a)
        frame = pd.DataFrame(
            {
                "a": np.asarray(a, dtype=np.int64),
                "b": np.asarray(b, dtype=np.int64),
                "fused": np.asarray(fused, dtype=np.float64),
                **{
                    score_column(m): np.asarray(scores.get(m, np.full(n, np.nan)), np.float64)
                    for m in MODALITIES
                },
            }
        )
        a, fused = frame["a"].to_numpy(), frame["fused"].to_numpy()
        frame["rank"] = group_rank(a, fused, ties="average")
        best = np.full(len(ids), np.nan)
        np.fmax.at(best, a, fused)
        frame["gap"] = best[a] - fused if n else np.zeros(0)
        return cls(list(ids), frame)

    @classmethod
    def from_matches(
        cls, ids: Sequence[str], results: Iterable[tuple[str, Sequence[Any]]]
    ) -> PairTable:
        """Flatten (product id, its engine matches) into a table over `ids` (the product itself
        and matches outside `ids` left out)."""
        position = {pid: i for i, pid in enumerate(ids)}
        a: list[int] = []
        b: list[int] = []
        fused: list[float] = []
        scores: dict[str, list[float]] = {m: [] for m in MODALITIES}
        for pid, matches in results:
            for other_id, score, modality_scores in candidate_rows(pid, matches):
                other = position.get(other_id)
                if other is None:
                    continue
                a.append(position[pid])
                b.append(other)
                fused.append(score)
                for modality, value in zip(MODALITIES, modality_scores, strict=True):
                    scores[modality].append(value)
        return cls.build(
            ids,
            np.array(a, dtype=np.int64),
            np.array(b, dtype=np.int64),
            np.array(fused, dtype=np.float64),
            {m: np.array(v, dtype=np.float64) for m, v in scores.items()},
        )

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def a(self) -> np.ndarray:
        """Each pair's product (a position in `ids`)."""
        return self.frame["a"].to_numpy()

    @property
    def b(self) -> np.ndarray:
        """Each pair's candidate (a position in `ids`)."""
        return self.frame["b"].to_numpy()

    @property
    def fused(self) -> np.ndarray:
        """Each pair's formula fused score, as the engine computed it."""
        return self.frame["fused"].to_numpy()

    def scores(self, modality: str) -> np.ndarray:
        """Each pair's engine score of `modality` (NaN where missing)."""
        return self.frame[score_column(modality)].to_numpy()

    def modalities(self) -> list[str]:
        """The modalities with a score on at least one pair."""
        return [m for m in MODALITIES if self.frame[score_column(m)].notna().any()]

    def column(self, name: str) -> np.ndarray:
        """Any column as an array (raises KeyError when a stage has not filled it)."""
        return self.frame[name].to_numpy()

    def reverse(self, values: np.ndarray) -> np.ndarray:
        """`values` of each pair's reverse pair (b, a); NaN where b's candidates lack a."""
        n = max(len(self.ids), 1)
        key = self.a.astype(np.int64) * n + self.b
        wanted = self.b.astype(np.int64) * n + self.a
        order = np.argsort(key, kind="stable")
        at = np.minimum(np.searchsorted(key[order], wanted), max(len(key) - 1, 0))
        found = key[order][at] == wanted if len(key) else np.zeros(0, dtype=bool)
        out = np.full(len(key), np.nan)
        out[found] = np.asarray(values, dtype=np.float64)[order[at[found]]]
        return out

    def per_product(self, values: np.ndarray, how: str = "max") -> np.ndarray:
        """An aggregate of `values` over each product's pairs, one per product in `ids` (NaN for
        a product without candidates)."""
        out = np.full(len(self.ids), np.nan)
        grouped = pd.Series(values).groupby(self.a).agg(how)
        out[grouped.index.to_numpy()] = grouped.to_numpy()
        return out

    def top(self, k: int) -> tuple[PairTable, np.ndarray]:
        """The table of each product's `k` best candidates by fused score (rank <= k), and the
        rows they are in this table."""
        rows = np.flatnonzero(self.frame["rank"].to_numpy() <= k)
        frame = self.frame.iloc[rows].reset_index(drop=True)
        return PairTable(self.ids, frame), rows

    def matched(self) -> np.ndarray:
        """The decided pairs (the `match` column). Raises KeyError before a decision."""
        return self.frame["match"].to_numpy(dtype=bool)

    def match_sets(self) -> dict[str, list[str]]:
        """Each product's match set, itself first, then its matches by the deciding score (the
        probability where the pair model decided, else the fused score), best first."""
        frame = self.frame[self.frame["match"]]
        key = frame["probability"].fillna(frame["fused"]) if "probability" in frame else None
        order = frame.assign(key=key if key is not None else frame["fused"]).sort_values(
            ["a", "key"], ascending=[True, False]
        )
        out = {pid: [pid] for pid in self.ids}
        for a, b in zip(order["a"].tolist(), order["b"].tolist(), strict=True):
            out[self.ids[a]].append(self.ids[b])
        return out
