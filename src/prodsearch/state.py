"""Where a collection's own state lives beside the engine: the review answers and the cluster log,
SQLite files users cannot recreate (so they never sit in a temporary place by default)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from prodsearch.errors import ConfigError, StoreError
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


class StateFile:
    """A state file: SQLite in WAL mode, every commit synced to disk (a killed process loses
    nothing committed), one writer thread at a time; `transaction()` is BEGIN IMMEDIATE ...
    COMMIT, or ROLLBACK on an exception. Raises StoreError when the file cannot be opened."""

    def __init__(self, path: Path, schema: str, what: str) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(schema)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open {what} {self.path}: {exc}") from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the file."""
        self.db.close()

    def query(self, sql: str, args: Sequence[object] = ()) -> list[tuple]:
        """The rows of a read, taken while no transaction runs."""
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction, one thread at a time."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
