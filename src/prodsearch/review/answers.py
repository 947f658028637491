"""The review answers: one SQLite file beside the collection, written at every answer.

Answers are an append-only log: each row is one answer to one pair (same, different or unsure),
tagged with the action that gave it (one key press, one cluster confirmation, one import), so
undo removes the last action whole and a pair's earlier answer comes back. A pair's answer is
its latest row. Every write is its own committed transaction (WAL, synchronous=FULL): a killed
server loses nothing that was answered.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prodsearch.errors import ConfigError
from prodsearch.labels import PairLabel, read_labels, write_labels
from prodsearch.state import StateFile

AnswerName = Literal["same", "different", "unsure"]
ANSWERS: tuple[str, ...] = ("same", "different", "unsure")
#: the file name beside an embedded store's collection: `<collection>` + this
DB_SUFFIX = ".review.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    action INTEGER NOT NULL,
    id_a TEXT NOT NULL,
    id_b TEXT NOT NULL,
    key_a TEXT NOT NULL,
    key_b TEXT NOT NULL,
    answer TEXT NOT NULL CHECK (answer IN ('same', 'different', 'unsure')),
    source TEXT NOT NULL,
    answered_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS answers_pair ON answers (key_a, key_b);
CREATE TABLE IF NOT EXISTS reports (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    made_at TEXT NOT NULL,
    report TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Answer:
    """One stored answer: the pair as it was asked, the answer, and where it came from."""

    seq: int
    action: int
    id_a: str
    id_b: str
    answer: str
    #: "pair" (the queue), "cluster" (confirm or split), "import" (labels.csv)
    source: str
    answered_at: str

    @property
    def key(self) -> frozenset[str]:
        """The unordered pair."""
        return frozenset((self.id_a, self.id_b))


class AnswerStore:
    """The answers of one collection's review, in a SQLite file (created when missing)."""

    def __init__(self, path: Path) -> None:
        self._file = StateFile(path, _SCHEMA, "the review answers")
        self.path = self._file.path

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def record(self, answers: Sequence[tuple[str, str, str]], source: str = "pair") -> list[Answer]:
        """Store (id_a, id_b, answer) triples as one action, in one transaction; returns them.
        Raises ConfigError for an answer that is not same/different/unsure or a pair of one
        product with itself (nothing is stored then)."""
        for id_a, id_b, answer in answers:
            if answer not in ANSWERS:
                raise ConfigError(f"answer {answer!r} for {id_a} / {id_b}: expected {ANSWERS}")
            if id_a == id_b:
                raise ConfigError(f"product {id_a!r} is paired with itself")
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with self._transaction() as db:
            action = db.execute("SELECT COALESCE(MAX(action), 0) + 1 FROM answers").fetchone()[0]
            stored = []
            for id_a, id_b, answer in answers:
                key_a, key_b = sorted((id_a, id_b))
                cursor = db.execute(
                    "INSERT INTO answers (action, id_a, id_b, key_a, key_b, answer, source, "
                    "answered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (action, id_a, id_b, key_a, key_b, answer, source, now),
                )
                stored.append(
                    Answer(cursor.lastrowid or 0, action, id_a, id_b, answer, source, now)
                )
        return stored

    def undo(self) -> list[Answer]:
        """Remove the last action's answers (the pairs' earlier answers, if any, count again);
        returns what was removed (empty when there is nothing to undo)."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT * FROM answers WHERE action = (SELECT MAX(action) FROM answers) "
                "ORDER BY seq"
            ).fetchall()
            if rows:
                db.execute("DELETE FROM answers WHERE action = ?", (rows[0][1],))
        return [_answer(row) for row in rows]

    def current(self) -> list[Answer]:
        """Every pair's latest answer, in the order they were given."""
        rows = self._file.query(
            "SELECT * FROM answers WHERE seq IN "
            "(SELECT MAX(seq) FROM answers GROUP BY key_a, key_b) ORDER BY seq"
        )
        return [_answer(row) for row in rows]

    def labels(self) -> list[PairLabel]:
        """The current same/different answers as pair labels (unsure ones left out)."""
        return [
            PairLabel(a.id_a, a.id_b, a.answer == "same")
            for a in self.current()
            if a.answer != "unsure"
        ]

    def export(self, path: Path) -> int:
        """Write the labels as `labels.csv` (`id_a,id_b,same`); returns how many."""
        labels = self.labels()
        write_labels(path, labels)
        return len(labels)

    def import_labels(self, path: Path, known_ids: Collection[str]) -> int:
        """Add the labels of a `labels.csv` as one action, all or nothing: the file is validated
        whole first (`read_labels`: the error names every bad row) and then stored in one
        transaction. Returns how many labels were stored; raises CatalogError."""
        labels = read_labels(path, known_ids)
        triples = [(x.id_a, x.id_b, "same" if x.same else "different") for x in labels]
        return len(self.record(triples, source="import")) if triples else 0

    def save_report(self, report: dict[str, Any]) -> None:
        """Keep the latest calibration report (the page shows it again after a reload)."""
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with self._transaction() as db:
            db.execute(
                "INSERT INTO reports (made_at, report) VALUES (?, ?)", (now, json.dumps(report))
            )

    def last_report(self) -> dict[str, Any] | None:
        """The latest calibration report, or None."""
        rows = self._file.query("SELECT report FROM reports ORDER BY seq DESC LIMIT 1")
        return json.loads(rows[0][0]) if rows else None

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._file.transaction()


def _answer(row: tuple[Any, ...]) -> Answer:
    seq, action, id_a, id_b, _, _, answer, source, answered_at = row
    return Answer(seq, action, id_a, id_b, answer, source, answered_at)
