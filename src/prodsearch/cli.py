"""The `prodsearch` command line. `--json` output is one JSON document on stdout; progress, logs
and tables go to stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from enum import StrEnum
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from prodsearch.errors import ConfigError, ProdsearchError

if TYPE_CHECKING:  # heavy imports wait until a command needs them
    from prodsearch.catalog import Catalog, Rejection
    from prodsearch.columns import MappedCatalog
    from prodsearch.settings import Settings

app = typer.Typer(
    help="Product matching for e-commerce catalogs on Qdrant.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stderr = Console(stderr=True)


def _stdout() -> Console:
    """A console for results on stdout; wide when piped, so rows are not wrapped mid-title."""
    return Console() if sys.stdout.isatty() else Console(width=200)


F = TypeVar("F", bound=Callable[..., Any])

StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="Directory (embedded Qdrant Edge), http(s):// URL (Qdrant server), local:DIR or "
        ":memory: (qdrant-client local mode). Default: PRODSEARCH_STORE or ./prodsearch-data.",
    ),
]
CollectionOption = Annotated[
    str | None, typer.Option("--collection", help="Collection name. Default: products.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


class Decider(StrEnum):
    """What decides a match in `dedup`."""

    pair_model = "pair-model"
    fusion = "fusion"


def _reports_errors(command: F) -> F:
    """Turn project errors into a one-line message on stderr and exit code 1."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ProdsearchError as exc:
            stderr.print(f"[red]error:[/red] {exc}", highlight=False)
            raise typer.Exit(1) from exc

    return wrapper  # type: ignore[return-value]


def _settings(store: str | None, collection: str | None, **extra: Any) -> Any:
    from pydantic import ValidationError

    from prodsearch.settings import Settings

    overrides = {
        k: v
        for k, v in {"store": store, "collection": collection, **extra}.items()
        if v is not None
    }
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {exc}") from exc


def _print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


# Reading a catalog file: the options `ingest` and `recipes --from` share (settings: [ingest]).
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
    catalog: Annotated[Path, typer.Argument(help="The catalog: CSV, Parquet or JSON Lines.")],
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
    mapped = _mapped_catalog(
        catalog,
        recipe,
        settings,
        id_column=id_column,
        title_column=title_column,
        image_column=image_column,
        phash_column=phash_column,
        text_columns=text_columns,
        delimiter=delimiter,
        encoding=encoding,
    )
    rows = catalog_from_table(mapped.table, mapped.recipe, images_dir)
    if dry_run:
        _dry_run(rows, mapped, settings.max_image_pixels, as_json)
        return

    from prodsearch.index import Index
    from prodsearch.ingest import ingest_catalog

    report_path = report or catalog.with_name(catalog.stem + ".rejects.csv")
    with Index(settings=settings) as index:
        result = ingest_catalog(index, rows, report_path=report_path, console=stderr)
        total = index.count()
    summary = {
        **result.as_dict(),
        "collection": settings.collection,
        "store": settings.store,
        "products_in_collection": total,
    }
    if as_json:
        _print_json({**summary, "columns": mapped.as_dict()})
    else:
        title = f"ingest {catalog.name} -> {settings.collection}"
        _print_summary(title, summary, result.rejections, f"in {result.report_path}")
    if result.upserted + result.unchanged == 0:
        stderr.print("[red]error:[/red] no product could be ingested")
        raise typer.Exit(1)


def _mapped_catalog(
    catalog: Path, recipe: str | None, settings: Settings, **flags: str | None
) -> MappedCatalog:
    """Read `catalog` with the column choices of `flags` over the settings' [ingest] table (and
    `recipe`, a name or path, when given); print what was read and the mapping on stderr.
    Raises ConfigError or CatalogError (see `map_catalog`)."""
    from pydantic import ValidationError

    from prodsearch.columns import map_catalog
    from prodsearch.recipes import load_recipe
    from prodsearch.settings import IngestSettings

    given = {name: value for name, value in flags.items() if value is not None}
    try:
        choices = IngestSettings.model_validate({**settings.ingest.model_dump(), **given})
    except ValidationError as exc:
        raise ConfigError(f"invalid column options: {exc}") from exc
    mapped = map_catalog(catalog, choices, load_recipe(recipe) if recipe else None)
    for line in mapped.describe():
        stderr.print(line, highlight=False, markup=False, soft_wrap=True)
    return mapped


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
def match(
    title: Annotated[str | None, typer.Option(help="Product title.")] = None,
    image: Annotated[Path | None, typer.Option(help="Product image file.")] = None,
    phash: Annotated[str | None, typer.Option(help="A known 16-hex-digit perceptual hash.")] = None,
    k: Annotated[int | None, typer.Option(min=1, help="Matches to return.")] = None,
    fusion: Annotated[str | None, typer.Option(help="rrf, dbsf or formula.")] = None,
    threshold: Annotated[
        list[str] | None,
        typer.Option(help="Per-modality threshold override, e.g. text=0.8 (repeatable)."),
    ] = None,
    filter_: Annotated[
        list[str] | None,
        typer.Option("--filter", help="Payload filter key=value or key!=value (repeatable)."),
    ] = None,
    store: StoreOption = None,
    collection: CollectionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Find the catalog products matching a title and/or an image."""
    from prodsearch.filters import parse_cli_filters
    from prodsearch.index import Index

    if fusion not in (None, "rrf", "dbsf", "formula"):
        raise ConfigError(f"--fusion {fusion!r}: choose rrf, dbsf or formula")
    thresholds = {}
    for item in threshold or []:
        name, _, value = item.partition("=")
        try:
            thresholds[name] = float(value)
        except ValueError as exc:
            raise ConfigError(f"--threshold {item!r}: expected modality=number") from exc
    settings = _settings(store, collection)
    with Index(settings=settings) as index:
        matches = index.match(
            title,
            image,
            phash=phash,
            k=k,
            thresholds=thresholds or None,
            fusion=fusion,  # type: ignore[arg-type]
            filter=parse_cli_filters(filter_ or []),
        )
    if as_json:
        _print_json(
            {
                "query": {"title": title, "image": str(image) if image else None},
                "matches": [m.as_dict() for m in matches],
            }
        )
        return
    table = Table(title=f"{len(matches)} match(es)")
    for column in ("product_id", "score", "matched by", "modality scores", "title"):
        table.add_column(column)
    for m in matches:
        table.add_row(
            m.product_id,
            f"{m.score:.3f}",
            ",".join(m.matched_by),
            " ".join(f"{k}={v:.3f}" for k, v in m.scores.items()),
            str(m.payload.get("title", ""))[:60],
        )
    _stdout().print(table)


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


EncodersOption = Annotated[
    str | None,
    typer.Option(
        help="finetuned (the shipped ArcFace encoders, default), finetuned+charcnn or pretrained."
    ),
]


@app.command(name="eval")
@_reports_errors
def evaluate(
    catalog: Annotated[
        Path | None,
        typer.Argument(help="Labelled catalog CSV (e.g. Shopee train.csv); not with --pairs."),
    ] = None,
    split_file: Annotated[
        Path | None,
        typer.Option(help="Group labels: a CSV of id,split with val and test rows."),
    ] = None,
    pairs: Annotated[
        Path | None,
        typer.Option(help="Pair labels with their records (LEFT<TAB>RIGHT<TAB>LABEL lines)."),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(help="Pair labels of CATALOG's products: a CSV of id_a,id_b,same."),
    ] = None,
    train: Annotated[
        Path | None,
        typer.Option(
            help="Train labels in the same format as --pairs / --labels: the TF-IDF baseline's "
            "threshold is tuned on them."
        ),
    ] = None,
    recipe: Annotated[
        str | None, typer.Option(help="Column mapping (see `prodsearch recipes`).")
    ] = None,
    label_column: Annotated[
        str, typer.Option(help="Column holding the product group.")
    ] = "label_group",
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            help="Where to build the evaluation collections (default: a temporary directory).",
        ),
    ] = None,
    encoders: EncodersOption = None,
    write_settings: Annotated[
        Path | None,
        typer.Option(help="Write the tuned thresholds and fusion to this TOML settings file."),
    ] = None,
    val_catalog_size: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Products in the catalog the val queries search: val plus whole train groups "
            "as distractors (default: the test catalog's size; 0: val alone).",
        ),
    ] = None,
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
    from prodsearch.eval.pairs import load_labelled, run_pair_evaluation

    recipe = recipe or "generic"
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


@app.command()
@_reports_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    store: StoreOption = None,
    collection: CollectionOption = None,
) -> None:
    """Serve the HTTP API (POST /match, POST /products, GET /health; OpenAPI at /docs).

    One process holds the models and the store; PRODSEARCH_API_KEY makes every route but
    /health require an X-API-Key header. The embedded engine allows one process per store
    directory: for several servers, use a Qdrant server (--store http://...).
    """
    import uvicorn

    from prodsearch.api import create_app
    from prodsearch.index import Index
    from prodsearch.store import open_store

    settings = _settings(store, collection)
    # Check the store first, so a locked store or mismatched encoders end in a one-line error
    # and exit code 1 rather than a failed server start-up. The app then opens it for itself, so
    # that it also closes it when uvicorn stops on a signal.
    with Index(
        open_store(settings.store, settings.collection_params()), settings=settings
    ) as index:
        if index.store.has_collection(index.collection):
            stderr.print(f"serving {index.count():,} products of {index.collection!r}")
        else:
            stderr.print(
                f"collection {index.collection!r} does not exist yet: POST /products or "
                "`prodsearch ingest` creates it"
            )
    uvicorn.run(create_app(settings), host=host, port=port)


@app.command()
@_reports_errors
def dedup(
    catalog: Annotated[
        Path | None,
        typer.Argument(help="Catalog CSV to ingest first (omit to use the collection as is)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Where to write id,matches,cluster,min2.")] = Path(
        "matches.csv"
    ),
    store: StoreOption = None,
    collection: CollectionOption = None,
    recipe: Annotated[
        str, typer.Option(help="Column mapping when a CATALOG is given.")
    ] = "generic",
    same: Annotated[
        list[str] | None, typer.Option(help="Matches must share this payload field (repeatable).")
    ] = None,
    different: Annotated[
        list[str] | None,
        typer.Option(help="Matches must differ in this payload field, e.g. seller (repeatable)."),
    ] = None,
    within: Annotated[
        list[str] | None,
        typer.Option(help="A numeric field within a fraction of the product's, e.g. price=0.2."),
    ] = None,
    filter_: Annotated[
        list[str] | None, typer.Option("--filter", help="Payload filter key=value (repeatable).")
    ] = None,
    min2: Annotated[
        bool | None, typer.Option("--min2/--no-min2", help="Give lone products a close neighbour.")
    ] = None,
    blend_rounds: Annotated[
        int | None, typer.Option(min=0, max=3, help="Neighbourhood-blending rounds.")
    ] = None,
    max_cluster_size: Annotated[
        int | None, typer.Option(min=1, help="Cap on a duplicate cluster's size.")
    ] = None,
    decider: Annotated[
        Decider | None,
        typer.Option(
            help="What decides a match: the learned pair model, or the fusion's own rule "
            "(default from settings: pair-model; fusion when --blend-rounds is given).",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Match every product of a collection against it: match sets, duplicate clusters, where the
    time went, and beside OUT the audit trail OUT.pairs.csv (every match's scores, the signals
    that fired, the pair model's probability). Resumable: a re-run after a kill reuses
    OUT.checkpoint.jsonl."""
    import time

    from prodsearch.catalog import read_catalog
    from prodsearch.filters import parse_cli_filters
    from prodsearch.index import Index
    from prodsearch.ingest import ingest_catalog
    from prodsearch.matching.candidates import RelativeFilters
    from prodsearch.matching.dedup import run_dedup
    from prodsearch.recipes import load_recipe

    settings = _settings(store, collection)
    knobs = _dedup_knobs(settings.dedup, decider, blend_rounds, min2, max_cluster_size)
    filters = RelativeFilters(
        same=tuple(same or ()),
        different=tuple(different or ()),
        within=tuple(_fraction(item) for item in within or ()),
        filter=parse_cli_filters(filter_ or []),
    )
    checkpoint = out.with_name(out.name + ".checkpoint.jsonl")
    started = time.perf_counter()
    with Index(settings=settings) as index:
        if catalog is not None:
            ingest_catalog(
                index,
                read_catalog(catalog, load_recipe(recipe)),
                console=stderr,
                report_path=catalog.with_name(catalog.stem + ".rejects.csv"),
            )
        ingested = time.perf_counter() - started

        def progress(step: str, done: int, total: int) -> None:
            if done == total or done % 2048 < 256:
                stderr.print(f"{step}: {done:,}/{total:,}", highlight=False)

        result = run_dedup(
            index,
            knobs,
            filters,
            strict=decider is not None,
            progress=progress,
            checkpoint=checkpoint,
        )
    audit = result.write(out)
    checkpoint.unlink(missing_ok=True)
    seconds = {"ingest": round(ingested, 1)} if catalog is not None else {}
    seconds.update({k: round(v, 1) for k, v in result.seconds.items()})
    for note in result.notes:
        stderr.print(f"[yellow]{note}", highlight=False)
    sets = result.match_sets()
    summary = {
        "products": len(sets),
        "decided_by": result.decided_by,
        "clusters": len(set(result.clusters.values())),
        "products_with_matches": sum(len(members) > 1 for members in sets.values()),
        "rescued_by_min2": len(result.rescued()),
        "seconds": seconds,
        "out": str(out),
        "pairs": str(audit),
    }
    if as_json:
        _print_json(summary)
        return
    table = Table(title=f"dedup -> {out}", show_header=False)
    for key, value in summary.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    stderr.print(table)


def _dedup_knobs(
    knobs: Any,
    decider: Decider | None,
    blend_rounds: int | None,
    min2: bool | None,
    max_cluster_size: int | None,
) -> Any:
    """The settings' dedup knobs with the command line's changes."""
    if blend_rounds is not None and decider is Decider.pair_model:
        raise ConfigError("--blend-rounds applies to the fusion decider: use --decider fusion")
    name = decider.value if decider else ("fusion" if blend_rounds is not None else None)
    fusion = knobs.fusion
    if blend_rounds is not None:
        fusion = fusion.model_copy(update={"blend_rounds": blend_rounds})
    changes = {
        "decider": name,
        "min2": min2,
        "max_cluster_size": max_cluster_size,
        "fusion": fusion,
    }
    return knobs.model_copy(update={k: v for k, v in changes.items() if v is not None})


def _fraction(item: str) -> tuple[str, float]:
    key, _, value = item.partition("=")
    try:
        return key, float(value)
    except ValueError as exc:
        raise ConfigError(f"--within {item!r}: expected field=fraction, e.g. price=0.2") from exc


@app.command()
@_reports_errors
def explain(
    product_a: Annotated[str, typer.Argument(help="The query product's id.")],
    product_b: Annotated[str, typer.Argument(help="The candidate product's id.")],
    store: StoreOption = None,
    collection: CollectionOption = None,
    pairs: Annotated[
        Path | None,
        typer.Option(help="A dedup audit trail (OUT.pairs.csv): also show that run's verdict."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Explain whether and why product B matches product A: every modality's score against its
    threshold, which signals fired, B's rank and fused score in A's matches; with --pairs, what a
    `dedup` run decided for the pair (its fused score, pair-model probability, min-2)."""
    from prodsearch.index import Index
    from prodsearch.matching.audit import read_pair_verdict
    from prodsearch.matching.explain import explain as explain_pair

    with Index(settings=_settings(store, collection)) as index:
        explanation = explain_pair(index, product_a, product_b)
    recorded = read_pair_verdict(pairs, product_a, product_b) if pairs else None
    if as_json:
        document = explanation.as_dict()
        if pairs:
            document["dedup"] = recorded
        _print_json(document)
        return
    verdict = (
        f"MATCH (rank {explanation.rank}, fused score {explanation.fused_score:.4f}, "
        f"{explanation.fusion})"
        if explanation.matched
        else f"no match ({explanation.fusion})"
    )
    table = Table(title=f"{product_a} vs {product_b}: {verdict}")
    for column in ("modality", "score", "threshold", "fired"):
        table.add_column(column)
    for modality, score in explanation.scores.items():
        table.add_row(
            modality,
            f"{score:.4f}",
            f"{explanation.thresholds[modality]:.4f}",
            "yes" if modality in explanation.fired else "no",
        )
    console = _stdout()
    console.print(table)
    if pairs and recorded is None:
        console.print(f"dedup ({pairs}): not matched", highlight=False)
    elif recorded is not None:
        console.print(f"dedup ({pairs}): MATCH {json.dumps(recorded)}", highlight=False)


WriteSettingsOption = Annotated[
    Path | None,
    typer.Option(
        help="The settings file the calibration is merged into (default: PRODSEARCH_SETTINGS_FILE "
        "or ./prodsearch.toml, the one match, dedup and serve read)."
    ),
]


@app.command()
@_reports_errors
def review(
    store: StoreOption = None,
    collection: CollectionOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8100,
    write_settings: WriteSettingsOption = None,
) -> None:
    """Serve the review page: answer same/different for the pairs that teach the decision most
    (y / n / u, z undoes), check clusters, and calibrate the catalog from the answers.

    Answers are stored at once in `<collection>.review.sqlite` in the store's directory (a
    server store: PRODSEARCH_REVIEW__DB); Calibrate writes the settings file.
    """
    import uvicorn

    from prodsearch.index import Index
    from prodsearch.review.answers import answers_path
    from prodsearch.review.app import create_review_app
    from prodsearch.settings import settings_file

    settings = _settings(store, collection)
    path = answers_path(settings)
    target = write_settings or settings_file()
    # A missing collection or a locked store ends here in a one-line error, not in a failed
    # server start-up; the app then opens the store for itself.
    with Index(settings=settings) as index:
        stderr.print(f"reviewing {index.count():,} products of {index.collection!r}")
    stderr.print(f"answers: {path}; calibrations go to {target}", highlight=False)

    def progress(step: str, done: int, total: int) -> None:
        if done == total:
            stderr.print(f"{step}: {done:,}/{total:,}", highlight=False)

    application = create_review_app(settings, write_settings=target, progress=progress)
    stderr.print(f"review page: http://{host}:{port}/", highlight=False)
    uvicorn.run(application, host=host, port=port)


@app.command()
@_reports_errors
def calibrate(
    labels: Annotated[Path, typer.Option(help="Pair labels: a CSV of id_a,id_b,same.")],
    store: StoreOption = None,
    collection: CollectionOption = None,
    write_settings: WriteSettingsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Calibrate the pair model to a catalog from labelled pairs (the review page's answers, or
    your own labels.csv) and merge it into the settings file: `dedup.pair_model.calibration`
    (slope, intercept, labels, positives, fitted_at) and `dedup.pair_model.min_probability`
    (the operating point). A bad labels file is refused whole, naming its rows; the settings
    file is only replaced once everything succeeded."""
    from prodsearch.index import Index
    from prodsearch.labels import read_labels
    from prodsearch.matching.dedup import run_dedup
    from prodsearch.review.queue import review_pairs
    from prodsearch.review.report import build_report
    from prodsearch.review.session import calibration_changes
    from prodsearch.settings import settings_file, update_settings_file

    settings = _settings(store, collection)
    target = write_settings or settings_file()
    pair = settings.dedup.pair_model
    with Index(settings=settings) as index:
        known = {p.product_id for p in index.scroll(with_vectors=False)}
        answers = read_labels(labels, known)
        result = run_dedup(index, settings.dedup, strict=True)
    pairs = review_pairs(result.table, result.fired_at, pair.min_probability)
    report, fit = build_report(
        result.table,
        pairs,
        answers,
        result.fired_at,
        pair.calibration,
        pair.min_probability,
        settings.formula.min_fused_score,
    )
    if fit is None:
        raise ConfigError(str(report["error"]))
    update_settings_file(target, calibration_changes(report["calibration"]))
    summary = {
        "labels_read": len(answers),
        # the calibration's own `labels` counts those among the candidate pairs (it fits on them)
        **report["calibration"],
        "was_min_probability": pair.min_probability,
        "predicted": report["predicted"],
        "now": report["now"],
        "settings_file": str(target),
    }
    if as_json:
        _print_json(summary)
        return
    table = Table(title=f"calibrate -> {target}", show_header=False)
    for key, value in summary.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    stderr.print(table)


if __name__ == "__main__":
    app()
