"""Matching commands: match one product, dedup a whole collection, explain one pair."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

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


class Decider(StrEnum):
    """What decides a match in `dedup`."""

    pair_model = "pair-model"
    fusion = "fusion"


DedupCatalogArgument = Annotated[
    Path | None,
    typer.Argument(help="Catalog file to ingest first (omit to use the collection as is)."),
]
OutOption = Annotated[Path, typer.Option(help="Where to write id,matches,cluster,min2.")]
DedupRecipeOption = Annotated[
    str | None,
    typer.Option(help="Column mapping when a CATALOG is given (default: guessed, as ingest does)."),
]
SameOption = Annotated[
    list[str] | None, typer.Option(help="Matches must share this payload field (repeatable).")
]
DifferentOption = Annotated[
    list[str] | None,
    typer.Option(help="Matches must differ in this payload field, e.g. seller (repeatable)."),
]
WithinOption = Annotated[
    list[str] | None,
    typer.Option(help="A numeric field within a fraction of the product's, e.g. price=0.2."),
]
FilterOption = Annotated[
    list[str] | None,
    typer.Option("--filter", help="Payload filter key=value or key!=value (repeatable)."),
]
Min2Option = Annotated[
    bool | None, typer.Option("--min2/--no-min2", help="Give lone products a close neighbour.")
]
BlendRoundsOption = Annotated[
    int | None, typer.Option(min=0, max=3, help="Neighbourhood-blending rounds (fusion).")
]
MaxClusterOption = Annotated[
    int | None, typer.Option(min=1, help="Cap on a duplicate cluster's size.")
]
DeciderOption = Annotated[
    Decider | None,
    typer.Option(
        help="What decides a match: the learned pair model, or the fusion's own rule "
        "(default from settings: pair-model; fusion when --blend-rounds is given).",
    ),
]
ReconcileOption = Annotated[
    bool,
    typer.Option(
        "--reconcile",
        help="Compare this run's clusters with the stored ones and report what would move, "
        "merge and split; change the stored clusters only with --apply.",
    ),
]
ApplyOption = Annotated[
    bool, typer.Option("--apply", help="With --reconcile: store this run's clusters.")
]


ThresholdOption = Annotated[
    list[str] | None,
    typer.Option(help="Per-modality threshold override, e.g. text=0.8 (repeatable)."),
]
DecideOption = Annotated[
    bool,
    typer.Option(
        "--decide/--no-decide",
        help="Beside the engine's scores, show the catalog's decision on each match (the "
        "dedup decision: match or not, and its probability).",
    ),
]


@app.command()
@_reports_errors
def match(
    title: Annotated[str | None, typer.Option(help="Product title.")] = None,
    image: Annotated[Path | None, typer.Option(help="Product image file.")] = None,
    phash: Annotated[str | None, typer.Option(help="A known 16-hex-digit perceptual hash.")] = None,
    k: Annotated[int | None, typer.Option(min=1, help="Matches to return.")] = None,
    fusion: Annotated[str | None, typer.Option(help="rrf, dbsf or formula.")] = None,
    threshold: ThresholdOption = None,
    filter_: FilterOption = None,
    decide: DecideOption = True,
    store: StoreOption = None,
    collection: CollectionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Find the catalog products matching a title and/or an image; each with the engine's fused
    and per-modality scores and, by default, whether the catalog's matching decides it is the
    same product (and how sure)."""
    from prodsearch.filters import parse_cli_filters
    from prodsearch.index import Index
    from prodsearch.matching.assign import catalog_decider, query_verdicts
    from prodsearch.query import MatchOptions

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
    options = MatchOptions(
        k=k,
        thresholds=thresholds or None,
        fusion=fusion,  # type: ignore[arg-type]
        filter=parse_cli_filters(filter_ or []),
    )
    with Index(settings=settings) as index:
        vectors = index.encode_query(title, image, phash)
        matches = index.match_vectors([vectors], options)[0]
        query = {"title": title or ""}
        verdicts = query_verdicts(catalog_decider(index), vectors, query) if decide else {}
    documents = [{**m.as_dict(), **_verdict(verdicts.get(m.product_id), decide)} for m in matches]
    if as_json:
        query = {"title": title, "image": str(image) if image else None}
        _print_json({"query": query, "matches": documents})
        return
    _print_matches(matches, documents, decide)


def _print_matches(matches: list[Any], documents: list[dict[str, Any]], decide: bool) -> None:
    """The matches as a table on stdout."""
    table = Table(title=f"{len(matches)} match(es)")
    columns = ("product_id", "decision", "probability", "score", "matched by", "scores", "title")
    for column in (
        columns if decide else (c for c in columns if c not in ("decision", "probability"))
    ):
        table.add_column(column)
    for m, document in zip(matches, documents, strict=True):
        decided = (document["decision"], _number(document["probability"])) if decide else ()
        table.add_row(
            m.product_id,
            *decided,
            f"{m.score:.3f}",
            ",".join(m.matched_by),
            " ".join(f"{k}={v:.3f}" for k, v in m.scores.items()),
            str(m.payload.get("title", ""))[:60],
        )
    _stdout().print(table)


def _verdict(verdict: Any, decide: bool) -> dict[str, Any]:
    """A match's decision fields: "match" / "no match", its probability, the rule that decided;
    a match beyond the candidates the decision reads is "no match" with no probability."""
    if not decide:
        return {}
    if verdict is None:
        return {"decision": "no match", "probability": None, "rule": ""}
    decision = "match" if verdict.matched else "no match"
    return {"decision": decision, "probability": verdict.probability, "rule": verdict.rule}


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@app.command()
@_reports_errors
def dedup(
    catalog: DedupCatalogArgument = None,
    out: OutOption = Path("matches.csv"),
    store: StoreOption = None,
    collection: CollectionOption = None,
    recipe: DedupRecipeOption = None,
    same: SameOption = None,
    different: DifferentOption = None,
    within: WithinOption = None,
    filter_: FilterOption = None,
    min2: Min2Option = None,
    blend_rounds: BlendRoundsOption = None,
    max_cluster_size: MaxClusterOption = None,
    decider: DeciderOption = None,
    reconcile: ReconcileOption = False,
    apply: ApplyOption = False,
    ray: RayOption = False,
    ray_address: RayAddressOption = None,
    workers: WorkersOption = 2,
    as_json: JsonOption = False,
) -> None:
    """Match every product of a collection against it: match sets, duplicate clusters (stored in
    the collection under stable ids: an unchanged cluster keeps its id across runs), where the
    time went, and beside OUT the audit trail OUT.pairs.csv (every match's scores, the signals
    that fired, the pair model's probability). Resumable: a re-run after a kill reuses
    OUT.checkpoint.jsonl. With --ray, the candidate queries and the pair model's decision run
    on Ray workers (the pair table as Parquet partitions in OUT.ray/; not resumable)."""
    import time

    from prodsearch.cli.catalog import read_mapped_catalog
    from prodsearch.filters import parse_cli_filters
    from prodsearch.index import Index
    from prodsearch.ingest import ingest_catalog
    from prodsearch.matching.candidates import RelativeFilters
    from prodsearch.matching.dedup import run_dedup

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
                read_mapped_catalog(catalog, recipe, settings),
                console=stderr,
                report_path=catalog.with_name(catalog.stem + ".rejects.csv"),
            )
        ingested = time.perf_counter() - started

        def progress(step: str, done: int, total: int) -> None:
            if done == total or done % 2048 < 256:
                stderr.print(f"{step}: {done:,}/{total:,}", highlight=False)

        if ray:
            from prodsearch.scaleout import start_ray
            from prodsearch.scaleout.dedup import ray_dedup

            start_ray(ray_address)
            ray_dir = out.with_name(out.name + ".ray")
            result = ray_dedup(index, ray_dir, knobs, filters, workers=workers)
        else:
            result = run_dedup(index, knobs, filters, progress=progress, checkpoint=checkpoint)
        carried = _stored_clusters(index, result, apply=apply or not reconcile)
    audit = result.write(out, carried.membership)
    checkpoint.unlink(missing_ok=True)
    seconds = {"ingest": round(ingested, 1)} if catalog is not None else {}
    seconds.update({k: round(v, 1) for k, v in result.seconds.items()})
    dry_run = reconcile and not apply
    _dedup_summary(result, carried, seconds, (out, audit), dry_run, reconcile, as_json)


def _dedup_summary(
    result: Any,
    carried: Any,
    seconds: dict[str, float],
    files: tuple[Path, Path],
    dry_run: bool,
    listed: bool,
    as_json: bool,
) -> None:
    """What a dedup run did: counts, cluster changes (would-be ones in a dry run; each one
    `listed` in JSON), where the time went, the files written (match sets, audit trail)."""
    out, audit = files
    sets = result.match_sets()
    summary = {
        "products": len(sets),
        "decided_by": result.decided_by,
        "clusters": len(set(result.clusters.values())),
        "cluster_changes" if dry_run else "stored_cluster_changes": carried.counts(),
        "products_with_matches": sum(len(members) > 1 for members in sets.values()),
        "rescued_by_min2": len(result.rescued()),
        "seconds": seconds,
        "out": str(out),
        "pairs": str(audit),
    }
    if as_json:
        if listed:
            summary["changes"] = [
                {"kind": k, "cluster_id": c, "products": p, **d} for k, c, p, d in carried.events
            ]
        _print_json(summary)
        return
    table = Table(title=f"dedup -> {out}", show_header=False)
    for key, value in summary.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    stderr.print(table)


def _stored_clusters(index: Any, result: Any, apply: bool) -> Any:
    """The run's clusters carried forward from the stored ones (stored when `apply`)."""
    from prodsearch.matching.cluster_log import ClusterLog
    from prodsearch.matching.clusters import store_clusters
    from prodsearch.state import state_file

    with ClusterLog(state_file(index.settings, "clusters")) as log:
        return store_clusters(index, log, result.clusters, apply=apply)


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
