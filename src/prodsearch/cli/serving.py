"""Serving commands: the HTTP API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from prodsearch.cli.common import (
    CollectionOption,
    StoreOption,
    _reports_errors,
    _settings,
    app,
    stderr,
)

if TYPE_CHECKING:
    pass


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
