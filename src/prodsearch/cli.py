"""The `prodsearch` command line. `--json` output is one JSON document on stdout; progress, logs
and tables go to stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from enum import StrEnum
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from prodsearch.errors import ConfigError, ProdsearchError

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


class LogLevel(StrEnum):
    """uvicorn's log levels (`trace` adds every connection opened and closed)."""

    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"
    trace = "trace"


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


@app.command()
@_reports_errors
def ingest(
    catalog: Annotated[Path, typer.Argument(help="The catalog CSV.")],
    store: StoreOption = None,
    collection: CollectionOption = None,
    recipe: Annotated[
        str,
        typer.Option(
            help="Column mapping: a built-in name (see `prodsearch recipes`) or a .toml path."
        ),
    ] = "generic",
    images_dir: Annotated[
        Path | None,
        typer.Option(help="Folder image paths are relative to (default: the CSV's folder)."),
    ] = None,
    delimiter: Annotated[
        str | None, typer.Option(help="CSV delimiter (default: the recipe's).")
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="Where to write rejected rows (default: CATALOG.rejects.csv)."),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Products per upsert batch.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Upsert a catalog's products (named vectors + payload) into a collection; re-runs resume.

    Exit code 0 when products were ingested (bad rows are skipped and reported), 1 when none
    could be.
    """
    from prodsearch.catalog import read_catalog
    from prodsearch.index import Index
    from prodsearch.ingest import ingest_catalog
    from prodsearch.recipes import load_recipe

    settings = _settings(store, collection, batch_size=batch_size)
    column_map = load_recipe(recipe)
    if delimiter:
        column_map = column_map.model_copy(update={"delimiter": delimiter})
    rows = read_catalog(catalog, column_map, images_dir)
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
        _print_json(summary)
    else:
        table = Table(title=f"ingest {catalog.name} -> {settings.collection}", show_header=False)
        for key, value in summary.items():
            table.add_row(key, str(value))
        stderr.print(table)
        for rejection in result.rejections[:10]:
            stderr.print(
                f"  row {rejection.row} ({rejection.field}): {rejection.reason}", highlight=False
            )
        if result.skipped > 10:
            stderr.print(f"  ... {result.skipped - 10} more in {result.report_path}")
    if result.upserted + result.unchanged == 0:
        stderr.print("[red]error:[/red] no product could be ingested")
        raise typer.Exit(1)


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
def recipes() -> None:
    """List the built-in catalog recipes."""
    from prodsearch.recipes import builtin_recipes, load_recipe

    for name in builtin_recipes():
        typer.echo(f"{name:16} {load_recipe(name).description}")


EncodersOption = Annotated[
    str | None,
    typer.Option(
        help="finetuned (the shipped ArcFace encoders, default), finetuned+charcnn or pretrained."
    ),
]


@app.command(name="eval")
@_reports_errors
def evaluate(
    catalog: Annotated[Path, typer.Argument(help="Labelled catalog CSV (e.g. Shopee train.csv).")],
    split_file: Annotated[Path, typer.Option(help="CSV of id,split with val and test rows.")],
    recipe: Annotated[
        str, typer.Option(help="Column mapping (see `prodsearch recipes`).")
    ] = "shopee",
    label_column: Annotated[
        str, typer.Option(help="Column holding the product group.")
    ] = "label_group",
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            help="Where to build the val/test collections (default: a temporary directory).",
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
    """Tune thresholds and fusion on `val`, report precision/recall/F1 on `test`.

    Each split is ingested as its own collection; every product queries its own split's catalog
    and counts in its own match set (the Shopee metric). The val catalog is topped up with
    `train` rows to the test catalog's size, so thresholds are tuned at the density they are
    reported at. The TF-IDF baseline runs in the same pass.
    """
    from prodsearch.evaluate import format_table, run_evaluation

    settings = _settings(None, None, encoders=encoders)
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
    from prodsearch.evaluate import grocery_image_metrics

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
    log_level: Annotated[LogLevel, typer.Option(help="The server's log level.")] = LogLevel.info,
) -> None:
    """Serve the HTTP API (POST /match, POST /products, GET /health; OpenAPI at /docs).

    One process holds the models and the store; PRODSEARCH_API_KEY makes every route but
    /health require an X-API-Key header. The embedded engine allows one process per store
    directory: for several servers, use a Qdrant server (--store http://...). Connection
    timeouts and the request queue: PRODSEARCH_KEEP_ALIVE_TIMEOUT_S, PRODSEARCH_SHUTDOWN_TIMEOUT_S,
    PRODSEARCH_MAX_ACTIVE_REQUESTS, PRODSEARCH_MAX_QUEUED_REQUESTS (deploy/README.md).
    """
    import uvicorn

    from prodsearch.api import create_app
    from prodsearch.index import Index
    from prodsearch.serving import server_config
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
    config = server_config(create_app(settings), settings, host, port, log_level.value)
    uvicorn.Server(config).run()


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
    pair_model: Annotated[
        bool | None,
        typer.Option(
            "--pair-model/--no-pair-model",
            help="Decide matches with the learned pair model (default from settings; off when "
            "--blend-rounds is given).",
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
    from prodsearch.dedup import DedupOptions, run_dedup
    from prodsearch.filters import parse_cli_filters
    from prodsearch.index import Index
    from prodsearch.ingest import ingest_catalog
    from prodsearch.recipes import load_recipe

    settings = _settings(store, collection)
    options = DedupOptions.from_settings(
        settings.dedup,
        pair_model=pair_model,
        blend_rounds=blend_rounds,
        min2=min2,
        max_cluster_size=max_cluster_size,
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

        result = run_dedup(index, options, progress=progress, checkpoint=checkpoint)
    result.write_csv(out)
    audit = out.with_name(out.stem + ".pairs.csv")
    result.write_pairs_csv(audit)
    checkpoint.unlink(missing_ok=True)
    seconds = {"ingest": round(ingested, 1)} if catalog is not None else {}
    seconds.update({k: round(v, 1) for k, v in result.seconds.items()})
    for note in result.notes:
        stderr.print(f"[yellow]{note}", highlight=False)
    summary = {
        "products": len(result.neighbourhoods),
        "decided_by": result.decided_by,
        "clusters": len(set(result.clusters.values())),
        "products_with_matches": sum(len(h.ids()) > 1 for h in result.neighbourhoods.values()),
        "rescued_by_min2": sum(h.by_min2 for h in result.neighbourhoods.values()),
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
    from prodsearch.dedup import read_pair_verdict
    from prodsearch.index import Index

    with Index(settings=_settings(store, collection)) as index:
        explanation = index.explain(product_a, product_b)
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


if __name__ == "__main__":
    app()
