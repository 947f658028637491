"""Shared parts of the `prodsearch` command line: the app, its console, common options and the
error handling every command gets."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

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
RayOption = Annotated[
    bool,
    typer.Option(
        "--ray",
        help="Run on Ray (pip install 'prodsearch[ray]'): a local Ray on this machine's cores, "
        "or the cluster of --ray-address / RAY_ADDRESS.",
    ),
]
RayAddressOption = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        metavar="ADDRESS",
        help="With --ray: the cluster to join, e.g. auto or ray://HOST:10001 (default: "
        "RAY_ADDRESS, else a local Ray).",
    ),
]
WorkersOption = Annotated[
    int, typer.Option(min=1, help="With --ray: encoding or query actors (half a CPU each).")
]


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
