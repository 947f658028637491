"""Product clusters as stored state: stable ids carried forward, the cluster log, assign on
arrival with the dedup decision, proposed merges, kill-safe assigning ingests."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from prodsearch.matching.cluster_log import ClusterLog, new_cluster_id
from prodsearch.matching.clusters import carry_forward


def test_unchanged_clusters_keep_their_ids_and_changes_are_recorded() -> None:
    previous = {"a": "c-1", "b": "c-1", "c": "c-2", "d": "c-2", "e": "c-3", "f": "c-3"}
    # same membership (numbers differ run to run): every id carried forward, nothing recorded
    same = carry_forward({"a": 5, "b": 5, "c": 1, "d": 1, "e": 0, "f": 0}, previous)
    assert same.membership == previous and same.events == []
    # c-1 and c-2 merge; c-3 splits; g is new
    run = {"a": 0, "b": 0, "c": 0, "d": 0, "e": 1, "f": 2, "g": 3}
    changed = carry_forward(run, previous)
    m = changed.membership
    assert m["a"] == m["b"] == m["c"] == m["d"] == "c-1"  # the smaller id on a tied overlap
    assert m["e"] == "c-3" and m["f"] == new_cluster_id("f") and m["g"] == new_cluster_id("g")
    kinds = {(kind, cluster) for kind, cluster, _, _ in changed.events}
    assert ("merged", "c-1") in kinds and ("split", "c-3") in kinds
    assert ("new", new_cluster_id("g")) in kinds and ("moved", "c-2") in kinds
    assert changed.counts()["products moved"] == 3  # c and d to c-1, f to its own


def test_the_cluster_log_keeps_members_events_and_survives_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "products.clusters.sqlite"
    log = ClusterLog(path)
    log.join("a", "c-1", "h1", "founded", {"matches": []})
    log.join("b", "c-1", "h2", "joined", {"matches": [{"product_id": "a"}]}, [("c-9", {"x": 1})])
    assert [m.product_id for m in log.members("c-1")] == ["a", "b"]
    assert log.member("b").content_hash == "h2" and log.clusters_of(["a", "z"]) == {"a": "c-1"}
    proposals = log.events(kind="proposed merge")
    assert [(e.cluster_id, e.detail["with"], e.products) for e in proposals] == [
        ("c-1", "c-9", ["b"])
    ]
    assert log.leave(["a", "missing"], "deleted") == ["a"]
    # a second process sees every committed write (no close needed: a kill loses nothing)
    other = sqlite3.connect(path)
    assert other.execute("SELECT product_id FROM members").fetchall() == [("b",)]
    kinds = [k for (k,) in other.execute("SELECT kind FROM events ORDER BY seq").fetchall()]
    assert kinds == ["founded", "joined", "proposed merge", "left"]
    # a full run replaces memberships; a product whose cluster stays keeps when it joined
    joined = log.member("b").joined_at
    log.replace_all({"b": "c-1", "c": "c-2"}, {"b": "h2", "c": "h3"}, [("new", "c-2", ["c"], {})])
    assert log.member("b").joined_at == joined and log.sizes() == {"c-1": 1, "c-2": 1}
    log.close()
    with pytest.raises(sqlite3.ProgrammingError):
        log.membership()
    assert ClusterLog(path).membership() == {"b": "c-1", "c": "c-2"}
