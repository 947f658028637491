"""Evaluation commands: eval (group or pair labels) and eval-images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from prodsearch.cli.common import (
    JsonOption,
    _print_json,
    _reports_errors,
    _settings,
    _stdout,
    app,
    stderr,
)
from prodsearch.errors import ConfigError

EncodersOption = Annotated[
    str | None,
    typer.Option(
        help="finetuned (the shipped ArcFace encoders, default), finetuned+charcnn or pretrained."
    ),
]


CatalogEvalOption = Annotated[
    Path | None,
    typer.Argument(help="Labelled catalog CSV (e.g. Shopee train.csv); not with --pairs."),
]

SplitFileEvalOption = Annotated[
    Path | None,
    typer.Option(help="Group labels: a CSV of id,split with val and test rows."),
]

PairsEvalOption = Annotated[
    Path | None,
    typer.Option(help="Pair labels with their records (LEFT<TAB>RIGHT<TAB>LABEL lines)."),
]

LabelsEvalOption = Annotated[
    Path | None,
    typer.Option(help="Pair labels of CATALOG's products: a CSV of id_a,id_b,same."),
]

TrainEvalOption = Annotated[
    Path | None,
    typer.Option(
        help="Train labels in the same format as --pairs / --labels: the TF-IDF baseline's "
        "threshold is tuned on them."
    ),
]

RecipeEvalOption = Annotated[
    str | None, typer.Option(help="Column mapping (see `prodsearch recipes`).")
]

LabelColumnEvalOption = Annotated[str, typer.Option(help="Column holding the product group.")]

StoreEvalOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="Where to build the evaluation collections (default: a temporary directory).",
    ),
]

WriteSettingsEvalOption = Annotated[
    Path | None,
    typer.Option(help="Write the tuned thresholds and fusion to this TOML settings file."),
]

ValCatalogSizeEvalOption = Annotated[
    int | None,
    typer.Option(
        min=0,
        help="Products in the catalog the val queries search: val plus whole train groups "
        "as distractors (default: the test catalog's size; 0: val alone).",
    ),
]


@app.command(name="eval")
@_reports_errors
def evaluate(
    catalog: CatalogEvalOption = None,
    split_file: SplitFileEvalOption = None,
    pairs: PairsEvalOption = None,
    labels: LabelsEvalOption = None,
    train: TrainEvalOption = None,
    recipe: RecipeEvalOption = None,
    label_column: LabelColumnEvalOption = "label_group",
    store: StoreEvalOption = None,
    encoders: EncodersOption = None,
    write_settings: WriteSettingsEvalOption = None,
    val_catalog_size: ValCatalogSizeEvalOption = None,
    as_json: JsonOption = False,
) -> None:
    """Measure matching against labels.

    Group labels (`CATALOG --split-file F`): tune thresholds, fusion and the pair model on
    `val`, report precision/recall/F1 on `test` (each split its own collection, every product in
    its own match set, the val catalog topped up with `train` rows to the test catalog's size).
    Pair labels (`--pairs FILE`, or `CATALOG --labels FILE`): run the `dedup` a user runs on the
    labelled catalog, nothing tuned on it, and report pair precision/recall/F1. Either way the
    char TF-IDF baseline runs in the same pass.
    """
    settings = _settings(None, None, encoders=encoders)
    if split_file is not None:
        if catalog is None:
            raise ConfigError("--split-file needs the CATALOG it splits")
        _group_eval(
            catalog,
            split_file,
            recipe or "shopee",
            label_column,
            store,
            settings,
            val_catalog_size,
            write_settings,
            as_json,
        )
        return
    _pair_eval(catalog, pairs, labels, train, recipe or "generic", store, settings, as_json)


def _pair_eval(
    catalog: Path | None,
    pairs: Path | None,
    labels: Path | None,
    train: Path | None,
    recipe: str,
    store: str | None,
    settings: Any,
    as_json: bool,
) -> None:
    """The pair-labelled evaluation and its table."""
    from prodsearch.eval.pairs import load_labelled, run_pair_evaluation

    valid = load_labelled(pairs, catalog, labels, recipe)
    trained = None
    if train is not None:  # in the format of the labels evaluated
        trained = (
            load_labelled(train, None, None, recipe)
            if pairs
            else load_labelled(None, catalog, train, recipe)
        )
    result = run_pair_evaluation(valid, trained, settings=settings, store=store, console=stderr)
    if as_json:
        _print_json(result.as_dict())
        return
    table = Table(
        title=f"{result.catalog}: {result.products:,} products, "
        f"{result.labelled_pairs:,} labelled pairs ({result.positive_pairs:,} same)"
    )
    for column in ("method", "pair P", "pair R", "pair F1", "row F1"):
        table.add_column(column)
    table.add_row(
        f"dedup ({result.decided_by})",
        *(f"{v:.4f}" for v in vars(result.dedup).values()),
        f"{result.dedup_row_f1:.4f}",
    )
    if result.baseline:
        table.add_row(
            f"TF-IDF, threshold {result.baseline_threshold} tuned on train",
            *(f"{v:.4f}" for v in vars(result.baseline).values()),
            "",
        )
    table.add_row("no match at all", "", "0.0000", "", f"{result.no_match_row_f1:.4f}")
    _stdout().print(table)


def _group_eval(
    catalog: Path,
    split_file: Path,
    recipe: str,
    label_column: str,
    store: str | None,
    settings: Any,
    val_catalog_size: int | None,
    write_settings: Path | None,
    as_json: bool,
) -> None:
    from prodsearch.eval.report import format_table
    from prodsearch.eval.shopee import run_evaluation

    result = run_evaluation(
        catalog,
        split_file,
        recipe=recipe,
        label_column=label_column,
        store=store,
        settings=settings,
        console=stderr,
        val_catalog_size=val_catalog_size,
    )
    if write_settings:
        result.write_settings(write_settings)
        stderr.print(f"tuned settings written to {write_settings}")
    if as_json:
        _print_json(result.as_dict())
    else:
        _stdout().print(format_table(result))


@app.command(name="eval-images")
@_reports_errors
def evaluate_images(
    grocery_dir: Annotated[
        Path, typer.Argument(help="The grocery_store folder (images.csv + images/).")
    ],
    encoders: EncodersOption = None,
    as_json: JsonOption = False,
) -> None:
    """Image-modality quality on Grocery Store test photos: top-1 accuracy of the nearest
    catalogue image and mAP@R among test photos, for Packages and for all 81 groups."""
    from prodsearch.encoders import EncoderSet
    from prodsearch.eval.images import grocery_image_metrics

    settings = _settings(None, None, encoders=encoders)
    metrics = grocery_image_metrics(grocery_dir, EncoderSet.from_settings(settings.encoders))
    if as_json:
        _print_json({"encoders": settings.encoders, **metrics})
        return
    table = Table(title=f"grocery_store test photos, {settings.encoders} image encoder")
    for column in ("subset", "test photos", "mAP@R", "top-1 to catalogue"):
        table.add_column(column)
    for name, values in metrics.items():
        table.add_row(
            name,
            str(values["test_photos"]),
            f"{values['map_at_r']:.4f}",
            f"{values['top1_to_catalogue']:.4f}",
        )
    _stdout().print(table)
