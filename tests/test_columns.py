"""Column mapping: named columns taken, the rest guessed from the header or refused clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from prodsearch.columns import GUESSES, ROLES, Source, map_catalog, normalise, resolve_columns
from prodsearch.errors import CatalogError
from prodsearch.recipes import load_recipe
from prodsearch.settings import IngestSettings

NONE = IngestSettings()


def _guess(header: list[str], **choices: object) -> dict[str, object]:
    mapping, _ = resolve_columns(header, IngestSettings(**choices))
    return {role: getattr(mapping, role) for role in ROLES}


@pytest.mark.parametrize(
    ("role", "column"),
    [
        ("id", "id"),
        ("id", "sku"),
        ("id", "SKU"),
        ("id", "product_id"),
        ("id", "Product ID"),
        ("id", "productId"),
        ("id", "Variant SKU"),
        ("id", "item_id"),
        ("title", "title"),
        ("title", "Title"),
        ("title", "name"),
        ("title", "product_name"),
        ("title", "Product Name"),
        ("title", "product-title"),
        ("image", "image"),
        ("image", "image_url"),
        ("image", "Image Src"),
        ("image", "imageURL"),
        ("image", "photo"),
        ("phash", "image_phash"),
        ("phash", "phash"),
    ],
)
def test_each_role_is_guessed_from_common_names(role: str, column: str) -> None:
    others = {"id": "code", "title": "label"}  # a header always needs an id and a title
    header = [column, "price"] + [c for r, c in others.items() if r != role]
    choices = {f"{r}_column": c for r, c in others.items() if r != role}
    mapping, sources = resolve_columns(header, IngestSettings(**choices))
    assert getattr(mapping, role) == column and sources[role] is Source.GUESSED


def test_every_guessed_name_is_spelt_as_normalise_spells_it_and_roles_do_not_share_one() -> None:
    names = [name for role in ROLES for name in GUESSES[role]]
    assert all(normalise(name) == name for name in names)
    assert len(names) == len(set(names))


def test_a_generic_header_is_guessed_as_the_generic_recipe_maps_it() -> None:
    generic = load_recipe("generic")
    guessed = _guess(["id", "title", "image", "image_phash", "brand"])
    assert guessed == {role: getattr(generic, role) for role in ROLES}


def test_the_issue_export_maps_name_to_the_title(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_text("id;name;description;price;Dataset\n1;Oat drink;Chilled, 1 L;2.5;a\n")
    mapped = map_catalog(path, NONE)
    assert (mapped.recipe.id, mapped.recipe.title, mapped.recipe.delimiter) == ("id", "name", ";")
    assert mapped.describe() == [
        "export.csv: CSV, 1 row; delimiter ';' (detected); encoding utf-8 (detected)",
        "  id    <- id (guessed)",
        "  title <- name (guessed)",
        "  image <- -",
        "  phash <- -",
        "  payload: description, price, Dataset",
    ]


def test_named_columns_win_and_are_not_guessed_for_another_role() -> None:
    header = ["id", "sku", "name", "title", "image_url"]
    guessed = _guess(header, id_column="sku", title_column="name", image_column="")
    assert guessed == {"id": "sku", "title": "name", "image": None, "phash": None}


def test_text_columns_make_the_title_signal_in_their_order() -> None:
    mapping, sources = resolve_columns(
        ["sku", "brand", "name", "title"], IngestSettings(text_columns="brand,name,title")
    )
    assert mapping.title == "brand" and sources["title"] is Source.GIVEN
    assert mapping.title_columns() == ["brand", "name", "title"]
    named, _ = resolve_columns(
        ["sku", "brand", "name"], IngestSettings(title_column="name", text_columns=["brand"])
    )
    assert named.title_columns() == ["name", "brand"]


def test_a_recipe_names_the_rest_and_flags_override_it() -> None:
    header = ["posting_id", "image", "image_phash", "title", "label_group", "name"]
    mapping, sources = resolve_columns(
        header, IngestSettings(title_column="name"), load_recipe("shopee")
    )
    assert (mapping.id, mapping.title, mapping.image, mapping.phash) == (
        "posting_id",
        "name",
        None,
        "image_phash",
    )
    assert sources == {
        "id": Source.RECIPE,
        "title": Source.GIVEN,
        "image": Source.RECIPE,
        "phash": Source.RECIPE,
    }


@pytest.mark.parametrize(
    ("header", "choices", "message"),
    [
        (["id", "name", "title"], {}, r"2 title-like columns, 'name' and 'title'.*--title-column"),
        (["id", "Title", "Product Name"], {}, "'Title' and 'Product Name'"),
        (["id", "sku", "name"], {}, r"2 id-like columns, 'id' and 'sku'.*--id-column"),
        (["id", "name", "image", "Image Src"], {}, "'image' and 'Image Src'"),
        (["id", "name", "phash", "image_phash"], {}, "'phash' and 'image_phash'"),
        (["code", "name"], {}, r"no id column.*--id-column"),
        (["id", "price"], {}, r"no title or image column.*--title-column"),
        (["id", "name"], {"title_column": "Name"}, r"'Name': no such column.*'name'\?"),
        (["id", "name"], {"text_columns": "name,brnd"}, r"--text-columns 'brnd'"),
        (["id", "name"], {"id_column": ""}, "every product needs an id"),
    ],
)
def test_refusals_say_what_and_how_to_fix_it(
    header: list[str], choices: dict[str, str], message: str
) -> None:
    with pytest.raises(CatalogError, match=message):
        resolve_columns(header, IngestSettings(**choices))


def test_an_ambiguous_title_is_settled_by_a_flag_or_by_using_both() -> None:
    header = ["id", "name", "title"]
    assert _guess(header, text_columns="name,title")["title"] == "name"
    assert _guess(header, title_column="title")["title"] == "title"


def test_a_wrong_delimiter_is_pointed_out(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_text("id;name\n1;Oat drink\n")
    with pytest.raises(CatalogError, match=r"no id column.*pass --delimiter ';'"):
        map_catalog(path, IngestSettings(delimiter=","))


def test_a_shopee_header_points_to_its_recipe() -> None:
    header = ["posting_id", "image", "image_phash", "title", "label_group"]
    with pytest.raises(CatalogError, match="--recipe shopee"):
        resolve_columns(header, NONE)
