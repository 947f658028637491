"""The review answers in SQLite: stored at once, undone by action, exported and imported as
labels.csv (all or nothing), found beside the collection."""

from __future__ import annotations

from pathlib import Path

import pytest

from prodsearch.errors import CatalogError, ConfigError
from prodsearch.labels import PairLabel, read_labels
from prodsearch.review.answers import AnswerStore
from prodsearch.settings import Settings
from prodsearch.state import state_file

KNOWN = {"a", "b", "c", "d"}


def test_answers_survive_a_killed_server_and_undo_takes_back_the_last_action(tmp_path) -> None:
    store = AnswerStore(tmp_path / "answers.sqlite")
    store.record([("a", "b", "same")])
    store.record([("a", "c", "unsure")])
    store.record([("b", "a", "different")])  # the same pair again: the latest answer counts
    # a second connection sees every answer without the first being closed (a killed server)
    reopened = AnswerStore(tmp_path / "answers.sqlite")
    assert [(x.id_a, x.id_b, x.answer) for x in reopened.current()] == [
        ("a", "c", "unsure"),
        ("b", "a", "different"),
    ]
    assert reopened.labels() == [PairLabel("b", "a", False)]  # unsure is not a label
    assert [x.answer for x in reopened.undo()] == ["different"]
    assert {x.answer for x in reopened.current()} == {"same", "unsure"}  # a-b is same again
    reopened.record([("c", "a", "same"), ("c", "b", "different")], source="cluster")
    assert len(reopened.undo()) == 2  # one cluster action, undone whole
    assert len(reopened.current()) == 2
    with pytest.raises(ConfigError, match="paired with itself"):
        reopened.record([("a", "d", "same"), ("d", "d", "same")])
    assert len(reopened.current()) == 2  # nothing of the refused action was stored
    store.close()
    reopened.close()


def test_export_and_import_round_trip(tmp_path) -> None:
    store = AnswerStore(tmp_path / "answers.sqlite")
    store.record([("a", "b", "same")])
    store.record([("c", "d", "different")])
    store.record([("a", "c", "unsure")])
    assert store.export(tmp_path / "labels.csv") == 2
    assert read_labels(tmp_path / "labels.csv", KNOWN) == store.labels()
    other = AnswerStore(tmp_path / "other.sqlite")
    assert other.import_labels(tmp_path / "labels.csv", KNOWN) == 2
    assert {(x.id_a, x.id_b, x.answer, x.source) for x in other.current()} == {
        ("a", "b", "same", "import"),
        ("c", "d", "different", "import"),
    }


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("id_a,id_b,same\na,b,1\na,zz,0\n", r"row 3: unknown product id\(s\) \['zz'\]"),
        ("id_a,id_b,same\na,b,1\nc,c,0\n", "row 3: product 'c' is paired with itself"),
        ("id_a,id_b,same\na,b,1\nb,a,0\n", "row 3: b / a answered different, but row 2"),
        ("id_a,id_b,same\na,b,maybe\n", "row 2: same is 'maybe'"),
        ("left,right\na,b\n", r"needs the columns \['id_a', 'id_b', 'same'\]"),
    ],
)
def test_a_bad_labels_file_is_refused_whole(tmp_path: Path, text: str, problem: str) -> None:
    store = AnswerStore(tmp_path / "answers.sqlite")
    store.record([("a", "d", "same")])
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(CatalogError, match=problem):
        store.import_labels(tmp_path / "labels.csv", KNOWN)
    assert [(x.id_a, x.id_b) for x in store.current()] == [("a", "d")]


def test_the_answers_file_sits_beside_the_collection(tmp_path) -> None:
    embedded = Settings(store=str(tmp_path / "data"), collection="shop")
    assert state_file(embedded, "review") == tmp_path / "data" / "shop.review.sqlite"
    local = Settings(store=f"local:{tmp_path}", collection="shop")
    assert state_file(local, "review") == tmp_path / "shop.review.sqlite"
    server = Settings(store="http://localhost:6333")
    with pytest.raises(ConfigError, match="PRODSEARCH_STATE_DIR"):
        state_file(server, "review")
    chosen = server.model_copy(update={"state_dir": tmp_path / "state"})
    assert state_file(chosen, "clusters") == tmp_path / "state" / "products.clusters.sqlite"
