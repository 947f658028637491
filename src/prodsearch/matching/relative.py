"""Features that mean the same on any catalog: a pair's score judged against the catalog around it.

A raw cosine does not transfer: two TVs a model number apart sit at text cosine 0.98 in an
English electronics catalog, while Shopee's duplicates often sit below 0.8. What transfers is
where the pair stands among each product's candidates and in the catalog's own score
distribution. For each signal (each modality's engine score, and the fused score), from the
candidate-pair table alone:

- `<s>`: the score itself (raw; the trees may still use it where it helps);
- `<s>_rank_min` / `_rank_max`: the candidate's rank among the product's candidates by this
  score and the product's rank among the candidate's (absent from its list: the list's length
  + 1): mutual nearest neighbours have both 1;
- `<s>_gap_min` / `_gap_max`: each side's best score minus the pair's;
- `<s>_over2_min`, `_over5_min`, `_over10_min`: how far the pair stands above each side's 2nd,
  5th and 10th best (the lower of the two);
- `<s>_csls5`, `<s>_csls10`: cross-domain similarity local scaling, `2 s - r_a - r_b` with `r`
  the mean of a side's k best scores (hubness-corrected);
- `<s>_quantile`: the score's quantile among the table's candidate pairs (the whole catalog's
  in `dedup`; a product's neighbourhood in an assignment: README, Transfer, says what that costs);
- `<s>_dense_min` / `_dense_max`: how many of each side's candidates score within 0.05 of its
  best (a dense product line: many look-alikes at the top).

And the titles' model codes (`KDL-46V5100`, `TL-SF1008D`: tokens mixing letters and digits,
units such as `32gb` left out), which in electronics decide: both have codes, they share one,
none shared, only one side has codes, their Jaccard, and a code of one contained in the other's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from prodsearch.matching.table import PairTable, group_rank

#: the modalities whose scores the pair model reads (the opt-in char-CNN is not among them),
#: then the fused score; a signal a catalog lacks is missing (NaN) in every feature
SIGNALS = ("text", "chars", "image", "phash", "fused")
SIGNAL_FEATURES = (
    "",
    "_rank_min",
    "_rank_max",
    "_gap_min",
    "_gap_max",
    "_over2_min",
    "_over5_min",
    "_over10_min",
    "_csls5",
    "_csls10",
    "_quantile",
    "_dense_min",
    "_dense_max",
)
CODE_FEATURES = (
    "code_both",
    "code_shared",
    "code_disjoint",
    "code_one_sided",
    "code_jaccard",
    "code_partial",
)
#: a candidate within this much of a product's best score counts towards its density
DENSE_MARGIN = 0.05
_TOKEN = re.compile(r"[a-z0-9][a-z0-9\-/._]*[a-z0-9]|[a-z0-9]")
_UNITS = (
    "gb|tb|mb|kb|gbps|mbps|mhz|ghz|hz|mm|cm|m|in|inch|ml|l|g|kg|lb|lbs|oz|w|v|mah|k|x|p|rpm|mp|"
    "fps|th|st|nd|rd|pcs|pack|pk|s|ms|bit|core|gen|ft"
)
_UNIT = re.compile(rf"^\d+(?:[.,]\d+)?(?:{_UNITS})$|^\d+(?:x\d+)+[a-z]*$")
_SEPARATORS = re.compile(r"[\-/._]")
_YEAR = re.compile(r"(19|20)\d\d")


def signal_names(signal: str) -> list[str]:
    """The feature names of one signal."""
    return [f"{signal}{suffix}" for suffix in SIGNAL_FEATURES]


def signal_scores(table: PairTable, signal: str) -> np.ndarray:
    """The table's score of a signal (a modality's engine score, or "fused")."""
    return table.fused if signal == "fused" else table.scores(signal)


def signal_features(
    table: PairTable, signal: str, reference: np.ndarray | None = None
) -> np.ndarray:
    """The features of one signal (`signal_names`), one row per pair; all NaN where the catalog
    has no such score. `reference`: the sorted known scores the quantile is read against
    (default: the table's own)."""
    v = signal_scores(table, signal).astype(np.float64)
    if np.isnan(v).all():
        return np.full((len(table), len(SIGNAL_FEATURES)), np.nan)
    a, b = table.a, table.b
    rank = group_rank(a, v)
    count = np.bincount(a[~np.isnan(v)], minlength=len(table.ids)).astype(np.float64)
    reverse_rank = table.reverse(rank)
    reverse_rank = np.where(np.isnan(reverse_rank), count[b] + 1, reverse_rank)
    best, second, fifth, tenth, top5, top10, dense = _per_product(table, v, rank)
    columns = [
        v,
        np.fmin(rank, reverse_rank),
        np.fmax(rank, reverse_rank),
        np.fmin(best[a] - v, best[b] - v),
        np.fmax(best[a] - v, best[b] - v),
        np.fmin(v - second[a], v - second[b]),
        np.fmin(v - fifth[a], v - fifth[b]),
        np.fmin(v - tenth[a], v - tenth[b]),
        2 * v - top5[a] - top5[b],
        2 * v - top10[a] - top10[b],
        _quantiles(v, reference),
        np.fmin(dense[a], dense[b]),
        np.fmax(dense[a], dense[b]),
    ]
    out = np.column_stack(columns)
    out[np.isnan(v)] = np.nan
    return out


def _per_product(table: PairTable, v: np.ndarray, rank: np.ndarray) -> list[np.ndarray]:
    """Each product's best, 2nd, 5th and 10th score, the mean of its 5 and 10 best, and how
    many of its candidates score within DENSE_MARGIN of its best (NaN: not that many)."""
    n = len(table.ids)
    a = table.a
    known = ~np.isnan(v)

    def kth(k: int) -> np.ndarray:
        out = np.full(n, np.nan)
        at = known & (rank == k)
        out[a[at]] = v[at]
        return out

    def mean_top(k: int) -> np.ndarray:
        at = known & (rank <= k)
        total = np.bincount(a[at], weights=v[at], minlength=n)
        count = np.bincount(a[at], minlength=n)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / count, np.nan)

    best = kth(1)
    near = known & (v >= best[a] - DENSE_MARGIN)
    dense = np.bincount(a[near], minlength=n).astype(np.float64)
    return [best, kth(2), kth(5), kth(10), mean_top(5), mean_top(10), dense]


def _quantiles(v: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Each score's quantile among the known scores, or the sorted `reference` scores (NaN stays
    NaN)."""
    known = np.sort(v[~np.isnan(v)]) if reference is None else reference
    out = np.searchsorted(known, v, side="right") / max(len(known), 1)
    return np.where(np.isnan(v), np.nan, out)


@lru_cache(maxsize=1 << 16)
def title_codes(title: str) -> frozenset[str]:
    """A title's model codes: tokens of 3+ characters mixing letters and digits (or 6+ digits
    that are not a year), separators removed, lower case; sizes and units (`32gb`, `1920x1080`)
    left out."""
    out = set()
    for token in _TOKEN.findall(title.lower()):
        if _UNIT.match(token):
            continue
        norm = _SEPARATORS.sub("", token)
        if len(norm) < 3 or _UNIT.match(norm):
            continue
        digits = any(ch.isdigit() for ch in norm)
        letters = any(ch.isalpha() for ch in norm)
        if (digits and letters) or (digits and len(norm) >= 6 and not _YEAR.fullmatch(norm)):
            out.add(norm)
    return frozenset(out)


def code_features(titles: Sequence[str], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The `CODE_FEATURES` of every pair, from each product's title."""
    codes = [title_codes(t) for t in titles]
    rows = [_code_pair(codes[i], codes[j]) for i, j in zip(a.tolist(), b.tolist(), strict=True)]
    return np.array(rows, dtype=np.float64).reshape(-1, len(CODE_FEATURES))


def _code_pair(mine: frozenset[str], theirs: frozenset[str]) -> tuple[float, ...]:
    if not mine or not theirs:
        return 0.0, 0.0, 0.0, float(bool(mine) != bool(theirs)), -1.0, 0.0
    shared = len(mine & theirs)
    partial = 0.0
    if not shared:
        partial = float(
            any((len(x) >= 5 and x in y) or (len(y) >= 5 and y in x) for x in mine for y in theirs)
        )
    disjoint = float(not shared and not partial)
    return 1.0, float(shared > 0), disjoint, 0.0, shared / len(mine | theirs), partial


# -- the catalog's own statistics ---------------------------------------------------------------
_WORD = re.compile(r"[a-z0-9]+(?:[.\-][a-z0-9]+)*")
#: token-difference features (IDF from the catalog's own titles)
TOKEN_FEATURES = (
    "tokens_only_fraction_min",
    "tokens_only_fraction_max",
    "tokens_only_mass_min",
    "tokens_only_mass_max",
    "tokens_weighted_jaccard",
    "tokens_rarest_only_min",
    "tokens_rarest_only_max",
    "tokens_subset",
    "tokens_length_difference",
    "numbers_subset",
)


@lru_cache(maxsize=1 << 16)
def title_words(title: str) -> frozenset[str]:
    """A title's lower-cased word tokens (`sf1008d`, `1.5l`, `kdl-46v5100` kept whole)."""
    return frozenset(_WORD.findall(title.lower()))


@dataclass(frozen=True)
class CatalogStats:
    """Label-free statistics of a whole catalog, from its titles: how common each word is (the
    IDF of the token features). Constants of the whole catalog (how many offers a product has,
    the share of titles with codes) are not features: fitted beside catalogs of one listing per
    product, the trees read them as "this catalog has no duplicates" and decided whole unseen
    catalogs by them (README, Transfer)."""

    titles: int
    document_frequency: dict[str, int]
    #: signal -> its known scores over the whole catalog's pair table, sorted: the reference of
    #: the quantile features when a table is a part of it (`dedup --ray`'s partitions); empty:
    #: each table's own
    quantiles: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, titles: Sequence[str]) -> CatalogStats:
        """The statistics of a catalog's titles."""
        frequency: dict[str, int] = {}
        for words in (title_words(t) for t in titles):
            for word in words:
                frequency[word] = frequency.get(word, 0) + 1
        return cls(titles=len(titles), document_frequency=frequency)

    def idf(self, word: str) -> float:
        """The word's inverse document frequency in the catalog (smoothed; unseen words rare)."""
        return float(np.log((self.titles + 1) / (self.document_frequency.get(word, 0) + 1)) + 1)


def token_features(
    titles: Sequence[str], a: np.ndarray, b: np.ndarray, stats: CatalogStats
) -> np.ndarray:
    """The `TOKEN_FEATURES` of every pair: the IDF mass (and share of each title's mass) of the
    words one title has and the other lacks, min and max over the two directions; the IDF-
    weighted Jaccard; the rarest word only one side has; whether one title's words (numbers) are
    a subset of the other's; the difference in length."""
    words = [title_words(t) for t in titles]
    idf: dict[str, float] = {}
    weight = [{w: idf.setdefault(w, stats.idf(w)) for w in ws} for ws in words]
    mass = np.array([sum(w.values()) for w in weight]) + 1e-9
    numbers = [frozenset(_NUMBER_TOKEN.findall(t.lower())) for t in titles]
    rows = []
    for i, j in zip(a.tolist(), b.tolist(), strict=True):
        mine, theirs = words[i], words[j]
        only_mine = [weight[i][w] for w in mine - theirs]
        only_theirs = [weight[j][w] for w in theirs - mine]
        shared = sum(weight[i][w] for w in mine & theirs)
        da, db = sum(only_mine), sum(only_theirs)
        na, nb = numbers[i], numbers[j]
        rows.append(
            (
                min(da / mass[i], db / mass[j]),
                max(da / mass[i], db / mass[j]),
                min(da, db),
                max(da, db),
                shared / (shared + da + db + 1e-9),
                min(max(only_mine, default=0.0), max(only_theirs, default=0.0)),
                max(max(only_mine, default=0.0), max(only_theirs, default=0.0)),
                float(not only_mine or not only_theirs),
                abs(len(mine) - len(theirs)) / max(len(mine), len(theirs), 1),
                float(na <= nb or nb <= na) if na and nb else -1.0,
            )
        )
    return np.array(rows, dtype=np.float64).reshape(-1, len(TOKEN_FEATURES))


_NUMBER_TOKEN = re.compile(r"\d+(?:[.,]\d+)?")
