"""Product clusters as stored state: which cluster each product is in, since when, and why.

The log is a SQLite file beside the collection (`state.state_file(settings, "clusters")`), the
one owner of cluster membership; each product's payload carries a copy of its `cluster_id` for
reads (`GET /products/{id}`, match results), written after the log commits and re-synced from it
when a run was killed in between. Every change is an event: a product joined a cluster or
started one, left it (deleted), a full `dedup` merged or split clusters, or one product linked
two clusters and a merge was proposed for review instead of made.

Cluster ids are stable: a new cluster takes the id `c-<digest of its founding product's id>`, and
a full `dedup` carries every previous id forward to the new cluster holding most of its members
(`matching.clusters.carry_forward`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sqlite3
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prodsearch.state import StateFile

#: the payload key mirroring a product's cluster
CLUSTER_KEY = "cluster_id"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS members (
    product_id TEXT PRIMARY KEY,
    cluster_id TEXT NOT NULL,
    joined_at TEXT NOT NULL,
    content_hash TEXT
);
CREATE INDEX IF NOT EXISTS members_by_cluster ON members (cluster_id);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    cluster_id TEXT NOT NULL,
    products TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_cluster ON events (cluster_id);
CREATE TABLE IF NOT EXISTS catalog_stats (
    only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
    body TEXT NOT NULL
);
"""


def new_cluster_id(founder: str) -> str:
    """The id of a cluster founded by product `founder` (stable across runs and machines)."""
    return "c-" + hashlib.sha1(founder.encode()).hexdigest()[:12]


def now() -> str:
    """The current time, UTC, ISO 8601 to the second."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Event:
    """One recorded change of the clusters."""

    seq: int
    at: str
    kind: str
    cluster_id: str
    products: list[str]
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form."""
        return dict(vars(self))


@dataclass(frozen=True)
class Member:
    """A product in a cluster, and when it joined."""

    product_id: str
    cluster_id: str
    joined_at: str
    content_hash: str | None


class ClusterLog:
    """The clusters of one collection, in a SQLite file (created when missing)."""

    def __init__(self, path: Path) -> None:
        self._file = StateFile(path, _SCHEMA, "the cluster log")
        self.path = self._file.path

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> ClusterLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the catalog statistics assignments decide with ------------------------------------
    def catalog_stats(self) -> dict[str, Any] | None:
        """The catalog statistics assignments last gathered (`CatalogStats` fields), or None."""
        rows = self._file.query("SELECT body FROM catalog_stats WHERE only_row = 1")
        return json.loads(rows[0][0]) if rows else None

    def set_catalog_stats(self, fields: Mapping[str, Any]) -> None:
        """Keep the statistics assignments decide with, so that a re-run after a kill decides
        with the same ones as an uninterrupted run."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO catalog_stats (only_row, body) VALUES (1, ?)",
                (json.dumps(dict(fields)),),
            )

    # -- reads --------------------------------------------------------------------------------
    def membership(self) -> dict[str, str]:
        """Every product's cluster id."""
        return dict(self._file.query("SELECT product_id, cluster_id FROM members"))

    def member(self, product_id: str) -> Member | None:
        """A product's membership, or None when it is in no cluster."""
        rows = self._file.query(
            "SELECT product_id, cluster_id, joined_at, content_hash FROM members "
            "WHERE product_id = ?",
            (product_id,),
        )
        return Member(*rows[0]) if rows else None

    def clusters_of(self, product_ids: Iterable[str]) -> dict[str, str]:
        """The cluster id of each of `product_ids` that is in one."""
        ids = list(product_ids)
        out: dict[str, str] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            out.update(
                self._file.query(
                    f"SELECT product_id, cluster_id FROM members WHERE product_id IN ({marks})",
                    chunk,
                )
            )
        return out

    def members(self, cluster_id: str) -> list[Member]:
        """A cluster's products, in the order they joined."""
        rows = self._file.query(
            "SELECT product_id, cluster_id, joined_at, content_hash FROM members "
            "WHERE cluster_id = ? ORDER BY joined_at, product_id",
            (cluster_id,),
        )
        return [Member(*row) for row in rows]

    def events(self, cluster_id: str | None = None, kind: str | None = None) -> list[Event]:
        """The recorded events, oldest first: all, or a cluster's, or of one kind."""
        query = "SELECT seq, at, kind, cluster_id, products, detail FROM events WHERE 1=1"
        args: list[str] = []
        if cluster_id is not None:
            query += " AND (cluster_id = ? OR detail LIKE ?)"
            args += [cluster_id, f'%"{cluster_id}"%']
        if kind is not None:
            query += " AND kind = ?"
            args.append(kind)
        rows = self._file.query(query + " ORDER BY seq", args)
        return [Event(s, a, k, c, json.loads(p), json.loads(d)) for s, a, k, c, p, d in rows]

    def sizes(self) -> dict[str, int]:
        """Every cluster's number of products."""
        return dict(
            self._file.query("SELECT cluster_id, COUNT(*) FROM members GROUP BY cluster_id")
        )

    # -- writes (each one transaction) --------------------------------------------------------
    def join(
        self,
        product_id: str,
        cluster_id: str,
        content_hash: str | None,
        kind: str,
        detail: Mapping[str, Any],
        proposals: Iterable[tuple[str, Mapping[str, Any]]] = (),
    ) -> None:
        """Put a product in a cluster (replacing its earlier membership) and record why; also
        record proposed merges of `cluster_id` with other clusters (cluster id, evidence)."""
        at = now()
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO members VALUES (?, ?, ?, ?)",
                (product_id, cluster_id, at, content_hash),
            )
            self._event(db, at, kind, cluster_id, [product_id], detail)
            for other, evidence in proposals:
                proposal = {"with": other, **evidence}
                self._event(db, at, "proposed merge", cluster_id, [product_id], proposal)

    def leave(self, product_ids: Iterable[str], reason: str) -> list[str]:
        """Take products out of their clusters (e.g. deleted); returns the ones that were in
        one."""
        at = now()
        left = []
        with self._transaction() as db:
            for pid in product_ids:
                row = db.execute(
                    "SELECT cluster_id FROM members WHERE product_id = ?", (pid,)
                ).fetchone()
                if row is None:
                    continue
                db.execute("DELETE FROM members WHERE product_id = ?", (pid,))
                self._event(db, at, "left", row[0], [pid], {"reason": reason})
                left.append(pid)
        return left

    def pending_merges(self) -> list[Event]:
        """The proposed merges nobody decided yet whose two clusters both still exist (the
        latest proposal of each pair of clusters)."""
        sizes = self.sizes()
        decided = {
            frozenset((e.cluster_id, e.detail.get("with")))
            for e in self.events()
            if e.kind in ("merged", "kept apart") and e.detail.get("with")
        }
        latest: dict[frozenset[str], Event] = {}
        for event in self.events(kind="proposed merge"):
            key = frozenset((event.cluster_id, event.detail["with"]))
            if key not in decided and all(c in sizes for c in key):
                latest[key] = event
        return sorted(latest.values(), key=lambda e: e.seq)

    def merge(self, into: str, other: str, detail: Mapping[str, Any]) -> list[str]:
        """Move every product of cluster `other` into `into` (a reviewed merge); returns them."""
        with self._transaction() as db:
            moved = [
                pid
                for (pid,) in db.execute(
                    "SELECT product_id FROM members WHERE cluster_id = ?", (other,)
                ).fetchall()
            ]
            db.execute("UPDATE members SET cluster_id = ? WHERE cluster_id = ?", (into, other))
            self._event(db, now(), "merged", into, moved, {"with": other, **detail})
        return moved

    def keep_apart(self, cluster: str, other: str, detail: Mapping[str, Any]) -> None:
        """Record that two clusters a product linked are different products (no merge)."""
        with self._transaction() as db:
            self._event(db, now(), "kept apart", cluster, [], {"with": other, **detail})

    def replace_all(
        self,
        membership: Mapping[str, str],
        hashes: Mapping[str, str | None],
        events: Iterable[tuple[str, str, list[str], Mapping[str, Any]]],
    ) -> None:
        """Replace every membership with a full run's (a product keeps its joined_at while its
        cluster stays the same) and record the run's events (kind, cluster id, products,
        detail), in one transaction."""
        at = now()
        with self._transaction() as db:
            before = dict(
                (pid, (cluster, joined))
                for pid, cluster, joined in db.execute(
                    "SELECT product_id, cluster_id, joined_at FROM members"
                ).fetchall()
            )
            db.execute("DELETE FROM members")
            db.executemany(
                "INSERT INTO members VALUES (?, ?, ?, ?)",
                [
                    (
                        pid,
                        cluster,
                        before[pid][1] if before.get(pid, ("", ""))[0] == cluster else at,
                        hashes.get(pid),
                    )
                    for pid, cluster in membership.items()
                ],
            )
            for kind, cluster, products, detail in events:
                self._event(db, at, kind, cluster, products, detail)

    def _event(
        self,
        db: sqlite3.Connection,
        at: str,
        kind: str,
        cluster_id: str,
        products: list[str],
        detail: Mapping[str, Any],
    ) -> None:
        db.execute(
            "INSERT INTO events (at, kind, cluster_id, products, detail) VALUES (?, ?, ?, ?, ?)",
            (at, kind, cluster_id, json.dumps(products), json.dumps(dict(detail), default=str)),
        )

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._file.transaction()
