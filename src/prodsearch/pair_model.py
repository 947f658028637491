"""The pair model of whole-catalog matching: is a product's candidate the same product?

`dedup` collects every product's candidates (the formula fusion without its threshold), then
gradient-boosted trees (LightGBM) score each (product, candidate) pair from:

- `score_<m>`: the engine's score of each modality the model was fitted on (-1 where missing);
- the pair's place among the product's candidates: `total` (the formula's fused score), `rank`,
  `best` (the product's best total) and `gap` (best - total);
- the neighbourhoods (candidates with total >= `neighbour_threshold`, the product included):
  `jaccard` overlap of the two, their sizes `size` and `candidate_size`, and `reverse_total`
  (the candidate's score for the product, -1 when the product is not among its candidates);
- `blended_<m>` for each dense modality: the cosine of the two products' blended vectors (each
  vector plus the score-weighted vectors of its fused matches, those with total >= the formula
  threshold), i.e. neighbourhood blending as a feature;
- title numbers (sizes, model codes: `500ml`, `XB-450`): `numbers_jaccard` of the two titles'
  number sets (-1 when either has none), `numbers_disjoint` (both have numbers, none shared),
  `numbers_one_sided` (only one title has numbers).

`prodsearch eval` fits the model on `val` (thresholds tuned on out-of-fold probabilities); the
shipped one is in `assets/pair_model.txt` (LightGBM's text format, feature names included).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from prodsearch.errors import ConfigError

SHIPPED_PAIR_MODEL = Path(__file__).resolve().parent / "assets" / "pair_model.txt"
#: modalities whose vectors are blended into a `blended_<m>` feature (dense, learned)
BLENDED_MODALITIES = ("text", "charcnn", "image")
GRAPH_FEATURES = (
    "total",
    "rank",
    "best",
    "gap",
    "jaccard",
    "size",
    "candidate_size",
    "reverse_total",
)
NUMBER_FEATURES = ("numbers_jaccard", "numbers_disjoint", "numbers_one_sided")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
#: LightGBM parameters of the fit (fixed seed, deterministic on any thread count)
LGBM_PARAMS = {
    "objective": "binary",
    "learning_rate": 0.08,
    "num_leaves": 31,
    "min_child_samples": 20,
    "seed": 0,
    "deterministic": True,
    "force_row_wise": True,
    "verbose": -1,
}
LGBM_ROUNDS = 300


@dataclass
class CandidatePairs:
    """Every product's fused candidates as flat arrays: one row per (product, candidate) pair,
    the product itself left out; `query` and `candidate` are positions in `ids`."""

    ids: list[str]
    query: np.ndarray
    candidate: np.ndarray
    #: the formula fusion's score of the pair, computed by the engine
    total: np.ndarray
    #: the engine's score of each modality (NaN where the collection has no such vector)
    scores: dict[str, np.ndarray]


def feature_names(modalities: Sequence[str]) -> list[str]:
    """The features of a pair model over these modalities, in the model's column order."""
    return [
        *(f"score_{m}" for m in modalities),
        *GRAPH_FEATURES,
        *(f"blended_{m}" for m in modalities if m in BLENDED_MODALITIES),
        *NUMBER_FEATURES,
    ]


def title_numbers(title: str) -> frozenset[str]:
    """The numbers in a title (`"Oat drink 1.5L x 6"` -> {"1.5", "6"})."""
    return frozenset(_NUMBER.findall(title.lower()))


def pair_features(
    pairs: CandidatePairs,
    modalities: Sequence[str],
    *,
    neighbour_threshold: float,
    blend_threshold: float,
    dense: Mapping[str, np.ndarray],
    titles: Sequence[str],
) -> np.ndarray:
    """The feature matrix: one row per pair, columns `feature_names(modalities)`; missing values
    are -1. `dense[m]` holds each product's vector of modality m (rows in `pairs.ids` order,
    zeros where a product has none); `titles` each product's title ("" when it has none)."""
    frame = pd.DataFrame({"query": pairs.query, "candidate": pairs.candidate, "total": pairs.total})
    by_query = frame.groupby("query")["total"]
    frame["rank"] = by_query.rank(ascending=False)
    frame["best"] = by_query.transform("max")
    frame["gap"] = frame["best"] - frame["total"]
    close = pairs.total >= neighbour_threshold
    neighbourhood: dict[int, set[int]] = {}
    for q, c in zip(pairs.query[close].tolist(), pairs.candidate[close].tolist(), strict=True):
        neighbourhood.setdefault(q, set()).add(c)
    sizes = np.zeros(len(pairs.ids))
    for q, members in neighbourhood.items():
        sizes[q] = len(members)
    empty: set[int] = set()
    jaccard = []
    for q, c in zip(pairs.query.tolist(), pairs.candidate.tolist(), strict=True):
        mine, theirs = neighbourhood.get(q, empty) | {q}, neighbourhood.get(c, empty) | {c}
        jaccard.append(len(mine & theirs) / len(mine | theirs))
    frame["jaccard"] = jaccard
    frame["size"] = sizes[pairs.query]
    frame["candidate_size"] = sizes[pairs.candidate]
    reverse = frame.set_index(["query", "candidate"])["total"]
    frame["reverse_total"] = reverse.reindex(
        pd.MultiIndex.from_arrays([frame["candidate"], frame["query"]])
    ).to_numpy()
    for modality in modalities:
        frame[f"score_{modality}"] = pairs.scores[modality]
        if modality in BLENDED_MODALITIES:
            blended = _blended(pairs, modality, dense[modality], blend_threshold)
            frame[f"blended_{modality}"] = np.einsum(
                "ij,ij->i", blended[pairs.query], blended[pairs.candidate]
            )
    numbers = [title_numbers(t) for t in titles]
    frame["numbers_jaccard"], frame["numbers_disjoint"], frame["numbers_one_sided"] = (
        zip(
            *(
                _number_features(numbers[q], numbers[c])
                for q, c in zip(pairs.query.tolist(), pairs.candidate.tolist(), strict=True)
            ),
            strict=True,
        )
        if len(frame)
        else ([], [], [])
    )
    columns = feature_names(modalities)
    return np.nan_to_num(frame[columns].to_numpy(dtype=np.float64), nan=-1.0)


def _blended(
    pairs: CandidatePairs, modality: str, vectors: np.ndarray, threshold: float
) -> np.ndarray:
    """Each product's vector plus its fused matches' vectors weighted by their score (unit
    length)."""
    blended = np.asarray(vectors, dtype=np.float64).copy()
    scores = np.nan_to_num(pairs.scores[modality], nan=0.0)
    fused = pairs.total >= threshold
    np.add.at(
        blended,
        pairs.query[fused],
        np.maximum(scores[fused], 0.0)[:, None] * vectors[pairs.candidate[fused]],
    )
    norms = np.linalg.norm(blended, axis=1, keepdims=True)
    return blended / np.where(norms > 0, norms, 1.0)


def _number_features(mine: frozenset[str], theirs: frozenset[str]) -> tuple[float, float, float]:
    if not mine or not theirs:
        return -1.0, 0.0, float(bool(mine) != bool(theirs))
    shared = len(mine & theirs)
    return shared / len(mine | theirs), float(shared == 0), 0.0


@dataclass
class PairModel:
    """A fitted pair model: LightGBM trees and the modalities their features read."""

    booster: object
    modalities: tuple[str, ...]

    @classmethod
    def load(cls, path: Path | None = None) -> PairModel:
        """Load a model file (None: the shipped one); its feature names give its modalities."""
        import lightgbm

        path = path or SHIPPED_PAIR_MODEL
        if not Path(path).is_file():
            raise ConfigError(f"pair model file {path} does not exist")
        booster = lightgbm.Booster(model_file=str(path))
        names = booster.feature_name()
        modalities = tuple(n.removeprefix("score_") for n in names if n.startswith("score_"))
        if names != feature_names(modalities):
            raise ConfigError(
                f"{path}: its features {names} are not those of this version "
                f"({feature_names(modalities)}); fit a new one with `prodsearch eval`"
            )
        return cls(booster, modalities)

    @classmethod
    def fit(cls, features: np.ndarray, same: np.ndarray, modalities: Sequence[str]) -> PairModel:
        """Fit the trees on labelled pairs (`same`: the two products are one product)."""
        import lightgbm

        data = lightgbm.Dataset(
            features, label=same.astype(np.float64), feature_name=feature_names(modalities)
        )
        booster = lightgbm.train(LGBM_PARAMS, data, num_boost_round=LGBM_ROUNDS)
        return cls(booster, tuple(modalities))

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """The probability that each pair is one product."""
        if len(features) == 0:
            return np.zeros(0)
        return np.asarray(self.booster.predict(features), dtype=np.float64)  # type: ignore[attr-defined]

    def save(self, path: Path) -> None:
        """Write the model in LightGBM's text format."""
        self.booster.save_model(str(path))  # type: ignore[attr-defined]
