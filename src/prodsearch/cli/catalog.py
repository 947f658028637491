"""Catalog commands: ingest (with column mapping, dry runs), info, recipes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from prodsearch.cli.common import (
    CollectionOption,
    JsonOption,
    RayAddressOption,
    RayOption,
    StoreOption,
    WorkersOption,
    _print_json,
    _reports_errors,
    _settings,
    _stdout,
    app,
    stderr,
)
from prodsearch.errors import ConfigError

if TYPE_CHECKING:
    from prodsearch.catalog import Catalog, Rejection
    from prodsearch.columns import MappedCatalog
    from prodsearch.settings import IngestSettings, Settings


IdColumnOption = Annotated[
    str | None,
    typer.Option(
        help="Column of the product id (default: the recipe's, or guessed: id, sku, ...)."
    ),
]
TitleColumnOption = Annotated[
    str | None,
    typer.Option(help="Column of the title (default: the recipe's, or guessed: title, name, ...)."),
]
ImageColumnOption = Annotated[
    str | None,
    typer.Option(
        help="Column of the image path; '' for none (default: the recipe's, or guessed: image, "
        "image_url, Image Src, ...)."
    ),
]
PhashColumnOption = Annotated[
    str | None,
    typer.Option(
        help="Column of a 16-hex-digit perceptual hash (default: the recipe's, or guessed: "
        "image_phash, phash)."
    ),
]
TextColumnsOption = Annotated[
    str | None,
    typer.Option(
        help="Columns whose texts, joined in this order, are the title signal, e.g. name,brand "
        "(the title column goes first unless listed)."
    ),
]
DelimiterOption = Annotated[
    str | None, typer.Option(help="CSV delimiter (default: the recipe's, or detected).")
]
EncodingOption = Annotated[
    str | None,
    typer.Option(
        help="CSV text encoding, e.g. cp1252 (default: the recipe's, or detected: UTF-8 with or "
        "without BOM, cp1252, latin-1)."
    ),
]


@app.command()
@_reports_errors
def ingest(
    catalog: Annotated[
        str,
        typer.Argument(
            help="The catalog: CSV, Parquet or JSON Lines (with --ray: CSV or Parquet, a path "
            "or an object-store URI Ray reads, e.g. s3://bucket/catalog.parquet)."
        ),
    ],
    store: StoreOption = None,
    collection: CollectionOption = None,
    recipe: Annotated[
        str | None,
        typer.Option(
            help="Column mapping: a built-in name (see `prodsearch recipes`) or a .toml path "
            "(default: none; the columns are guessed from the header)."
        ),
    ] = None,
    id_column: IdColumnOption = None,
    title_column: TitleColumnOption = None,
    image_column: ImageColumnOption = None,
    phash_column: PhashColumnOption = None,
    text_columns: TextColumnsOption = None,
    images_dir: Annotated[
        Path | None,
        typer.Option(help="Folder image paths are relative to (default: the catalog's folder)."),
    ] = None,
    delimiter: DelimiterOption = None,
    encoding: EncodingOption = None,
    report: Annotated[
        Path | None,
        typer.Option(help="Where to write rejected rows (default: CATALOG.rejects.csv)."),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Products per upsert batch.")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Validate the whole file (images too) and print the mapping, counts and bad "
            "rows; write nothing.",
        ),
    ] = False,
    assign: Annotated[
        bool,
        typer.Option(
            "--assign",
            help="Put each new or changed product in a stored product cluster (the decision "
            "dedup uses), or start one; a product linking two clusters proposes a merge.",
        ),
    ] = False,
    ray: RayOption = False,
    ray_address: RayAddressOption = None,
    workers: WorkersOption = 2,
    as_json: JsonOption = False,
) -> None:
    """Upsert a catalog's products (named vectors + payload) into a collection; re-runs resume.

    Which column is which comes from the flags, the settings file or a recipe, and is otherwise
    guessed from the header (printed before anything is written: `title <- name (guessed)`).
    Exit code 0 when products were ingested (bad rows are skipped and reported), 1 when none
    could be.
    """
    from prodsearch.catalog import catalog_from_table

    settings = _settings(store, collection, batch_size=batch_size)
    flags = {"id_column": id_column, "title_column": title_column}
    flags |= {"image_column": image_column, "phash_column": phash_column}
    flags |= {"text_columns": text_columns, "delimiter": delimiter, "encoding": encoding}
    if ray:
        if dry_run or assign:
            raise ConfigError("--ray does not take --dry-run or --assign: run them without --ray")
        choices = _column_choices(settings, flags)
        where = (images_dir, report)
        _ray_ingest(catalog, ray_address, workers, settings, recipe, choices, where, as_json)
        return
    path = Path(catalog)
    mapped = _mapped_catalog(path, recipe, settings, **flags)
    rows = catalog_from_table(mapped.table, mapped.recipe, images_dir)
    if dry_run:
        _dry_run(rows, mapped, settings.max_image_pixels, as_json)
        return

    from prodsearch.index import Index
    from prodsearch.ingest import ingest_catalog

    report_path = report or path.with_name(path.stem + ".rejects.csv")
    with Index(settings=settings) as index:
        if assign:
            result, assigned = _assigning_ingest(index, rows, report_path)
        else:
            result = ingest_catalog(index, rows, report_path=report_path, console=stderr)
            assigned = None
        total = index.count()
    summary = {
        **result.as_dict(),
        **({"assigned": assigned} if assigned is not None else {}),
        "collection": settings.collection,
        "store": settings.store,
        "products_in_collection": total,
    }
    document = {**summary, "columns": mapped.as_dict()}
    _ingest_outcome(result, summary, document, f"ingest {path.name}", as_json)


def _ingest_outcome(
    result: Any, summary: dict[str, Any], document: dict[str, Any], title: str, as_json: bool
) -> None:
    """Print an ingest's `summary` (as JSON: `document`), its first rejected rows; exit code 1
    when no product could be ingested."""
    if as_json:
        _print_json(document)
    else:
        title = f"{title} -> {summary['collection']}"
        _print_summary(title, summary, result.rejections, f"in {result.report_path}")
    if result.upserted + result.unchanged == 0:
        stderr.print("[red]error:[/red] no product could be ingested")
        raise typer.Exit(1)


def _ray_ingest(
    catalog: str,
    address: str | None,
    workers: int,
    settings: Settings,
    recipe: str | None,
    choices: IngestSettings,
    where: tuple[Path | None, Path | None],
    as_json: bool,
) -> None:
    """`ingest --ray`: the catalog read by Ray Data and encoded by `workers` actors
    (scaleout/ingest.py); the same summary, report and exit code as the local ingest. `where`:
    the images folder and the report file, when given."""
    from prodsearch.index import Index
    from prodsearch.recipes import load_recipe
    from prodsearch.scaleout import start_ray
    from prodsearch.scaleout.ingest import ray_ingest

    images_dir, report = where
    start_ray(address)
    name = catalog.rstrip("/").rsplit("/", 1)[-1]
    report_path = report or (
        Path(catalog).with_name(Path(name).stem + ".rejects.csv")
        if "://" not in catalog
        else Path(Path(name).stem + ".rejects.csv")
    )
    with Index(settings=settings) as index:
        result = ray_ingest(
            index,
            catalog,
            choices,
            load_recipe(recipe) if recipe else None,
            workers=workers,
            images_dir=images_dir,
            report_path=report_path,
            console=stderr,
        )
        total = index.count()
    summary = {
        **result.as_dict(),
        "ray": address or "local",
        "workers": workers,
        "collection": settings.collection,
        "store": settings.store,
        "products_in_collection": total,
    }
    _ingest_outcome(result, summary, summary, f"ingest --ray {name}", as_json)


def _assigning_ingest(index: Any, rows: Catalog, report_path: Path) -> tuple[Any, dict]:
    """Ingest, each stored batch assigned to the stored clusters; returns the ingest report and
    how many products founded a cluster, joined one, proposed a merge."""
    from prodsearch.ingest import ingest_catalog
    from prodsearch.matching.assign import Assigner
    from prodsearch.matching.cluster_log import ClusterLog
    from prodsearch.matching.clusters import sync_payloads
    from prodsearch.state import state_file

    counts = {"founded": 0, "joined": 0, "proposed_merges": 0}
    index.ensure_collection()
    with ClusterLog(state_file(index.settings, "clusters")) as log:
        assigner = Assigner(index, log)

        def after_batch(product_ids: list[str]) -> None:
            for assignment in assigner.assign_pending(product_ids):
                counts[assignment.how] += 1
                counts["proposed_merges"] += len(assignment.proposed_merges)

        result = ingest_catalog(
            index, rows, report_path=report_path, console=stderr, after_batch=after_batch
        )
        sync_payloads(index, log)
    return result, counts


def _mapped_catalog(
    catalog: Path, recipe: str | None, settings: Settings, **flags: str | None
) -> MappedCatalog:
    """Read `catalog` with the column choices of `flags` over the settings' [ingest] table (and
    `recipe`, a name or path, when given); print what was read and the mapping on stderr.
    Raises ConfigError or CatalogError (see `map_catalog`)."""
    from prodsearch.columns import map_catalog
    from prodsearch.recipes import load_recipe

    choices = _column_choices(settings, flags)
    mapped = map_catalog(catalog, choices, load_recipe(recipe) if recipe else None)
    for line in mapped.describe():
        stderr.print(line, highlight=False, markup=False, soft_wrap=True)
    return mapped


def _column_choices(settings: Settings, flags: dict[str, str | None]) -> IngestSettings:
    """The column choices of `flags` (None: not given) over the settings' [ingest] table.
    Raises ConfigError when they are invalid."""
    from pydantic import ValidationError

    from prodsearch.settings import IngestSettings

    given = {name: value for name, value in flags.items() if value is not None}
    try:
        return IngestSettings.model_validate({**settings.ingest.model_dump(), **given})
    except ValidationError as exc:
        raise ConfigError(f"invalid column options: {exc}") from exc


def read_mapped_catalog(
    catalog: Path, recipe: str | None, settings: Settings, images_dir: Path | None = None
) -> Catalog:
    """A catalog file's valid and rejected rows, its columns mapped as `ingest` maps them (the
    recipe when given, else the settings' [ingest] table and the header's guesses)."""
    from prodsearch.catalog import catalog_from_table

    mapped = _mapped_catalog(catalog, recipe, settings)
    return catalog_from_table(mapped.table, mapped.recipe, images_dir)


def _dry_run(catalog: Catalog, mapped: MappedCatalog, max_image_pixels: int, as_json: bool) -> None:
    """Report what ingesting `catalog` would do (its images decoded as ingest would), writing
    nothing; exit code 1 when no product is valid."""
    from collections import Counter
    from dataclasses import asdict

    from prodsearch.ingest import check_images

    checked = check_images(catalog, max_image_pixels)
    rejections = sorted(checked.rejections, key=lambda r: r.row)
    summary = {
        "dry_run": True,
        "rows_read": checked.rows_read,
        "valid": len(checked.rows),
        "skipped": len(rejections),
        "skipped_by_field": dict(Counter(r.field for r in rejections)),
    }
    if as_json:
        rejected = [asdict(r) for r in rejections]
        _print_json({**summary, "columns": mapped.as_dict(), "rejections": rejected})
    else:
        title = "dry run: nothing written"
        _print_summary(title, summary, rejections, "(--json lists every one)")
    if not checked.rows:
        stderr.print("[red]error:[/red] no product could be ingested")
        raise typer.Exit(1)


def _print_summary(
    title: str, summary: dict[str, Any], rejections: list[Rejection], more: str
) -> None:
    """Print `summary` as a table on stderr, then the first ten rejected rows."""
    table = Table(title=title, show_header=False)
    for key, value in summary.items():
        table.add_row(key, str(value))
    stderr.print(table)
    for rejection in rejections[:10]:
        stderr.print(
            f"  row {rejection.row} ({rejection.field}): {rejection.reason}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    if len(rejections) > 10:
        stderr.print(f"  ... {len(rejections) - 10} more {more}", markup=False)


@app.command()
@_reports_errors
def info(
    store: StoreOption = None, collection: CollectionOption = None, as_json: JsonOption = False
) -> None:
    """Show a collection's size and the encoders that wrote it."""
    from prodsearch.store import open_store

    settings = _settings(store, collection)
    with open_store(settings.store) as opened:
        manifest = opened.manifest(settings.collection)
        document = {
            "store": settings.store,
            "collection": settings.collection,
            "products": opened.count(settings.collection),
            **manifest.as_dict(),
        }
    if as_json:
        _print_json(document)
    else:
        _stdout().print_json(json.dumps(document, default=str))


@app.command()
@_reports_errors
def recipes(
    from_: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Write a recipe for this catalog file instead: the columns the flags name, the "
            "rest guessed, and the delimiter and encoding it was read with.",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Write the recipe to this .toml file (default: stdout).")
    ] = None,
    id_column: IdColumnOption = None,
    title_column: TitleColumnOption = None,
    image_column: ImageColumnOption = None,
    phash_column: PhashColumnOption = None,
    text_columns: TextColumnsOption = None,
    delimiter: DelimiterOption = None,
    encoding: EncodingOption = None,
) -> None:
    """List the built-in catalog recipes; with --from, write a recipe for a catalog file (then
    `prodsearch ingest CATALOG --recipe FILE.toml` maps it the same way every time)."""
    from prodsearch.recipes import builtin_recipes, load_recipe

    flags = {
        "id_column": id_column,
        "title_column": title_column,
        "image_column": image_column,
        "phash_column": phash_column,
        "text_columns": text_columns,
        "delimiter": delimiter,
        "encoding": encoding,
    }
    if from_ is None:
        used = [f"--{name.replace('_', '-')}" for name, value in flags.items() if value is not None]
        if used or out:
            raise ConfigError(f"{', '.join(used) or '--out'}: only with --from CATALOG")
        for name in builtin_recipes():
            typer.echo(f"{name:16} {load_recipe(name).description}")
        typer.echo(
            f"{'(no --recipe)':16} Columns guessed from the header, delimiter and "
            "encoding detected."
        )
        return
    if out is not None and out.suffix != ".toml":
        raise ConfigError(f"--out {out}: a recipe file's name ends in .toml (--recipe reads it so)")
    mapped = _mapped_catalog(from_, None, _settings(None, None), **flags)
    text = (
        f"# Written by `prodsearch recipes --from {from_.name}`; "
        f"use it with `prodsearch ingest CATALOG --recipe {out or 'FILE.toml'}`.\n"
        + mapped.recipe.to_toml()
    )
    if out is None:
        sys.stdout.write(text)
        return
    out.write_text(text, encoding="utf-8")
    stderr.print(f"recipe written to {out}", highlight=False)
