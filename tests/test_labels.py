"""Pair labels: labels.csv validation row by row, the product_pairs format, label groups."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from prodsearch.errors import CatalogError
from prodsearch.labels import (
    PairLabel,
    label_groups,
    read_labels,
    read_pair_file,
    record_title,
    write_labels,
)


def test_labels_round_trip_and_duplicates_count_once(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("id_a,id_b,same\na,b,1\nb,a,yes\nc,d,0\na,c,False\n")
    labels = read_labels(path, known_ids={"a", "b", "c", "d"})
    assert [(x.id_a, x.id_b, x.same) for x in labels] == [
        ("a", "b", True),
        ("c", "d", False),
        ("a", "c", False),
    ]
    write_labels(tmp_path / "out.csv", labels)
    assert read_labels(tmp_path / "out.csv") == labels


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("left,right\na,b\n", "needs the columns"),
        ("id_a,id_b,same\na,a,1\n", "row 2: product 'a' is paired with itself"),
        ("id_a,id_b,same\na,b,maybe\n", "row 2: same is 'maybe'"),
        ("id_a,id_b,same\na,,1\n", "row 2: id_a and id_b must both be given"),
        ("id_a,id_b,same\na,b,1\nb,z,0\n", "row 3: unknown product id(s) ['z']"),
        ("id_a,id_b,same\na,b,1\nc,d,0\nb,a,0\n", "row 4: b / a answered different, but row 2"),
    ],
)
def test_bad_labels_are_refused_naming_the_row(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(content)
    with pytest.raises(CatalogError, match=re.escape(message)):
        read_labels(path, known_ids={"a", "b", "c", "d"})


def test_a_pair_file_becomes_a_catalog_and_labels(tmp_path: Path) -> None:
    left = "COL title VAL Adobe Photoshop CS3 COL manufacturer VAL adobe COL price VAL 649.0"
    right = "COL title VAL photoshop cs3 mac COL manufacturer VAL  COL price VAL 599.99"
    other = "COL title VAL Microsoft Visio 2007 COL manufacturer VAL microsoft COL price VAL 129"
    path = tmp_path / "valid.txt"
    path.write_text(f"{left}\t{right}\t1\n{left}\t{other}\t0\nnot a pair line\n")
    rows, labels = read_pair_file(path)
    assert len(rows) == 3 and len(labels) == 2
    by_id = {r.product_id: r for r in rows}
    first = by_id[labels[0].id_a]
    assert first.title == "Adobe Photoshop CS3"  # the manufacturer is in the title already
    assert first.payload == {"manufacturer": "adobe", "price": 649.0}
    assert by_id[labels[1].id_b].title == "Microsoft Visio 2007"
    assert labels[0].same and not labels[1].same
    assert record_title({"title": "EOS 80D", "brand": "Canon"}) == "EOS 80D Canon"
    (tmp_path / "empty.txt").write_text("no tabs here\n")
    with pytest.raises(CatalogError, match="no LEFT<TAB>RIGHT<TAB>LABEL line"):
        read_pair_file(tmp_path / "empty.txt")


def test_positive_labels_chain_into_groups() -> None:
    labels = [PairLabel("a", "b", True), PairLabel("b", "c", True), PairLabel("c", "d", False)]
    groups = label_groups(["a", "b", "c", "d", "e"], labels)
    assert groups["a"] == groups["b"] == groups["c"]
    assert len({groups["a"], groups["d"], groups["e"]}) == 3
