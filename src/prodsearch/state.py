"""Where a collection's own state lives beside the engine: the review answers and the cluster log,
SQLite files users cannot recreate (so they never sit in a temporary place by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prodsearch.errors import ConfigError
from prodsearch.settings import Settings

StateKind = Literal["review", "clusters"]


def state_file(settings: Settings, kind: StateKind) -> Path:
    """`<collection>.<kind>.sqlite` in `state_dir` when set, else in the embedded (or local-mode)
    store's directory. Raises ConfigError for a server URL or an in-memory store without
    `state_dir`."""
    name = f"{settings.collection}.{kind}.sqlite"
    if settings.state_dir is not None:
        return Path(settings.state_dir) / name
    store = settings.store
    if store.startswith(("http://", "https://")) or store == ":memory:":
        raise ConfigError(
            f"the {kind} state of a store at {store!r} needs a folder: set "
            "PRODSEARCH_STATE_DIR (or `state_dir` in the settings file) to a directory that is "
            "kept, such as ./prodsearch-state"
        )
    return Path(store.removeprefix("local:")) / name
