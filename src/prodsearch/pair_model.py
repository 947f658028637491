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

The model is **stacked** (`STAGES` stages): each stage's probabilities are made symmetric (the
mean of the pair's two directions where both are candidates) and become graph features of the
next (`STAGE_FEATURES`: the previous probability, the two products' shared probable neighbours,
their numbers of probable neighbours, the pair's rank and gap to each product's best), so a
pair's verdict draws on the verdicts around it, as the Kaggle Shopee winners' graph features did.
Each stage is fitted on the previous stage's out-of-fold probabilities (group-disjoint folds).

`prodsearch eval` fits the model on `val` (thresholds tuned on out-of-fold probabilities); the
shipped one is `assets/pair_model.json` (every stage in LightGBM's text format, feature names
included).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from prodsearch.errors import ConfigError

SHIPPED_PAIR_MODEL = Path(__file__).resolve().parent / "assets" / "pair_model.json"
MODEL_FORMAT = "prodsearch pair model 2"
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
#: graph features of a later stage, from the previous stage's symmetric probabilities
STAGE_FEATURES = (
    "previous",
    "shared_weight",
    "shared_count",
    "previous_size",
    "previous_candidate_size",
    "previous_rank",
    "previous_gap",
    "previous_candidate_gap",
)
#: stages of the stacked model and out-of-fold folds of its fit (chosen on Shopee val: README)
STAGES = 3
FOLDS = 5
#: a previous-stage probability that counts a candidate as a probable neighbour
PROBABLE = 0.5
#: pairs per chunk of the shared-neighbour sums
ROW_DOT_CHUNK = 65_536
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


def feature_names(modalities: Sequence[str], stage: int = 1) -> list[str]:
    """The features a stage of a pair model over these modalities reads, in column order (the
    pair features, then from stage 2 on the previous stage's graph features)."""
    return [
        *(f"score_{m}" for m in modalities),
        *GRAPH_FEATURES,
        *(f"blended_{m}" for m in modalities if m in BLENDED_MODALITIES),
        *NUMBER_FEATURES,
        *(STAGE_FEATURES if stage > 1 else ()),
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
    # neighbourhoods: the close candidates and the product itself, as rows of a sparse matrix
    close = pairs.total >= neighbour_threshold
    n = len(pairs.ids)
    rows = np.concatenate([pairs.query[close], np.arange(n)])
    columns = np.concatenate([pairs.candidate[close], np.arange(n)])
    neighbourhood = sp.csr_matrix((np.ones(len(rows)), (rows, columns)), shape=(n, n))
    members = np.asarray(neighbourhood.sum(axis=1)).ravel()
    shared = _row_dots(neighbourhood, pairs.query, pairs.candidate)
    frame["jaccard"] = shared / (members[pairs.query] + members[pairs.candidate] - shared)
    sizes = members - 1
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
            frame[f"blended_{modality}"] = _row_dots(blended, pairs.query, pairs.candidate)
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


def symmetric(pairs: CandidatePairs, probabilities: np.ndarray) -> np.ndarray:
    """Each pair's probability averaged with its reverse pair's, where both are candidates."""
    frame = pd.Series(
        probabilities, index=pd.MultiIndex.from_arrays([pairs.query, pairs.candidate])
    )
    reverse = frame.reindex(pd.MultiIndex.from_arrays([pairs.candidate, pairs.query])).to_numpy()
    return np.where(np.isnan(reverse), probabilities, (probabilities + reverse) / 2)


def stage_features(pairs: CandidatePairs, previous: np.ndarray) -> np.ndarray:
    """The graph features (`STAGE_FEATURES`) of every pair from the previous stage's symmetric
    probabilities: the previous probability; over candidates x of both products, the sum of
    P(a, x) * P(b, x) and the count of x probable for both; each product's number of probable
    neighbours; the pair's rank by probability among the product's candidates, and its gap to
    the product's and to the candidate's best probability (-1 when the candidate has none)."""
    n = len(pairs.ids)
    weights = sp.csr_matrix((previous, (pairs.query, pairs.candidate)), shape=(n, n))
    probable = sp.csr_matrix(
        ((previous >= PROBABLE).astype(np.float64), (pairs.query, pairs.candidate)), shape=(n, n)
    )
    shared_weight = _row_dots(weights, pairs.query, pairs.candidate)
    shared_count = _row_dots(probable, pairs.query, pairs.candidate)
    sizes = np.asarray(probable.sum(axis=1)).ravel()
    by_query = pd.Series(previous).groupby(pairs.query)
    maxima = by_query.max()
    best_of = np.full(n, np.nan)  # each product's best probability (NaN: no candidates)
    best_of[maxima.index.to_numpy()] = maxima.to_numpy()
    best = best_of[pairs.query]
    candidate_gap = np.nan_to_num(best_of[pairs.candidate] - previous, nan=-1.0)
    return np.column_stack(
        [
            previous,
            shared_weight,
            shared_count,
            sizes[pairs.query],
            sizes[pairs.candidate],
            by_query.rank(ascending=False).to_numpy(),
            best - previous,
            candidate_gap,
        ]
    )


def _row_dots(
    matrix: np.ndarray | sp.csr_matrix, left: np.ndarray, right: np.ndarray
) -> np.ndarray:
    """The dot product of rows `left[i]` and `right[i]` of a dense or sparse matrix, for every
    i, in chunks: memory grows with the chunk, not with the pairs times the row width (nor, for a
    sparse matrix, with its much larger product by itself)."""
    out = np.zeros(len(left))
    for start in range(0, len(left), ROW_DOT_CHUNK):
        end = start + ROW_DOT_CHUNK
        mine, theirs = matrix[left[start:end]], matrix[right[start:end]]
        if sp.issparse(matrix):
            out[start:end] = np.asarray(mine.multiply(theirs).sum(axis=1)).ravel()
        else:
            out[start:end] = np.einsum("ij,ij->i", mine, theirs)
    return out


@dataclass
class PairModel:
    """A fitted pair model: one LightGBM booster per stage, and the modalities they read."""

    boosters: list[Any]
    modalities: tuple[str, ...]

    @classmethod
    def load(cls, path: Path | None = None) -> PairModel:
        """Load a model file (None: the shipped one); its feature names give its modalities.

        Raises ConfigError when the file is missing, is not a pair model, or reads features
        this version does not compute."""
        import lightgbm

        path = Path(path or SHIPPED_PAIR_MODEL)
        if not path.is_file():
            raise ConfigError(f"pair model file {path} does not exist")
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            if document.get("format") != MODEL_FORMAT:
                raise ValueError(f"format {document.get('format')!r}, expected {MODEL_FORMAT!r}")
            boosters = [lightgbm.Booster(model_str=text) for text in document["stages"]]
            modalities = tuple(document["modalities"])
        except (
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            lightgbm.basic.LightGBMError,
        ) as exc:
            raise ConfigError(f"{path} is not a prodsearch pair model: {exc}") from exc
        for stage, booster in enumerate(boosters, start=1):
            if booster.feature_name() != feature_names(modalities, stage):
                raise ConfigError(
                    f"{path}: stage {stage} reads features {booster.feature_name()}, not those "
                    f"of this version ({feature_names(modalities, stage)}); fit a new one with "
                    "`prodsearch eval`"
                )
        return cls(boosters, modalities)

    @classmethod
    def fit(
        cls,
        pairs: CandidatePairs,
        features: np.ndarray,
        same: np.ndarray,
        groups: np.ndarray,
        modalities: Sequence[str],
        train: np.ndarray,
        stages: int = STAGES,
    ) -> tuple[PairModel, np.ndarray]:
        """Fit the stacked model on the labelled pairs flagged in `train` (`same`: the two
        products are one product; `groups`: each pair's query product's group, so that folds
        never split a group).

        Returns the model and the final symmetric probabilities of every pair: out of fold for
        the training pairs (each stage's folds fitted on the previous stage's out-of-fold
        probabilities), from the fitted model for the others. Raises ConfigError with fewer
        than two groups.
        """
        from sklearn.model_selection import GroupKFold

        rows = np.flatnonzero(train)
        n_groups = len(set(groups[rows].tolist()))
        if n_groups < 2:
            raise ConfigError("fitting a pair model needs labelled pairs of two groups or more")
        folds = list(GroupKFold(n_splits=min(FOLDS, n_groups)).split(rows, groups=groups[rows]))
        label = same.astype(np.float64)
        boosters = []
        inputs = features
        for stage in range(1, stages + 1):
            names = feature_names(modalities, stage)
            probability = np.empty(len(inputs))
            for fit_rows, held_out in folds:
                fold = _train(inputs[rows[fit_rows]], label[rows[fit_rows]], names)
                probability[rows[held_out]] = fold.predict(inputs[rows[held_out]])
            boosters.append(_train(inputs[rows], label[rows], names))
            rest = np.ones(len(inputs), dtype=bool)
            rest[rows] = False
            if rest.any():
                probability[rest] = boosters[-1].predict(inputs[rest])
            probability = symmetric(pairs, probability)
            inputs = np.column_stack([features, stage_features(pairs, probability)])
        return cls(boosters, tuple(modalities)), probability

    def probabilities(self, pairs: CandidatePairs, features: np.ndarray) -> np.ndarray:
        """The probability that each candidate pair is one product (`features`: `pair_features`
        of `pairs`), symmetric in the pair's two directions."""
        if len(features) == 0:
            return np.zeros(0)
        inputs, probability = features, np.zeros(0)
        for booster in self.boosters:
            probability = symmetric(pairs, np.asarray(booster.predict(inputs), dtype=np.float64))
            inputs = np.column_stack([features, stage_features(pairs, probability)])
        return probability

    def save(self, path: Path) -> None:
        """Write the model: every stage in LightGBM's text format, in one JSON file."""
        document = {
            "format": MODEL_FORMAT,
            "modalities": list(self.modalities),
            "stages": [booster.model_to_string() for booster in self.boosters],
        }
        path.write_text(json.dumps(document), encoding="utf-8")


def _train(inputs: np.ndarray, label: np.ndarray, names: list[str]) -> Any:
    import lightgbm

    data = lightgbm.Dataset(inputs, label=label, feature_name=names)
    return lightgbm.train(LGBM_PARAMS, data, num_boost_round=LGBM_ROUNDS)
