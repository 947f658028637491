"""The whole-catalog rows of the evaluation: each `dedup` step added in turn, its knobs tuned on
val's labelled table with the decision functions `dedup` runs, every figure from `run_dedup`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from prodsearch.eval.report import MethodResult
from prodsearch.eval.tuning import (
    FUSED_GRID,
    LabelledTable,
    tune_formula,
    tune_min2,
    tune_probability,
    tune_single,
    tune_union,
)
from prodsearch.matching import decide
from prodsearch.matching.clusters import cluster_members
from prodsearch.matching.dedup import DedupResult, run_dedup
from prodsearch.matching.features import table_features
from prodsearch.matching.pair_model import PairModel, TrainingSet
from prodsearch.settings import DedupSettings, SearchSettings


def dedup_rows(
    data: dict[str, Any], search: SearchSettings, knobs: DedupSettings, console: Console
) -> tuple[list[MethodResult], dict[str, Any], PairModel]:
    """min-2, blending, blending + min-2 and its clusters under the fusion decider, then the
    pair model fitted on val (with min-2, and its clusters); returns the rows, the tuned `dedup`
    settings (a settings-file table) and the pair model."""
    rows = _Rows(data["val"], data["test"], search, console)
    both = rows.fusion_rows(knobs)
    blending_f1 = rows.rows[-2].val.f1
    console.print("dedup: fitting the pair model on val")
    model, pair_knobs, f1_plain, f1_min2 = _fit_pair_model(data["val"], search, knobs)
    with tempfile.TemporaryDirectory(prefix="prodsearch-pair-model-") as folder:
        model.save(Path(folder) / "pair_model.json")
        saved = pair_knobs.model_copy(update={"model": Path(folder) / "pair_model.json"})
        pair = knobs.model_copy(update={"decider": "pair-model", "pair_model": saved})
        rows.report(
            "dedup: pair model (stacked trees over candidates; val F1 in-sample, see config)",
            {"min_probability": saved.min_probability, "val_f1_out_of_fold": round(f1_plain, 4)},
            pair.model_copy(update={"min2": False}),
        )
        rows.report(
            "dedup: pair model + min-2",
            {"min2_min_probability": saved.min2_min_probability, "val_f1_out_of_fold": f1_min2},
            pair,
            clusters=True,
        )
    # the pair model is chosen on honest val figures: out of fold against blending + min-2
    decider = "pair-model" if f1_min2 > blending_f1 else "fusion"
    tuned = both.model_copy(update={"decider": decider, "pair_model": pair_knobs})
    return rows.rows, tuned.model_dump(mode="json", exclude={"pair_model": {"model"}}), model


class _Rows:
    """The whole-catalog rows of one evaluation, each from `run_dedup` on val and test."""

    def __init__(self, val: Any, test: Any, search: SearchSettings, console: Console) -> None:
        self.val, self.test, self.search, self.console = val, test, search, console
        self.rows: list[MethodResult] = []

    def report(
        self, method: str, config: dict, knobs: DedupSettings, clusters: bool = False
    ) -> DedupResult:
        """Run `dedup` on val and test and add its row (and its clusters' row); returns val's
        run."""
        self.console.print(f"dedup: {method} on val and test")
        splits = (self.val, self.test)
        results = [run_dedup(split.index, knobs, search=self.search) for split in splits]
        pairs = list(zip(splits, results, strict=True))
        self.rows.append(
            MethodResult(method, config, *(s.scores(r.match_sets()) for s, r in pairs))
        )
        if clusters:
            cap = {"max_cluster_size": knobs.max_cluster_size}
            scores = (_cluster_scores(s, r) for s, r in pairs)
            self.rows.append(
                MethodResult("dedup: clusters (capped components) of the above", cap, *scores)
            )
        return results[0]

    def tuned_min2(self, result: DedupResult) -> float:
        """min-2's minimum fused score over a run's decision, tuned on val."""
        labelled = LabelledTable.from_groups(result.table, self.val.groups, set(self.val.ids))
        return tune_min2(labelled, result.table.matched(), result.table.fused, FUSED_GRID)

    def fusion_rows(self, knobs: DedupSettings) -> DedupSettings:
        """The fusion decider's rows: + min-2, + 1 blending round, + both (and its clusters);
        returns the settings of the last."""
        val, search = self.val, self.search
        fusion = knobs.fusion.model_copy(update={"blend_rounds": 0})
        plain = knobs.model_copy(update={"decider": "fusion", "min2": False, "fusion": fusion})
        minimum = self.tuned_min2(run_dedup(val.index, plain, search=search))
        fusion = fusion.model_copy(update={"min2_min_fused_score": minimum})
        with_min2 = plain.model_copy(update={"min2": True, "fusion": fusion})
        self.report("dedup: fused + min-2", {"min2_min_fused_score": minimum}, with_min2)
        self.console.print("dedup: tuning the blended search on val")
        fusion = knobs.fusion.model_copy(update={"blend_rounds": 1})
        first = run_dedup(val.index, plain.model_copy(update={"fusion": fusion}), search=search)
        blended = _tune_blended(first, val, search)
        blending = plain.model_copy(
            update={"fusion": fusion.model_copy(update={"blended": blended})}
        )
        config = {"blended": blended.model_dump(mode="json")}
        minimum = self.tuned_min2(self.report("dedup: fused + 1 blending round", config, blending))
        fusion = blending.fusion.model_copy(update={"min2_min_fused_score": minimum})
        both = blending.model_copy(update={"min2": True, "fusion": fusion})
        config = {"min2_min_fused_score": minimum}
        self.report("dedup: fused + blending + min-2", config, both, clusters=True)
        return both


def _tune_blended(result: DedupResult, val: Any, search: SearchSettings) -> SearchSettings:
    """The blended collection's search (RRF thresholds or the formula, whichever scores higher
    on val), tuned on the candidate table of one blending round."""
    labelled = LabelledTable.from_groups(result.table, val.groups, set(val.ids))
    modalities = result.table.modalities()
    union = tune_union(labelled, modalities, {m: tune_single(labelled, m) for m in modalities})
    floors = search.formula.floors
    weights, minimum = tune_formula(labelled, modalities, floors)
    union_f1 = labelled.f1(decide.modality_passes(result.table, union))
    formula_f1 = labelled.f1(decide.formula_scores(result.table, weights, floors) >= minimum)
    return SearchSettings(
        fusion="formula" if formula_f1 > union_f1 else "rrf",
        thresholds=search.thresholds.model_copy(update=union),
        formula=search.formula.model_copy(
            update={
                "weights": search.formula.weights.model_copy(update=weights),
                "min_fused_score": minimum,
            }
        ),
    )


def _fit_pair_model(
    val: Any, search: SearchSettings, knobs: DedupSettings
) -> tuple[PairModel, Any, float, float]:
    """Fit the pair model on the candidate pairs of val's own products (candidates of `search`'s
    formula); tune its probabilities for row F1 on out-of-fold probabilities (group-disjoint
    folds). Returns the model (fitted on every own pair), its knobs, and the out-of-fold F1
    without and with min-2."""
    labelled = val.label(search)
    table = labelled.table
    groups = np.array([val.groups[pid] for pid in table.ids])[table.a]
    own = labelled.queries[table.a].astype(np.float64)
    fitting = TrainingSet(table, table_features(table, val.products), labelled.same, groups, own)
    model, (probability,) = PairModel.fit([fitting])
    min_probability, min2 = tune_probability(labelled, probability)
    matched = probability >= min_probability
    with_min2 = matched | decide.min2_additions(table, matched, probability, min2)
    tuned = knobs.pair_model.model_copy(
        update={"min_probability": min_probability, "min2_min_probability": min2}
    )
    return model, tuned, labelled.f1(matched), labelled.f1(with_min2)


def _cluster_scores(split: Any, result: DedupResult) -> Any:
    members = cluster_members(result.clusters)
    return split.scores({pid: members[result.clusters[pid]] for pid in split.ids})
