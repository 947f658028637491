"""Reading exports: delimiter and encoding detected, Parquet and JSON Lines as text like a CSV."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from prodsearch.errors import CatalogError
from prodsearch.tables import FileFormat, as_text, detect_delimiter, read_table

TITLES = ["Crème brûlée 4×100 g", "Café “Noir” – 500 g €", "Smørrebrød"]


def _csv(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize(
    ("delimiter", "rows"),
    [
        (",", ['1,"Oat drink, chilled",2.5', "2,Soy drink,1"]),
        (";", ["1;Oat drink, chilled, 1 L;2,5", "2;Soy drink;1"]),
        ("\t", ["1\tOat drink; chilled\t2.5", "2\tSoy drink, 1 L\t1"]),
        ("|", ["1|Oat drink, chilled; 1 L|2.5", "2|Soy drink|1"]),
    ],
)
def test_the_delimiter_is_detected(tmp_path: Path, delimiter: str, rows: list[str]) -> None:
    text = delimiter.join(["id", "name", "price"]) + "\n" + "\n".join(rows) + "\n"
    table = read_table(_csv(tmp_path / "c.csv", text))
    assert table.delimiter == delimiter and "delimiter" in table.detected
    assert table.columns == ["id", "name", "price"] and len(table.frame) == 2


def test_delimiter_ties_go_to_the_rows_that_fit() -> None:
    # the header splits on both; only ';' gives every row as many fields as the header
    text = "id;name,size;price\n1;Oat drink, 1 L;2\n2;Soy drink, 1 L;1\n"
    assert detect_delimiter(text) == ";"
    assert detect_delimiter("title\nOat drink\n") == ","  # one column: nothing splits it


@pytest.mark.parametrize(
    ("encoding", "detected"),
    [
        ("utf-8", "utf-8"),
        ("utf-8-sig", "utf-8-sig"),
        ("cp1252", "cp1252"),
        ("utf-16", "utf-16"),
    ],
)
def test_the_encoding_is_detected(tmp_path: Path, encoding: str, detected: str) -> None:
    text = "id,title\n" + "".join(f"{i},{t}\n" for i, t in enumerate(TITLES))
    table = read_table(_csv(tmp_path / "c.csv", text, encoding))
    assert table.encoding == detected and "encoding" in table.detected
    assert table.columns == ["id", "title"]  # no byte-order mark left in the first name
    assert table.frame["title"].tolist() == TITLES


def test_latin1_reads_right_and_undefined_cp1252_bytes_fall_back_to_it(tmp_path: Path) -> None:
    latin = "id,title\n1,Crème brûlée\n2,Smørrebrød à la française\n"
    table = read_table(_csv(tmp_path / "l.csv", latin, "latin-1"))
    assert table.frame["title"].tolist() == ["Crème brûlée", "Smørrebrød à la française"]
    raw = tmp_path / "u.csv"
    raw.write_bytes(b"id,title\n1,caf\xe9 \x81\n")  # 0x81 is undefined in cp1252
    assert read_table(raw).encoding == "latin-1"


def test_json_lines_in_a_windows_encoding_are_read_right(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_bytes('{"id": 1, "title": "Café “Noir”"}\n'.encode("cp1252"))
    table = read_table(path)
    assert (table.encoding, table.detected) == ("cp1252", frozenset({"encoding"}))
    assert table.frame["title"].tolist() == ["Café “Noir”"]


def test_a_given_encoding_or_delimiter_is_used_and_checked(tmp_path: Path) -> None:
    path = _csv(tmp_path / "c.csv", "id;title\n1;Café\n", "cp1252")
    table = read_table(path, delimiter=";", encoding="cp1252")
    assert table.frame["title"].tolist() == ["Café"] and not table.detected
    with pytest.raises(CatalogError, match=r"not UTF-8 \(byte 0xe9.*--encoding cp1252"):
        read_table(path, encoding="utf-8")
    with pytest.raises(CatalogError, match="unknown text encoding 'klingon'"):
        read_table(path, encoding="klingon")


def test_csv_rows_are_numbered_as_in_a_spreadsheet(tmp_path: Path) -> None:
    table = read_table(_csv(tmp_path / "c.csv", "id,title\na,x\nb,y\n"))
    assert table.frame.index.tolist() == [2, 3]
    assert table.describe() == (
        "c.csv: CSV, 2 rows; delimiter ',' (detected); encoding utf-8 (detected)"
    )


def test_parquet_and_json_lines_arrive_as_a_csv_would_write_them(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "id": [1, 2, 3],
            "title": ["Oat drink", "Crème", None],
            "price": [2.5, 3.0, float("nan")],
            "stock": [True, False, True],
            "tags": [["a", "b"], [], ["c"]],
        }
    )
    frame.to_parquet(tmp_path / "c.parquet")
    frame.to_json(tmp_path / "c.jsonl", orient="records", lines=True, force_ascii=False)
    expected = {
        "id": ["1", "2", "3"],
        "title": ["Oat drink", "Crème", ""],
        "price": ["2.5", "3", ""],
        "stock": ["true", "false", "true"],
        "tags": ['["a", "b"]', "[]", '["c"]'],
    }
    for name, file_format in (
        ("c.parquet", FileFormat.PARQUET),
        ("c.jsonl", FileFormat.JSON_LINES),
    ):
        table = read_table(tmp_path / name)
        assert table.format is file_format and table.delimiter is None
        assert table.frame.to_dict(orient="list") == expected, name
        assert table.frame.index.tolist() == [1, 2, 3]


def test_json_lines_rows_are_line_numbers_and_arrays_are_read(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "title": "x"}\n\n{"id": "b", "extra": 1}\n', encoding="utf-8")
    table = read_table(path)
    assert table.frame.index.tolist() == [1, 3]
    assert table.frame.to_dict(orient="records") == [
        {"id": "a", "title": "x", "extra": ""},
        {"id": "b", "title": "", "extra": "1"},
    ]
    array = tmp_path / "c.json"
    array.write_text(json.dumps([{"id": "a"}, {"id": "b"}]), encoding="utf-8")
    assert read_table(array).frame["id"].tolist() == ["a", "b"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("c.jsonl", b'{"id": 1}\n{"id": 2,\n', "line 2: not valid JSON"),
        ("c.jsonl", b'{"id": 1}\n[1, 2]\n', "record 2: expected a JSON object"),
        ("c.jsonl", b"\n", "empty"),
        ("c.parquet", b"not parquet at all", "not a readable Parquet file"),
        ("c.xlsx", b"PK\x03\x04", "cannot read '.xlsx' files"),
        ("c.csv", b"", "empty"),
    ],
)
def test_unreadable_files_raise_a_clear_error(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CatalogError, match=message):
        read_table(path)
    with pytest.raises(CatalogError, match="not found"):
        read_table(tmp_path / "missing.csv")


def test_as_text_writes_values_as_a_csv_export_does() -> None:
    assert [as_text(v) for v in (None, float("nan"), 7, 7.0, 0.1, "x", {"a": 1})] == [
        "",
        "",
        "7",
        "7",
        "0.1",
        "x",
        '{"a": 1}',
    ]
    assert as_text(pd.Timestamp("2024-05-01 12:30")) == "2024-05-01T12:30:00"
