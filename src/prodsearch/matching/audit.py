"""What `dedup` writes: the match sets (`OUT`) and the audit trail (`OUT.pairs.csv`), and reading
a pair's verdict back from the audit trail (`prodsearch explain --pairs`)."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from prodsearch.errors import ConfigError
from prodsearch.matching.table import PairTable, score_column
from prodsearch.settings import MODALITIES

#: the columns of the audit trail: the pair, its formula fused score, the pair model's
#: probability (empty when a score rule decided), whether min-2 added it, each modality's engine
#: score (empty where missing), the signals that fired and the rule that decided
PAIR_COLUMNS = (
    "id",
    "match",
    "score",
    "probability",
    "min2",
    *MODALITIES,
    "matched_by",
    "rule",
)


def write_matches_csv(
    path: Path,
    match_sets: Mapping[str, list[str]],
    clusters: Mapping[str, str] | Mapping[str, int],
    rescued: set[str],
) -> None:
    """Write `id,matches,cluster,min2`: each product's match set (space-separated ids, the
    product first), its cluster, and 1 when min-2 gave it its match."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "matches", "cluster", "min2"])
        for pid, members in match_sets.items():
            writer.writerow([pid, " ".join(members), clusters[pid], int(pid in rescued)])


def write_pairs_csv(path: Path, table: PairTable, fired_at: Mapping[str, float]) -> None:
    """Write the audit trail: one row per decided pair with `PAIR_COLUMNS`; a modality fired
    when its score reaches `fired_at[modality]`."""
    frame = table.frame[table.frame["match"]]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(PAIR_COLUMNS)
        for row in frame.itertuples(index=False):
            values = row._asdict()
            scores = {m: values[score_column(m)] for m in MODALITIES}
            present = {m: s for m, s in scores.items() if not np.isnan(s)}
            probability = values["probability"]
            writer.writerow(
                [
                    table.ids[values["a"]],
                    table.ids[values["b"]],
                    round(values["fused"], 4),
                    "" if np.isnan(probability) else round(probability, 4),
                    int(values["rule"] == "min-2"),
                    *(round(present[m], 4) if m in present else "" for m in MODALITIES),
                    " ".join(m for m, s in present.items() if s >= fired_at[m]),
                    values["rule"],
                ]
            )


def read_pair_verdict(path: Path, product_a: str, product_b: str) -> dict[str, Any] | None:
    """What a `dedup` run recorded in its audit trail for B among A's matches: fused score,
    probability (None when a score rule decided), min2, per-modality scores, the signals that
    fired and the rule; None when that run did not match them. Raises ConfigError when the file
    cannot be read as an audit trail."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != PAIR_COLUMNS:
                raise ConfigError(f"{path} is not a dedup audit trail (columns {PAIR_COLUMNS})")
            for row in reader:
                if row["id"] == product_a and row["match"] == product_b:
                    return {
                        "score": float(row["score"]),
                        "probability": float(row["probability"]) if row["probability"] else None,
                        "min2": row["min2"] == "1",
                        "scores": {m: float(row[m]) for m in MODALITIES if row[m]},
                        "matched_by": row["matched_by"].split(),
                        "rule": row["rule"],
                    }
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return None
