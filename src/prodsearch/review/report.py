"""The calibration report: what the answers say about each signal and about the decision, and
what the calibrated decision predicts for the whole catalog.

- per modality: precision / recall / F1 of thresholding that modality's engine score, estimated
  on the answered candidate pairs, across thresholds, with the threshold in force marked;
- fused: the same for the calibrated probability (the pair model's decision; the formula's
  fused score where the fusion decided), with the operating point `calibrate` chose and the
  expected precision / recall / F1 over every candidate pair of the catalog (`expected_curve`);
- the prediction: matched pairs and products now and at the operating point, the expected
  precision; and how far the operating point moves when the last few answers are left out
  (whether more answers still change the calibration).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from prodsearch.errors import ConfigError
from prodsearch.labels import PairLabel
from prodsearch.matching.calibrate import (
    CURVE_GRID,
    MIN_ANSWERS,
    MIN_EACH,
    Calibration,
    expected_curve,
    fit_calibration,
)
from prodsearch.matching.pair_model import ScoredPairs
from prodsearch.matching.table import PairTable, score_column
from prodsearch.review.queue import ReviewPairs
from prodsearch.settings import MODALITIES

#: answers left out to see whether the operating point still moves
HOLD_BACK = 5
#: the operating point counts as settled when leaving the last answers out moves it by at most
#: one step of the threshold grid (0.01)
SETTLED_SHIFT = 0.015
#: thresholds of a modality score's curve
SCORE_GRID = np.round(np.arange(0.0, 1.001, 0.01), 3)


def answered(pairs: ReviewPairs, labels: Sequence[PairLabel]) -> pd.DataFrame:
    """The rows of `pairs.frame` that have a label, with its answer in `same`."""
    position = pairs.position()
    wanted: dict[tuple[int, int], bool] = {}
    for label in labels:
        a, b = position.get(label.id_a), position.get(label.id_b)
        if a is not None and b is not None:
            wanted[(min(a, b), max(a, b))] = label.same
    frame = pairs.frame
    keys = list(zip(frame["a"].tolist(), frame["b"].tolist(), strict=True))
    rows = [i for i, key in enumerate(keys) if key in wanted]
    return frame.loc[rows].assign(same=[wanted[keys[i]] for i in rows])


def pr_curve(scores: np.ndarray, same: np.ndarray, grid: np.ndarray) -> dict[str, list]:
    """Precision, recall and F1 of `scores >= t` against the answers at each t of `grid`
    (precision None where nothing passes; recall None without a 'same' answer)."""
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    positives = int(same.sum())
    precision, recall, f1 = [], [], []
    for t in grid:
        kept = scores >= t
        tp = int((kept & same).sum())
        p = tp / int(kept.sum()) if kept.any() else None
        r = tp / positives if positives else None
        precision.append(p)
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p is not None and r is not None and p + r else 0.0)
    return {
        "threshold": [float(t) for t in grid],
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def _at(curve: Mapping[str, list], threshold: float) -> dict[str, float | None]:
    """The curve's values at the grid point nearest `threshold` (not above it)."""
    grid = np.asarray(curve["threshold"])
    i = int(np.clip(np.searchsorted(grid, threshold + 1e-9) - 1, 0, len(grid) - 1))
    return {k: curve[k][i] for k in ("precision", "recall", "f1")}


def signal_curves(rows: pd.DataFrame, fired_at: Mapping[str, float]) -> list[dict[str, Any]]:
    """Each modality's curve on the answered pairs that have its score, the threshold in force
    marked (`at_threshold`)."""
    same = rows["same"].to_numpy(dtype=bool)
    out = []
    for modality in MODALITIES:
        scores = rows[score_column(modality)].to_numpy(dtype=np.float64)
        if np.isnan(scores).all():
            continue
        curve = pr_curve(scores, same, SCORE_GRID)
        threshold = float(fired_at[modality])
        out.append(
            {
                "name": modality,
                "unit": "engine score",
                **curve,
                "in_force": threshold,
                "at_threshold": _at(curve, threshold),
            }
        )
    return out


def build_report(
    table: PairTable,
    pairs: ReviewPairs,
    labels: Sequence[PairLabel],
    fired_at: Mapping[str, float],
    scored: ScoredPairs | None,
    min_probability: float,
    fused_threshold: float | None,
) -> tuple[dict[str, Any], Calibration | None]:
    """The report of a calibration from `labels` over the decided `table` (`pairs`, its pairs
    once each; `scored`, the pairs the pair model scored, None where the fusion decided) and the
    fitted calibration (None, with the reason in `error`, when it cannot be fitted: the fusion
    decided, the answers are all one way, no answer is a candidate pair)."""
    rows = answered(pairs, labels)
    report: dict[str, Any] = {
        "answers": len(labels),
        "answered_candidates": len(rows),
        "answered_same": int(rows["same"].sum()) if len(rows) else 0,
        "signals": signal_curves(rows, fired_at) if len(rows) else [],
        "now": _prediction(pairs.frame["match"].to_numpy(dtype=bool), pairs),
        "now_min_probability": min_probability,
        "error": None,
    }
    try:
        if scored is None:
            raise ConfigError(
                "the pair model did not decide this catalog (the fusion did), so there are no "
                "probabilities to calibrate"
            )
        fit = fit_calibration(scored, labels)
    except ConfigError as exc:
        report["error"] = str(exc)
        report["fused"] = _fused_score_curve(rows, fused_threshold) if len(rows) else None
        return report, None
    probability = pair_probabilities(table, scored, fit.apply(scored), pairs)
    rows_probability = probability[rows.index.to_numpy()]
    curve = pr_curve(rows_probability, rows["same"].to_numpy(dtype=bool), CURVE_GRID)
    expected = {k: [float(v) for v in values] for k, values in expected_curve(probability).items()}
    operating = fit.min_probability
    report.update(
        calibration={**fit.settings.model_dump(), "min_probability": operating},
        taught=_taught(fit),
        weights_need={"answers": MIN_ANSWERS, "each": MIN_EACH},
        fused={
            "name": "fused (calibrated probability)",
            "unit": "probability",
            **curve,
            "in_force": operating,
            "at_threshold": _at(curve, operating),
            "expected": expected,
        },
        predicted={
            **_prediction(probability >= operating, pairs),
            **{f"expected_{k}": v for k, v in _at(expected, operating).items()},
        },
        settled=_settled(scored, labels, operating),
    )
    return report, fit


def pair_probabilities(
    table: PairTable, scored: ScoredPairs, probability: np.ndarray, pairs: ReviewPairs
) -> np.ndarray:
    """The probability of each of `pairs` (once each) from the scored rows' `probability`
    (either direction; 0 for a pair the model did not score)."""
    frame = table.frame.iloc[scored.rows]
    low = np.minimum(frame["a"].to_numpy(), frame["b"].to_numpy())
    high = np.maximum(frame["a"].to_numpy(), frame["b"].to_numpy())
    best = pd.DataFrame({"a": low, "b": high, "p": probability}).groupby(["a", "b"])["p"].max()
    keys = pd.MultiIndex.from_arrays([pairs.frame["a"], pairs.frame["b"]])
    return best.reindex(keys).fillna(0.0).to_numpy(dtype=np.float64)


#: how many of the features the answers weigh most the report lists
TAUGHT = 8


def _taught(fit: Calibration) -> list[dict[str, float | str]]:
    """What the answers taught beyond the pair model: the features they weigh most (weight on
    the standardised feature; positive = more likely the same product)."""
    weights = sorted(fit.settings.weights.items(), key=lambda item: -abs(item[1]))
    return [{"feature": name, "weight": round(w, 3)} for name, w in weights[:TAUGHT]]


def _fused_score_curve(rows: pd.DataFrame, threshold: float | None) -> dict[str, Any]:
    scores = rows["fused"].to_numpy(dtype=np.float64)
    top = max(float(np.nanmax(scores)) if len(scores) else 1.0, threshold or 0.0, 1.0)
    grid = np.round(np.linspace(0.0, top * 1.05, 101), 4)
    curve = pr_curve(scores, rows["same"].to_numpy(dtype=bool), grid)
    marked = threshold if threshold is not None else float(grid[0])
    return {
        "name": "fused (formula score)",
        "unit": "fused score",
        **curve,
        "in_force": threshold,
        "at_threshold": _at(curve, marked),
    }


def _prediction(matched: np.ndarray, pairs: ReviewPairs) -> dict[str, int]:
    frame = pairs.frame[matched]
    products = set(frame["a"].tolist()) | set(frame["b"].tolist())
    return {"matched_pairs": int(matched.sum()), "products_with_a_match": len(products)}


def _settled(
    scored: ScoredPairs, labels: Sequence[PairLabel], operating: float
) -> dict[str, Any] | None:
    """How far the operating point moves when the last HOLD_BACK answers are left out (None
    with too few answers to tell)."""
    if len(labels) < 2 * HOLD_BACK:
        return None
    try:
        earlier = fit_calibration(scored, labels[:-HOLD_BACK]).min_probability
    except ConfigError:
        return None
    shift = abs(operating - earlier)
    return {
        "left_out": HOLD_BACK,
        "without_them": earlier,
        "shift": round(shift, 4),
        "settled": shift < SETTLED_SHIFT,
    }


def chart_svg(report: Mapping[str, Any]) -> str:
    """The report's curves as one SVG: a panel per modality and one for the fused decision
    (precision, recall, F1 against the threshold; the threshold in force dashed; the catalog's
    expected F1 dotted). Raises ConfigError when the report has no curve (no answered pair)."""
    panels = [*report.get("signals", []), *([report["fused"]] if report.get("fused") else [])]
    if not panels:
        raise ConfigError("no answered pair is a candidate pair yet: nothing to draw")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    for axis, panel in zip(axes.flat, panels, strict=False):
        _draw_panel(axis, panel)
    axes.flat[0].legend(loc="lower left", fontsize=7)
    figure.tight_layout()
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg")
    plt.close(figure)
    return buffer.getvalue()


def _draw_panel(axis: Any, panel: Mapping[str, Any]) -> None:
    x = panel["threshold"]
    for key, colour in (("precision", "#1f77b4"), ("recall", "#ff7f0e"), ("f1", "#2ca02c")):
        values = [np.nan if v is None else v for v in panel[key]]
        axis.plot(x, values, color=colour, label=key if key != "f1" else "F1")
    expected = panel.get("expected")
    if expected:
        axis.plot(
            expected["threshold"],
            expected["f1"],
            ":",
            color="#2ca02c",
            label="expected F1, catalog",
        )
    if panel.get("in_force") is not None:
        axis.axvline(
            panel["in_force"], color="#555", linestyle="--", linewidth=1, label="threshold in force"
        )
    axis.set_title(panel["name"], fontsize=9)
    axis.set_xlabel(panel["unit"], fontsize=8)
    axis.set_ylim(-0.02, 1.02)
    axis.tick_params(labelsize=7)
    axis.grid(alpha=0.3)
