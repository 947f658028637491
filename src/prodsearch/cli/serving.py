"""Serving commands: the HTTP API."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from prodsearch.cli.common import (
    CollectionOption,
    StoreOption,
    _reports_errors,
    _settings,
    app,
    stderr,
)


class LogLevel(StrEnum):
    """uvicorn's log levels (`trace` adds every connection opened and closed)."""

    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"
    trace = "trace"


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
