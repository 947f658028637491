"""Catalog reading: titles cleaned, every kind of bad row reported with its row and reason."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from prodsearch.catalog import catalog_from_table, clean_title, read_catalog
from prodsearch.errors import CatalogError
from prodsearch.recipes import Recipe, load_recipe
from prodsearch.tables import read_table

GENERIC = load_recipe("generic")


def test_clean_title_decodes_byte_escapes_and_entities() -> None:
    assert clean_title(r"Nescafe \xc3\x89clair Latte 220ml") == "Nescafe Éclair Latte 220ml"
    assert clean_title("Filter 10&amp;quot; Sediment") == 'Filter 10" Sediment'
    assert clean_title("  Tape &amp;  Glue\n") == "Tape & Glue"
    assert clean_title(r"\xe2\x9d\xa4 RATU") == "❤ RATU"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_each_bad_row_is_reported_with_row_and_reason(tmp_path: Path) -> None:
    Image.new("RGB", (32, 32), "red").save(tmp_path / "ok.jpg")
    outside = tmp_path.parent / "outside.jpg"
    Image.new("RGB", (8, 8)).save(outside)
    csv = _write(
        tmp_path / "c.csv",
        "\n".join(
            [
                "id,title,image,image_phash,price",
                "a,Good product,,,10",  # row 2: fine
                ",No id here,,,1",  # row 3: missing id
                "b,,,,2",  # row 4: no title, no image
                "c,Bad hash,,zz12,3",  # row 5: bad phash
                "a,Duplicate id,,,4",  # row 6: duplicate of row 2
                "d,Missing image,missing.jpg,,5",  # row 7: image file not found
                "e,Escaping image,../outside.jpg,,6",  # row 8: path outside the images dir
                "f,Remote image,https://x.test/a.jpg,,7",  # row 9: URL
                "g,,ok.jpg,94974f937d4c2433,8",  # row 10: image only: fine
                "nan,NaN id,,,9",  # row 11: NaN id
            ]
        )
        + "\n",
    )
    catalog = read_catalog(csv, GENERIC)
    assert catalog.rows_read == 10
    assert [r.product_id for r in catalog.rows] == ["a", "g"]
    reasons = {r.row: (r.field, r.reason) for r in catalog.rejections}
    assert set(reasons) == {3, 4, 5, 6, 7, 8, 9, 11}
    assert reasons[3] == ("id", "missing product id")
    assert "empty title and no image" in reasons[4][1]
    assert reasons[5][0] == "image_phash" and "16 hexadecimal" in reasons[5][1]
    assert "duplicate id 'a'" in reasons[6][1] and "row 2" in reasons[6][1]
    assert reasons[7][0] == "image" and "not found" in reasons[7][1]
    assert "outside" in reasons[8][1]
    assert "URL" in reasons[9][1]
    assert catalog.rows[0].payload == {"price": 10}
    assert catalog.rows[1].image_path == (tmp_path / "ok.jpg").resolve()


def test_images_dir_and_huge_titles(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (16, 16)).save(images / "p.png")
    csv = _write(tmp_path / "c.csv", f"id,title,image\nx,T,p.png\ny,{'a' * 5000},\n")
    catalog = read_catalog(csv, GENERIC, images_dir=images)
    assert [r.product_id for r in catalog.rows] == ["x"]
    (rejection,) = catalog.rejections
    assert rejection.row == 3 and "5,000 characters" in rejection.reason


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"sku;name\n1;x\n", "';'-delimited"),
        (b"foo,bar\n1,2\n", "required column"),
        (b"id,title\n1,caf\xe9\n", "not UTF-8"),
    ],
)
def test_unusable_files_raise_a_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "c.csv"
    path.write_bytes(content)
    with pytest.raises(CatalogError, match=message):
        read_catalog(path, GENERIC)


def test_missing_file_and_reserved_columns(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="not found"):
        read_catalog(tmp_path / "none.csv", GENERIC)
    csv = _write(tmp_path / "c.csv", "id,title,content_hash\n1,x,y\n")
    with pytest.raises(CatalogError, match="content_hash"):
        read_catalog(csv, GENERIC)


def test_shopee_recipe_maps_real_columns(tmp_path: Path) -> None:
    csv = _write(
        tmp_path / "s.csv",
        "posting_id,image,image_phash,title,label_group\n"
        "train_1,abc.jpg,94974F937D4C2433,Paper Bag Victoria Secret,249114794\n",
    )
    (row,) = read_catalog(csv, load_recipe("shopee")).rows
    assert row.product_id == "train_1" and row.phash == "94974f937d4c2433"
    assert row.image_path is None  # the JPEGs are not on hand: not mapped
    assert row.payload == {"image": "abc.jpg", "label_group": 249114794}


def test_text_columns_join_into_the_title_and_stay_payload(tmp_path: Path) -> None:
    csv = _write(tmp_path / "c.csv", "sku,name,brand,title\n1,Oat drink 1 L,Oatly,old\n2,,,\n")
    recipe = Recipe(id="sku", title="name", text_columns=["brand", "name", "title"])
    catalog = read_catalog(csv, recipe)
    (row,) = catalog.rows
    assert row.title == "Oatly Oat drink 1 L old"
    assert row.payload == {"brand": "Oatly"}  # `title` is reserved: its text is in the title
    (rejection,) = catalog.rejections
    assert (rejection.row, rejection.field) == (3, "name")
    missing = Recipe(id="sku", title="name", text_columns=["colour"])
    with pytest.raises(CatalogError, match=r"text column\(s\) \['colour'\] not found"):
        read_catalog(csv, missing)


def test_the_same_export_as_csv_parquet_and_json_lines_gives_the_same_rows(
    tmp_path: Path,
) -> None:
    frame = pd.DataFrame(
        {
            "sku": ["a-1", "a-2", "a-3", "a-4"],
            "name": ["Crème brûlée 4×100 g", "Oat drink, 1 L", "", "Soy drink"],
            "price": ["2.5", "3", "1", ""],
            "Dataset": ["shop-a", "shop-b", "shop-a", "shop-b"],
        }
    )
    frame.to_csv(tmp_path / "e.csv", sep=";", index=False, encoding="cp1252")
    typed = pd.read_csv(tmp_path / "e.csv", sep=";", encoding="cp1252")  # as a user converts
    typed.to_parquet(tmp_path / "e.parquet")
    typed.to_json(tmp_path / "e.jsonl", orient="records", lines=True, force_ascii=False)
    recipe = Recipe(id="sku", title="name")
    read = [
        catalog_from_table(read_table(tmp_path / name), recipe)
        for name in ("e.csv", "e.parquet", "e.jsonl")
    ]
    csv_rows, *others = ([(r.product_id, r.title, r.payload) for r in c.rows] for c in read)
    assert csv_rows[0] == ("a-1", "Crème brûlée 4×100 g", {"price": 2.5, "Dataset": "shop-a"})
    assert csv_rows[1][2] == {"price": 3, "Dataset": "shop-b"}
    assert all(rows == csv_rows for rows in others)
    assert [r.product_id for c in read for r in c.rejections] == ["a-3"] * 3
