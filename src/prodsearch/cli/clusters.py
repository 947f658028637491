"""The clusters command: read the stored product clusters and their history."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from prodsearch.cli.common import (
    CollectionOption,
    JsonOption,
    StoreOption,
    _print_json,
    _reports_errors,
    _settings,
    _stdout,
    app,
)
from prodsearch.errors import ConfigError


@app.command()
@_reports_errors
def clusters(
    cluster_id: Annotated[
        str | None, typer.Option("--id", help="One cluster: its members and history.")
    ] = None,
    store: StoreOption = None,
    collection: CollectionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show the stored product clusters (`dedup` and `ingest --assign` keep them): how many and
    how big, the merges proposed for review; with --id, one cluster's members (when each
    joined) and every event with its evidence."""
    from prodsearch.matching.cluster_log import ClusterLog
    from prodsearch.state import state_file

    settings = _settings(store, collection)
    path = state_file(settings, "clusters")
    if not path.is_file():
        raise ConfigError(
            f"no stored clusters for collection {settings.collection!r} ({path} is missing): "
            "run `prodsearch dedup` or `prodsearch ingest --assign` first"
        )
    with ClusterLog(path) as log:
        document = _one(log, cluster_id) if cluster_id else _overview(log)
    if as_json:
        _print_json(document)
        return
    console = _stdout()
    if cluster_id:
        table = Table(title=f"cluster {cluster_id}: {len(document['members'])} products")
        for column in ("product_id", "joined"):
            table.add_column(column)
        for member in document["members"]:
            table.add_row(member["product_id"], member["joined_at"])
        console.print(table)
        for event in document["events"]:
            console.print(
                f"{event['at']} {event['kind']}: {' '.join(event['products'][:8])} "
                f"{json.dumps(event['detail'])[:200]}",
                highlight=False,
            )
        return
    console.print_json(json.dumps(document))


def _one(log: Any, cluster_id: str) -> dict[str, Any]:
    members = log.members(cluster_id)
    events = log.events(cluster_id)
    if not members and not events:
        raise ConfigError(f"no cluster {cluster_id!r} is stored")
    return {
        "cluster_id": cluster_id,
        "members": [{"product_id": m.product_id, "joined_at": m.joined_at} for m in members],
        "events": [e.as_dict() for e in events],
    }


def _overview(log: Any) -> dict[str, Any]:
    sizes = log.sizes()
    histogram: dict[str, int] = {}
    for size in sizes.values():
        key = str(size) if size < 5 else "5+"
        histogram[key] = histogram.get(key, 0) + 1
    proposals = log.events(kind="proposed merge")
    return {
        "clusters": len(sizes),
        "products": sum(sizes.values()),
        "clusters_by_size": dict(sorted(histogram.items())),
        "largest": sorted(sizes.items(), key=lambda kv: -kv[1])[:5],
        "proposed_merges": [
            {"cluster_id": e.cluster_id, "with": e.detail["with"], "product": e.products[0]}
            for e in proposals[-20:]
        ],
    }
